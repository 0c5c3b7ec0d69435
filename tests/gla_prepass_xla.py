"""The GLA prepass's scores by bisection anchoring in plain jnp (XLA), float32: the reference the
prepass and pullback kernels (``mosaic_gpu_gk_prepass``, ``mosaic_gpu_gk_pullback``) are checked
against beside the float64 oracle, since it computes their math (the levels and anchors of
``mosaic_gpu_gk_prepass``' docstring) rather than the dense form. The op's backward used to
differentiate it through ``jax.vjp``; the pullback kernel replaced that.

Cost per (chunk, head): level h computes C·h·K multiply-adds, all levels (C - 1)·C·K, about half
of one dense [C, K] x [K, C] product; each level takes one exponential per element of q or k
(log2(C) = 6 per element in all). Operand precision: float32 throughout (bf16 inputs are
widened), the level matmuls at HIGHEST precision, so dq and dk of its vjp are float32-accurate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc

F32 = jnp.float32


def chunk_log_gates(lg: jax.Array, chunk: int) -> jax.Array:
    """[B, Tp, H, K] total log gates -> b, their chunk-local inclusive cumulative sums (f32)."""
    return cc.chunk_cumsum(lg.astype(F32), chunk, axis=1)


def decayed_qk(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
               ) -> tuple[jax.Array, jax.Array]:
    """(q~ = scale · q ⊙ e^{b}, k^ = k ⊙ e^{b_last - b}), [B, Tp, H, K] float32."""
    B, Tp, H, K = q.shape
    by_chunk = (B, Tp // chunk, chunk, H, K)
    bc = b.reshape(by_chunk)
    k_hat = (k.astype(F32).reshape(by_chunk) * jnp.exp(bc[:, :, -1:] - bc)).reshape(q.shape)
    return scale * q.astype(F32) * jnp.exp(b), k_hat


def _level_scores(q, k, b, h: int) -> jax.Array:
    """Level h of the bisection (``mosaic_gpu_gk_prepass``): [B, H, N, C / 2h, h, h] float32, the scores
    of rows in the second half of each 2h block against columns in its first half (unscaled).
    Inputs [B, N, C, H, K] float32."""
    B, N, C, H, K = q.shape
    halves = lambda x: x.reshape(B, N, C // (2 * h), 2, h, H, K)
    qs, ks, bs = halves(q), halves(k), halves(b)
    anchor = bs[:, :, :, 0, h - 1:h]                              # [B, N, C/2h, 1, H, K]
    q_h = qs[:, :, :, 1] * jnp.exp(bs[:, :, :, 1] - anchor)
    k_h = ks[:, :, :, 0] * jnp.exp(anchor - bs[:, :, :, 0])
    return jnp.einsum("bnmihk,bnmjhk->bhnmij", q_h, k_h, precision=jax.lax.Precision.HIGHEST)


def _join_level(blocks: jax.Array, below: jax.Array) -> jax.Array:
    """Diagonal blocks [..., M, h, h] and the level-h blocks [..., M / 2, h, h] below them ->
    the diagonal blocks of size 2h, [..., M / 2, 2h, 2h] (zeros above the diagonal)."""
    *lead, M, h, _ = blocks.shape
    pairs = blocks.reshape(*lead, M // 2, 2, h, h)
    upper, lower = pairs[..., 0, :, :], pairs[..., 1, :, :]
    top = jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1)
    bottom = jnp.concatenate([below, lower], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


def intra_scores(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
                 ) -> jax.Array:
    """A [B, H, Tp, C] float32 (row i of chunk n at time n C + i) from
    q, k [B, Tp, H, K] and b [B, Tp, H, K] float32; C = ``chunk``, a power of two."""
    if chunk & (chunk - 1):
        raise ValueError(f"the bisection needs a power-of-two chunk, got {chunk}")
    B, Tp, H, K = q.shape
    N = Tp // chunk
    q, k, b = (x.astype(F32).reshape(B, N, chunk, H, K) for x in (q, k, b))
    diagonal = jnp.einsum("bnchk,bnchk->bhnc", q, k, precision=jax.lax.Precision.HIGHEST)
    blocks = diagonal[..., None, None]                                # [B, H, N, C, 1, 1]
    h = 1
    while h < chunk:
        blocks = _join_level(blocks, _level_scores(q, k, b, h))
        h *= 2
    return (scale * blocks).reshape(B, H, Tp, chunk)


def decayed_tiles(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q~, k^ [B, Tp, H, K], A [B, H, Tp, C]) float32 from q, k (float32 or bf16,
    widened); differentiable in q and k."""
    return (*decayed_qk(q, k, b, scale, chunk), intra_scores(q, k, b, scale, chunk))
