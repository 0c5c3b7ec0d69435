"""The oracle of the gated linear recurrence: plain jnp, one step at a time.

Per batch row and head, state S [K, V] (row-vector convention, q_t, k_t in R^K, v_t in R^V):

    a_t = exp(g_t + gk_t)                 per key channel (g [B,T,H] and gk [B,T,H,K] optional,
                                          both log-space <= 0); a_t = 0 at a segment start
    S_t = diag(a_t) S_{t-1} + k_t^T v_t
    o_t = scale · q_t S_t

S_{-1} = initial_state (zeros if None). A step t > 0 starts a new segment when
segment_ids[t] != segment_ids[t-1]. It computes in the promoted dtype of the inputs
and float32, so float64 inputs under ``jax.experimental.enable_x64()`` give a float64 oracle;
heads are equal here (GQA is expanded by the op).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common

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
    state = common.vary_like(jnp.zeros((B, H, K, V), dtype) if initial_state is None
                             else initial_state.astype(dtype), q)

    def step(s, xs):
        q_t, k_t, v_t, a_t = xs
        s = a_t[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=_HP)

    time_major = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)
    state, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, decay))))
    return jnp.moveaxis(o, 0, 1), state
