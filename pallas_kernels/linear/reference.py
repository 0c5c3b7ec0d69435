"""Plain-jnp forms of the gated linear recurrence: the step-by-step oracle and the chunked XLA path.

Per batch row and head, state S [K, V] (row-vector convention, q_t, k_t in R^K, v_t in R^V):

    a_t = exp(g_t + gk_t)                 per key channel (g [B,T,H] and gk [B,T,H,K] optional,
                                          both log-space <= 0); a_t = 0 at a segment start
    S_t = diag(a_t) S_{t-1} + k_t^T v_t
    o_t = scale · q_t S_t

S_{-1} = initial_state (zeros if None). A step t > 0 starts a new segment when
segment_ids[t] != segment_ids[t-1]. Both functions compute in the promoted dtype of the inputs
and float32, so float64 inputs under ``jax.experimental.enable_x64()`` give a float64 oracle;
heads are equal here (GQA is expanded by the op).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc

_HP = jax.lax.Precision.HIGHEST


def _compute_dtype(*xs):
    return jnp.result_type(*[x.dtype for x in xs if x is not None], jnp.float32)


def total_log_gate(g: jax.Array | None, gk: jax.Array | None, B: int, T: int, H: int,
                   dtype) -> jax.Array | None:
    """g + gk as [B, T, H, 1] (scalar gates) or [B, T, H, K] (per channel); None when ungated."""
    if gk is not None:
        return gk.astype(dtype) + (0.0 if g is None else g.astype(dtype)[..., None])
    return None if g is None else g.astype(dtype)[..., None]


def gated_linear_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           g: jax.Array | None = None, gk: jax.Array | None = None,
                           scale: float, initial_state: jax.Array | None = None,
                           segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The oracle: one ``lax.scan`` over time. q, k [B, T, H, K], v [B, T, H, V].

    Returns (o [B, T, H, V], final state [B, H, K, V]), both in the compute dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = _compute_dtype(q, k, v, g, gk, initial_state)
    lg = total_log_gate(g, gk, B, T, H, dtype)
    decay = jnp.ones((B, T, H, 1), dtype) if lg is None else jnp.exp(lg)
    decay = jnp.where(cc.segment_starts(segment_ids, B, T)[:, :, None, None], 0.0, decay)
    state = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
             else initial_state.astype(dtype))

    def step(s, xs):
        q_t, k_t, v_t, a_t = xs
        s = a_t[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=_HP)

    time_major = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)
    state, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, decay))))
    return jnp.moveaxis(o, 0, 1), state


def chunk_gated_linear_xla(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           g: jax.Array | None, gk: jax.Array | None, scale: float,
                           initial_state: jax.Array | None, segment_ids: jax.Array | None,
                           chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Chunkwise form (the ``impl="xla"`` path), one scan over chunks of C steps.

    With B_i the chunk-local cumulative log gate (anchor: the entering state S, B_i <= 0),
    M_ij = [j <= i and same run], e_i = [step i still in S's run], t_j = [j in the last run]:

        o_i    = scale · ( e_i (q_i ⊙ exp(B_i)) S + Σ_j M_ij Σ_k q_ik k_jk exp(B_ik - B_jk) v_j )
        S_next = c ⊙ S + Σ_j t_j (k_j ⊙ exp(B_C - B_j))^T v_j,    c = e_C exp(B_C)  (per row)

    Every exponent is <= 0, so no gate strength overflows. Per-channel gates build one chunk's
    [C, C, K] factor at a time (inside the scan body), never a [T, T] buffer.
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] in the compute dtype).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = cc.num_chunks(T, C)
    Tp = N * C
    dtype = _compute_dtype(q, k, v, g, gk, initial_state)
    lg = total_log_gate(g, gk, B, T, H, dtype)
    lg = jnp.zeros((B, T, H, 1), dtype) if lg is None else lg
    Bcum = cc.chunk_cumsum(cc.pad_time(lg, Tp), C, axis=1)
    run = cc.pad_time(cc.run_ids(segment_ids, B, T), Tp, edge=True)
    in_entry, to_end, carry = cc.chunk_runs(run, C)

    def to_chunks(x):  # [B, Tp, H, *] -> [N, B, H, C, *]
        x = cc.pad_time(x.astype(dtype), Tp).reshape(B, N, C, H, x.shape[-1])
        return jnp.transpose(x, (1, 0, 3, 2, 4))

    mask_major = lambda m: jnp.moveaxis(m, 1, 0)[:, :, None]  # [B, N, ...] -> [N, B, 1, ...]
    xs = (to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(Bcum), mask_major(run.reshape(B, N, C)),
          mask_major(in_entry), mask_major(to_end), mask_major(carry))
    causal = jnp.tril(jnp.ones((C, C), bool))

    def step(s, xs):  # s [B, H, K, V]
        qn, kn, vn, bn, rn, en, tn, cn = xs
        allowed = causal & (rn[..., :, None] == rn[..., None, :])
        expo = jnp.where(allowed[..., None], bn[..., :, None, :] - bn[..., None, :, :], -jnp.inf)
        if bn.shape[-1] == 1:  # scalar gates: one decay per (i, j)
            scores = jnp.einsum("bhik,bhjk->bhij", qn, kn, precision=_HP) * jnp.exp(expo[..., 0])
        else:
            scores = jnp.einsum("bhik,bhjk,bhijk->bhij", qn, kn, jnp.exp(expo), precision=_HP)
        o = scale * (jnp.einsum("bhik,bhkv->bhiv", en[..., None] * qn * jnp.exp(bn), s,
                                precision=_HP)
                     + jnp.einsum("bhij,bhjv->bhiv", scores, vn, precision=_HP))
        last = bn[..., -1:, :]
        k_end = tn[..., None] * kn * jnp.exp(last - bn)
        s = (cn[..., None, None] * jnp.exp(last)[..., 0, :, None] * s
             + jnp.einsum("bhjk,bhjv->bhkv", k_end, vn, precision=_HP))
        return s, o

    s0 = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
          else initial_state.astype(dtype))
    state, o = jax.lax.scan(step, s0, xs)  # o [N, B, H, C, V]
    o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(B, Tp, H, V)[:, :T]
    return o.astype(q.dtype), state
