"""LASP-2 sequence parallelism for the gated linear recurrence (call inside ``jax.shard_map``).

The sequence is split into P contiguous time shards along mesh axis ``axis_name``; device i holds
steps [i·L, (i+1)·L). Per batch row and head the recurrence (``pallas_kernels.linear``) is

    S_t = diag(a_t) S_{t-1} + k_t^T v_t,   a_t = exp(g_t + gk_t) (0 where a segment starts),
    o_t = scale · q_t S_t.

Unrolled over one shard with entering state S_in (the true state just before the shard):

    S_t = S_t^loc + diag(A_t) S_in,   A_t = exp(sum_{s=0..t} (g_s + gk_s)) if no segment starts
                                      in [0, t] (local steps), else 0
    o_t = o_t^loc + scale · (q_t ⊙ A_t) S_in

where S^loc, o^loc are the op's results on the shard alone from a zero state. So:
  1. each device runs the chunked op once on its shard (zero initial state) → o^loc, S^loc_i,
     and its shard decay D_i = A_{L-1};
  2. ONE ``all_gather`` of (S^loc_i, log D_i, reset flags) gives every device all P shard
     summaries; unrolling S_after_i = S^loc_i + diag(D_i) S_after_{i-1} (S_after_{-1} =
     initial_state or 0) in float32 gives this shard's entering state S_in_i = S_after_{i-1}
     and the whole sequence's final state S_after_{P-1} (``_combine_shard_states``);
  3. the correction above is added to o^loc — the chunked op is never rerun.
Gradients come from autodiff through the collective (the transpose of all_gather is a
reduce-scatter) and the op's own custom_vjp. Communication per device: P·B·H·K·V float32 state
values (independent of sequence length); combining them costs O(P·B·H·K·V) elementwise work.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.linear import chunk_gated_linear_attention
from pallas_kernels.linear.reference import total_log_gate


def _combine_shard_states(states: jax.Array, log_decays: jax.Array, passes: jax.Array,
                          initial_state: jax.Array, target: jax.Array) -> jax.Array:
    """The true state entering shard ``target`` (0..P; P = after the last shard), in float32.

    states [P, B, H, K, V] (each shard's final state from zero), log_decays [P, B, H, K or 1]
    (log D_j), passes [P, B] (False: shard j holds a segment start, so nothing earlier passes):

        S_in = sum_{j < target} W_j S_j + W_init S_init,
        W_j = prod_{j < m < target} [passes_m] D_m,   W_init = prod_{m < target} [passes_m] D_m.

    The log-space products are suffix sums of same-sign terms (no cancellation), computed for
    all j at once: O(P·B·H·K·V) elementwise work and no sequential scan over the shards.
    """
    P = states.shape[0]
    before = (jnp.arange(P) < target)[:, None]                                    # [P, 1]
    log_d = jnp.where(before[..., None, None], log_decays, 0.0)
    blocked = jnp.where(before, ~passes, False).astype(jnp.int32)
    suffix = lambda x: jnp.flip(jnp.cumsum(jnp.flip(x, 0), axis=0), 0)          # sum_{m >= j}
    log_w_all, blocked_all = suffix(log_d), suffix(blocked)                      # m in [j, target)
    zero = lambda x: jnp.zeros_like(x[:1])
    log_w = jnp.concatenate([log_w_all[1:], zero(log_w_all)])                    # m in (j, target)
    open_ = jnp.concatenate([blocked_all[1:], zero(blocked_all)]) == 0
    w = jnp.where((before & open_)[..., None, None], jnp.exp(log_w), 0.0)        # [P, B, H, K|1]
    w_init = jnp.where((blocked_all[0] == 0)[:, None, None], jnp.exp(log_w_all[0]), 0.0)
    return jnp.sum(w[..., None] * states, axis=0) + w_init[..., None] * initial_state


def lasp2_gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str,
                                 g: jax.Array | None = None, gk: jax.Array | None = None,
                                 scale: float | None = None,
                                 initial_state: jax.Array | None = None,
                                 output_final_state: bool = False,
                                 segment_ids: jax.Array | None = None,
                                 chunk_size: int | None = None, impl: str | None = None
                                 ) -> tuple[jax.Array, jax.Array | None]:
    """``chunk_gated_linear_attention`` over a time-sharded sequence (LASP-2, see module doc).

    Call inside ``jax.shard_map`` with time (axis 1) sharded contiguously over ``axis_name``:
    q, k [B, L, H(kv), K], v [B, L, Hkv, V], g [B, L, H], gk [B, L, H, K], segment_ids [B, L]
    are this device's shard (segments may cross shard boundaries). ``initial_state``
    [B, H, K, V] is the state before the whole sequence, identical on every device (in_specs
    ``P()``). Other arguments as for the op (``impl="pallas"`` in interpret mode needs
    ``check_vma=False``).
    Returns (o [B, L, H, V] in q's dtype, the whole sequence's final state [B, H, K, V] float32
    if ``output_final_state`` else None). The final state has the same value on every device
    but is typed varying over the axis: take it out with out_specs ``P()`` under
    ``check_vma=False``; under ``check_vma=True`` return e.g. ``final[None]`` with out_specs
    ``P(axis_name)`` and use any row (gradients are right either way).
    """
    B, L, H, _, K, V = common.check_qkv(q, k, v)
    o_loc, state_loc = chunk_gated_linear_attention(
        q, k, v, g=g, gk=gk, scale=scale, initial_state=None,
        output_final_state=True, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
    scale = K ** -0.5 if scale is None else float(scale)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), jnp.float32)
    else:
        common.check_shape("initial_state", initial_state, (B, H, K, V),
                           "[batch, heads, key_dim, value_dim]")
        initial_state = initial_state.astype(jnp.float32)

    log_gate = total_log_gate(g, gk, B, L, H, jnp.float32)
    if log_gate is None:
        log_gate = jnp.zeros((B, L, H, 1), jnp.float32)
    cum_log_gate = jnp.cumsum(log_gate, axis=1)                      # [B, L, H, K or 1]
    inner_starts = cc.segment_starts(segment_ids, B, L)              # starts at local t > 0
    ids = (jnp.zeros((B, 2), jnp.int32) if segment_ids is None
           else jnp.stack([segment_ids[:, 0], segment_ids[:, -1]], axis=1))

    summary = (state_loc.astype(jnp.float32), cum_log_gate[:, -1], jnp.any(inner_starts, axis=1),
               ids)
    states, log_decays, inner_reset, all_ids = jax.lax.all_gather(summary, axis_name)
    # Shard i > 0 starts a new segment at its first step when its first id differs from the
    # previous shard's last id (shard 0 never does: the initial state always enters it).
    boundary_start = jnp.concatenate(
        [jnp.zeros((1, B), bool), all_ids[1:, :, 0] != all_ids[:-1, :, 1]], axis=0)  # [P, B]
    passes = ~(inner_reset | boundary_start)
    me = jax.lax.axis_index(axis_name)
    state_in = _combine_shard_states(states, log_decays, passes, initial_state, me)
    starts = inner_starts.at[:, 0].set(boundary_start[me])
    carried = (jnp.cumsum(starts, axis=1) == 0)[:, :, None, None]    # no start in [0, t]
    q_decayed = jnp.where(carried, q.astype(jnp.float32) * jnp.exp(cum_log_gate), 0.0)
    o = o_loc.astype(jnp.float32) + scale * jnp.einsum("blhk,bhkv->blhv", q_decayed, state_in)
    if not output_final_state:
        return o.astype(q.dtype), None
    n_shards = states.shape[0]
    return o.astype(q.dtype), _combine_shard_states(states, log_decays, passes, initial_state,
                                                    n_shards)
