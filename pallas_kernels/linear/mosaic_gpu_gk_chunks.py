"""The chunk-parallel part of the per-channel-gate (GLA) Hopper path, in plain jnp (XLA).

Per batch row, head and chunk of C = 64 steps, with lg the total log gate [C, K] (gk plus g,
<= 0) and b its chunk-local inclusive cumulative sum (b_i <= b_j for i >= j, all <= 0):

    q~   = scale · q ⊙ e^{b}                          [C, K]   reads the entering state
    k^   = k ⊙ e^{b_last - b}                         [C, K]   writes the leaving state
    d    = e^{b_last}                                 [K]      decays the state's rows
    A_ij = scale · sum_c q_ic k_jc e^{b_ic - b_jc}    j <= i, else 0     [C, C]

so that the walk kernel (``mosaic_gpu_gk_kernel``) only has to compute o = q~ S + A v and
S <- d ⊙ S + k^T v. Every factor is <= 1, whatever the gate strength: q~ and k^ directly; A is
built from 16-row sub-blocks. For a column sub-block J and rows i in later sub-blocks, with the
anchor a_J = b at J's last row,

    A_iJ = (q_i ⊙ e^{b_i - a_J}) (k_J ⊙ e^{a_J - b_J})^T        (b_i <= a_J <= b_J)

(one matmul per J), and the pairs inside a diagonal sub-block use e^{b_i - b_j} per channel
elementwise ([16, 16, K] per sub-block). All of it is float32; the caller rounds to bf16 for
the tensor cores. The backward differentiates ``decayed_tiles`` with ``jax.vjp`` for the
intra-chunk and decay-factor parts of dq and dk (``mosaic_gpu_gk``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc

SUB = 16  # rows of a diagonal sub-block
_HP = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def chunk_log_gates(lg: jax.Array, chunk: int) -> jax.Array:
    """[B, Tp, H, K] total log gates -> b, their chunk-local inclusive cumulative sums (f32)."""
    return cc.chunk_cumsum(lg.astype(F32), chunk, axis=1)


def state_decay(b: jax.Array, chunk: int) -> jax.Array:
    """d = e^{b_last} per chunk: [B, Tp, H, K] -> [B, H, Tp / chunk, K] float32."""
    B, Tp, H, K = b.shape
    last = b.reshape(B, Tp // chunk, chunk, H, K)[:, :, -1]
    return jnp.exp(jnp.transpose(last, (0, 2, 1, 3)))


def _diag_scores(q, k, b, lo: int) -> jax.Array:
    """[B, N, H, SUB, SUB] sum_c q_ic k_jc e^{b_ic - b_jc} for j <= i in sub-block [lo, lo+SUB)
    (inputs [B, N, C, H, K])."""
    blk = slice(lo, lo + SUB)
    qi, kj, bi = q[:, :, blk, None], k[:, :, None, blk], b[:, :, blk]
    mask = cc.causal_mask(SUB, SUB)[None, None, :, :, None, None]
    decay = cc.masked_exp(bi[:, :, :, None] - bi[:, :, None, :], mask)     # [B, N, i, j, H, K]
    return jnp.moveaxis(jnp.sum(qi * kj * decay, axis=-1), -1, 2)


def _below_scores(q, k, b, j: int) -> jax.Array:
    """[B, N, H, C - hi, SUB] the scores of rows below column sub-block j (anchored at its
    last row hi - 1)."""
    lo, hi = j * SUB, (j + 1) * SUB
    anchor = b[:, :, hi - 1:hi]
    qa = q[:, :, hi:] * jnp.exp(b[:, :, hi:] - anchor)
    ka = k[:, :, lo:hi] * jnp.exp(anchor - b[:, :, lo:hi])
    return jnp.einsum("bnihk,bnjhk->bnhij", qa, ka, precision=_HP)


def intra_scores(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
                 ) -> jax.Array:
    """A [B, H, Tp, C] float32 (row i of chunk n at time n C + i; module docstring) from
    q, k [B, Tp, H, K] and b [B, Tp, H, K]; C = ``chunk``, a multiple of SUB."""
    B, Tp, H, K = q.shape
    C, N = chunk, Tp // chunk
    q, k, b = (x.astype(F32).reshape(B, N, C, H, K) for x in (q, k, b))
    below = [_below_scores(q, k, b, j) for j in range(C // SUB - 1)]
    row_blocks = []
    for i in range(C // SUB):
        lo = i * SUB
        parts = [below[j][:, :, :, lo - (j + 1) * SUB: lo - j * SUB] for j in range(i)]
        parts.append(_diag_scores(q, k, b, lo))
        if lo + SUB < C:
            parts.append(jnp.zeros((B, N, H, SUB, C - lo - SUB), F32))
        row_blocks.append(jnp.concatenate(parts, axis=-1))
    a = scale * jnp.concatenate(row_blocks, axis=-2)                          # [B, N, H, C, C]
    return jnp.transpose(a, (0, 2, 1, 3, 4)).reshape(B, H, Tp, C)


def decayed_tiles(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, chunk: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q~, k^ [B, Tp, H, K], A [B, H, Tp, C]) float32 (module docstring); differentiable in
    q and k."""
    B, Tp, H, K = q.shape
    qf, kf = q.astype(F32), k.astype(F32)
    by_chunk = (B, Tp // chunk, chunk, H, K)
    bc = b.reshape(by_chunk)
    k_hat = (kf.reshape(by_chunk) * jnp.exp(bc[:, :, -1:] - bc)).reshape(q.shape)
    return scale * qf * jnp.exp(b), k_hat, intra_scores(qf, kf, b, scale, chunk)
