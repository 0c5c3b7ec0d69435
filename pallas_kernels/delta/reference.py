"""Step-by-step oracle of the (gated) delta rule: one ``lax.scan`` over time.

Per batch row and head, with the state S [K, V] (row-vector convention, k_t, q_t in R^K):

    a_t = exp(g_t)                      (a_t = 1 when g is None; a_t = 0 at a segment start)
    S_t = a_t S_{t-1} + beta_t k_t ⊗ (v_t - a_t S_{t-1}^T k_t)
    o_t = scale · q_t S_t

S_{-1} = initial_state (zeros if None). A step t > 0 starts a new segment when
segment_ids[t] != segment_ids[t-1]; the state entering it is dropped (a_t = 0).
Computes in the promoted dtype of the inputs and float32 (so float64 inputs under
``jax.experimental.enable_x64()`` give a float64 oracle).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.chunk_common import segment_starts


def delta_rule_reference(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                         g: jax.Array | None = None, *, scale: float,
                         initial_state: jax.Array | None = None,
                         segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """q, k [B, T, H, K], v [B, T, H, V], beta and g [B, T, H] (same heads everywhere).

    Returns (o [B, T, H, V] in the compute dtype, final state [B, H, K, V] in the compute dtype).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype, jnp.float32)
    log_a = jnp.zeros((B, T, H), dtype) if g is None else g.astype(dtype)
    decay = jnp.where(segment_starts(segment_ids, B, T)[:, :, None], 0.0, jnp.exp(log_a))
    state = common.vary_like(jnp.zeros((B, H, K, V), dtype) if initial_state is None
                             else initial_state.astype(dtype), q)
    hp = jax.lax.Precision.HIGHEST

    def step(s, xs):
        q_t, k_t, v_t, b_t, a_t = xs
        s = a_t[..., None, None] * s
        residual = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=hp)
        s = s + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * residual, precision=hp)
        return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=hp)

    time_major = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)
    state, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, beta, decay))))
    return jnp.moveaxis(o, 0, 1), state
