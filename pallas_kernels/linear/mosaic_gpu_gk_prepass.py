"""The forward prepass of the per-channel-gate (GLA) Hopper path as a Mosaic GPU kernel: q~, k^
and the intra-chunk scores A of ``mosaic_gpu_gk_chunks`` (whose docstring has the math), one CTA
(one warpgroup) per (chunk, head, batch row).

Per chunk of C = 64 rows, with b the chunk-local cumulative log gates [C, K] (float32, from
XLA), q and k [C, K] bf16:

    q~ = scale · q ⊙ e^{b},   k^ = k ⊙ e^{b_last - b}                          (bf16 out)
    A  = scale · (diag(q k^T) + sum_h M_h ⊙ (X_h Y_h^T))                       (bf16 out)

with, at bisection level h = 32, 16, ..., 1 and a(r) = b at row 2h·floor(r / 2h) + h - 1 (the
last row of the first half of r's block of 2h rows),

    X_h = q ⊙ e^{b - a}   on rows in the second half of their 2h block, 0 elsewhere
    Y_h = k ⊙ e^{a - b}   on rows in the first half, 0 elsewhere
    M_h = 1 where row and column lie in the same 2h block.

Seven [C, K] x [K, C] wgmmas per chunk (the diagonal one and one per level; bf16 operands,
float32 accumulation), every exponent <= 0 on the rows it is kept. The anchor tile a is built
in registers from the anchor rows of b (one row load and select per 2h block).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import pl, plgpu, products, tiled_smem, wgmma_zeros

CHUNK = 64
F32 = jnp.float32


def _anchor_rows(b_smem, h: int, row: jax.Array, layout: Any) -> jax.Array:
    """[C, K]: row r holds b at the anchor row of r's 2h block."""
    C, K = b_smem.shape
    anchor = None
    for m in range(C // (2 * h)):
        line = plgpu.layout_cast(b_smem[m * 2 * h + h - 1], layout.reduce(0))
        line = jax.lax.broadcast_in_dim(line, (C, K), [1])
        anchor = line if anchor is None else jnp.where(jax.lax.div(row, 2 * h) == m, line, anchor)
    return anchor


def _kernel(scale: float, interpret: bool, q_ref, k_ref, b_ref, qt_out, kh_out, a_out,
            q_smem, k_smem, b_smem, b_rows, x_smem, y_smem, a_smem, loaded):
    n, hd, bi = (jax.lax.axis_index(a) for a in ("chunks", "heads", "rows"))
    C, K = q_smem.shape
    rows = pl.ds(n * C, C)
    layout = plgpu.Layout.WGMMA
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hd], q_smem, loaded)
    plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hd], k_smem, loaded)
    for buf in (b_smem, b_rows):
        plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, hd], buf, loaded)
    plgpu.barrier_wait(loaded)
    row = plgpu.broadcasted_iota(jnp.int32, (C, K), 0, layout=layout)
    score_row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=layout)
    score_col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=layout)
    load = lambda ref: plgpu.layout_cast(ref[...], layout).astype(F32)
    (qk,) = products((wgmma_zeros((C, C)),), ((q_smem, k_smem.transpose((1, 0))),), interpret)
    a = jnp.where(score_row == score_col, qk, 0.0)
    h = C // 2
    while h >= 1:
        b = load(b_smem)
        delta = b - _anchor_rows(b_rows, h, row, layout)
        second = jax.lax.rem(row, 2 * h) >= h
        x_smem[...] = jnp.where(second, load(q_smem) * jnp.exp(jnp.where(second, delta, 0.0)),
                                0.0).astype(x_smem.dtype)
        y_smem[...] = jnp.where(second, 0.0, load(k_smem) * jnp.exp(
            jnp.where(second, 0.0, -delta))).astype(y_smem.dtype)
        plgpu.commit_smem()
        (s,) = products((wgmma_zeros((C, C)),), ((x_smem, y_smem.transpose((1, 0))),),
                        interpret)
        same_block = jax.lax.div(score_row, 2 * h) == jax.lax.div(score_col, 2 * h)
        a = a + jnp.where(same_block, s, 0.0)
        h //= 2
    b = load(b_smem)
    last = plgpu.layout_cast(b_rows[C - 1], layout.reduce(0))
    x_smem[...] = (scale * load(q_smem) * jnp.exp(b)).astype(x_smem.dtype)
    y_smem[...] = (load(k_smem) * jnp.exp(jax.lax.broadcast_in_dim(last, (C, K), [1]) - b)
                   ).astype(y_smem.dtype)
    a_smem[...] = (scale * a).astype(a_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_smem, qt_out.at[bi, rows, hd])
    plgpu.copy_smem_to_gmem(y_smem, kh_out.at[bi, rows, hd])
    plgpu.copy_smem_to_gmem(a_smem, a_out.at[bi, hd, rows])
    plgpu.wait_smem_to_gmem(0)


def gk_prepass(q: jax.Array, k: jax.Array, b: jax.Array, scale: float, *,
               interpret: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k [B, Tp, H, K] bf16 (Tp a multiple of CHUNK), b [B, Tp, H, K] float32 chunk-local
    cumulative log gates -> (q~, k^ [B, Tp, H, K], A [B, H, Tp, CHUNK]), all in q's dtype."""
    B, Tp, H, K = q.shape
    C, dtype = CHUNK, q.dtype
    return plgpu.kernel(
        functools.partial(_kernel, float(scale), interpret is not None),
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((B, H, Tp, C), dtype)),
        scratch_types=[
            tiled_smem((C, K), dtype), tiled_smem((C, K), dtype), tiled_smem((C, K), F32),
            plgpu.SMEM((C, K), F32),
            tiled_smem((C, K), dtype), tiled_smem((C, K), dtype), tiled_smem((C, C), dtype),
            plgpu.Barrier(num_arrivals=4),
        ],
        grid=(Tp // C, H, B),
        grid_names=("chunks", "heads", "rows"),
        **({} if interpret is None else {"interpret": interpret}),
    )(q, k, b.astype(F32))
