"""The per-chunk math of the per-channel-gate (GLA) Hopper path, which its chunk-parallel
kernels compute (the forward's prepass ``mosaic_gpu_gk_prepass``, the backward's pullback
``mosaic_gpu_gk_pullback``), and the small XLA pieces the op runs around them (the chunk-local
log gates b, the state decays d, and q~, k^ in float32 for the backward's walks). The tests keep
the scores' bisection in XLA (``tests/gla_prepass_xla.py``) as the kernels' float32 reference.

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


def decayed_qk(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
               ) -> tuple[jax.Array, jax.Array]:
    """(q~ = scale · q ⊙ e^{b}, k^ = k ⊙ e^{b_last - b}), [B, Tp, H, K] float32."""
    B, Tp, H, K = q.shape
    by_chunk = (B, Tp // chunk, chunk, H, K)
    bc = b.reshape(by_chunk)
    k_hat = (k.astype(F32).reshape(by_chunk) * jnp.exp(bc[:, :, -1:] - bc)).reshape(q.shape)
    return scale * q.astype(F32) * jnp.exp(b), k_hat
