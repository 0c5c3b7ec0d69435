"""The chunk-parallel prepass of the per-channel-gate (GLA) Hopper path, in plain jnp (XLA): the
backward differentiates it; the forward runs its Mosaic GPU form (``mosaic_gpu_gk_prepass``).

Per batch row, head and chunk of C = 64 steps, with lg the total log gate [C, K] (gk plus g,
<= 0) and b its chunk-local inclusive cumulative sum (b_i <= b_j for i >= j, all <= 0):

    q~   = scale · q ⊙ e^{b}                          [C, K]   reads the entering state
    k^   = k ⊙ e^{b_last - b}                         [C, K]   writes the leaving state
    d    = e^{b_last}                                 [K]      decays the state's rows
    A_ij = scale · sum_c q_ic k_jc e^{b_ic - b_jc}    j <= i, else 0     [C, C]

so that the walk kernel (``mosaic_gpu_gk_kernel``) only has to compute o = q~ S + A v and
S <- d ⊙ S + k^T v. q~ and k^ have factors <= 1 directly.

The scores A by bisection anchoring (matmuls only, every factor in [0, 1]). Since b is
non-increasing along the chunk, e^{b_i - b_j} = e^{b_i - a} e^{a - b_j} with both factors <= 1
for any anchor a = b_m with j <= m <= i. Cut the chunk into blocks of 2h rows, h = C/2, ..., 2, 1:
a pair i > j has exactly one level h at which i lies in the second half and j in the first half
of the same 2h block (h is the highest bit in which i and j differ). Anchoring that block at
the last row of its first half, a = b at row 2h·m + h - 1,

    Q_h = q_i ⊙ e^{b_i - a}   (the h rows of the second half)      [h, K]
    K_h = k_j ⊙ e^{a - b_j}   (the h rows of the first half)       [h, K]
    A[second half, first half] = scale · Q_h K_h^T                 [h, h]

and the diagonal is A_ii = scale · sum_c q_ic k_ic. So A is assembled from log2(C) levels of
small matmuls (C / 2h blocks of [h, K] x [K, h] at level h) plus a row-wise dot, bottom-up: two
diagonal blocks of size h and the level-h block below them make a diagonal block of size 2h.
No exponent is positive, whatever the gates (steps of -30 or segment resets of -80 included),
so nothing overflows; a term underflows to 0 only where its true value is below float32's range.

Cost per (chunk, head): level h computes C·h·K multiply-adds, all levels (C - 1)·C·K, about half
of one dense [C, K] x [K, C] product; each level takes one exponential per element of q or k
(log2(C) = 6 per element in all). Unless XLA fuses the exponentials into the matmuls, each level
writes its operands Q_h, K_h to memory: C·K elements per (chunk, head) and level, so log2(C) / 2
= 3 times the size of q and k together, in the matmul operand dtype, plus the f32 scores
(C(C + 1)/2 used entries per chunk before assembly).

Operand precision: float32 throughout (bf16 inputs are widened), the level matmuls at HIGHEST
precision: the backward differentiates this form (through ``jax.vjp``), and the per-channel gate
gradient needs float32-accurate dq and dk (``mosaic_gpu_gk``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc

F32 = jnp.float32


def chunk_log_gates(lg: jax.Array, chunk: int) -> jax.Array:
    """[B, Tp, H, K] total log gates -> b, their chunk-local inclusive cumulative sums (f32)."""
    return cc.chunk_cumsum(lg.astype(F32), chunk, axis=1)


def state_decay(b: jax.Array, chunk: int) -> jax.Array:
    """d = e^{b_last} per chunk: [B, Tp, H, K] -> [B, H, Tp / chunk, K] float32."""
    B, Tp, H, K = b.shape
    last = b.reshape(B, Tp // chunk, chunk, H, K)[:, :, -1]
    return jnp.exp(jnp.transpose(last, (0, 2, 1, 3)))


def _level_scores(q, k, b, h: int) -> jax.Array:
    """Level h of the bisection (module docstring): [B, H, N, C / 2h, h, h] float32, the scores
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
    """A [B, H, Tp, C] float32 (row i of chunk n at time n C + i; module docstring) from
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


def decayed_qk(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
               ) -> tuple[jax.Array, jax.Array]:
    """(q~ = scale · q ⊙ e^{b}, k^ = k ⊙ e^{b_last - b}), [B, Tp, H, K] float32."""
    B, Tp, H, K = q.shape
    by_chunk = (B, Tp // chunk, chunk, H, K)
    bc = b.reshape(by_chunk)
    k_hat = (k.astype(F32).reshape(by_chunk) * jnp.exp(bc[:, :, -1:] - bc)).reshape(q.shape)
    return scale * q.astype(F32) * jnp.exp(b), k_hat


def decayed_tiles(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q~, k^ [B, Tp, H, K], A [B, H, Tp, C]) float32 (module docstring) from q, k (float32 or
    bf16, widened); differentiable in q and k."""
    return (*decayed_qk(q, k, b, scale, chunk), intra_scores(q, k, b, scale, chunk))
