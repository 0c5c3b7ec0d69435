"""Chunkwise delta rule in plain jnp (the ``impl="xla"`` path), differentiated by autodiff.

The per-chunk math is ``chunk_math`` (WY / UT form): ``prepare`` (the triangular solve and
everything independent of the entering state) runs for all (batch, head, chunk) at once; only
``apply`` (Δ = U - W S, the chunk's output and leaving state) runs in a scan over chunks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.delta import chunk_math
from pallas_kernels.delta.chunking import from_head_major, to_layout


def chunk_delta_rule_xla(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                         g: jax.Array | None, *, scale: float, initial_state: jax.Array | None,
                         segment_ids: jax.Array | None, chunk: int
                         ) -> tuple[jax.Array, jax.Array]:
    """q, k [B, T, H, K], v [B, T, H, V], beta and g [B, T, H]; chunk length ``chunk``.
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or wider)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
    lay = to_layout(q.astype(dtype), k.astype(dtype), v.astype(dtype), beta.astype(dtype), g,
                    segment_ids, chunk)
    N = lay.q.shape[2] // chunk
    chunked = lambda x: x.reshape(*x.shape[:2], N, chunk, x.shape[-1])  # [B, H, N, C, X]
    q_c, k_c, v_c, beta_c = map(chunked, (lay.q, lay.k, lay.v, lay.beta))
    per_head = lambda x: None if x is None else jnp.broadcast_to(x[:, None], (B, H, *x.shape[1:]))
    gates = chunk_math.Gates(
        None if lay.b is None else chunked(lay.b), lay.b_row,
        None if lay.r_col is None else chunked(per_head(lay.r_col)), per_head(lay.r_row))
    over_bhn = lambda f: jax.vmap(jax.vmap(jax.vmap(f)))
    prep = over_bhn(chunk_math.prepare)(k_c, v_c, beta_c, gates)

    def step(s, xs):  # s [B, H, K, V]
        p, q_n, k_n = xs
        o, s = jax.vmap(jax.vmap(chunk_math.apply))(p, q_n, k_n, s)
        return s, o

    s0 = common.vary_like(jnp.zeros((B, H, K, V), dtype) if initial_state is None
                          else initial_state.astype(dtype), q)
    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
    state, o = jax.lax.scan(step, s0, jax.tree.map(chunk_major, (prep, q_c, k_c)))
    o = jnp.moveaxis(o, 0, 2).reshape(B, H, N * chunk, V)
    return from_head_major(scale * o, T).astype(q.dtype), state
