"""The chunk-parallel prepass of the per-channel-gate (GLA) Hopper path as a Mosaic GPU kernel:
from the raw log gates, q~, k^, the intra-chunk scores A and the state decays d of
``mosaic_gpu_gk_chunks`` (whose docstring has the bisection), one CTA (one warpgroup) per
(chunk, head, batch row).

Per chunk of C = 64 rows, with lg the total log gates [C, K] (float32, <= 0) and q, k [C, K]
bf16, every exponent the kernel needs is a sum of lg over an interval of rows,

    x_E[r, c] = sum_{lo(r) < u <= hi(r)} lg[u, c] = (E @ lg)[r, c],   E[r, u] = [lo(r) < u <= hi(r)],

which the tensor cores compute from a 0/1 matrix E [C, C] (exact in bf16) and lg as bf16 hi + lo
parts (``store_split``; float32 accumulation): two [C, C] x [C, K] wgmmas per exponent tile,
read to ~2^-17 relative of the interval's sum of |lg|. No cumulative sum is subtracted from
another, so no exponent loses accuracy to cancellation and every exponent is <= 0 (nothing
overflows, whatever the gates). With b = the chunk-local inclusive cumulative sum of lg:

    q~ = scale · q ⊙ e^{b}              E: u <= r               (b_r)
    k^ = k ⊙ e^{b_last - b}             E: r < u                (b_last - b_r)
    d  = e^{b_last}                     the column sums of lg (a reduction over rows)
    A  = scale · (diag(q k^T) + sum_h M_h ⊙ (X_h Y_h^T))

with, at bisection level h = 32, 16, ..., 1 and m(r) = 2h·floor(r / 2h) + h - 1 (the last row of
the first half of r's block of 2h rows), E: min(r, m) < u <= max(r, m), so that

    x_h = b_r - b_m on rows in the second half of their 2h block, b_m - b_r on the first half,
    X_h = q ⊙ e^{x_h} on second-half rows, 0 elsewhere;  Y_h = k ⊙ e^{x_h} on first-half rows,
    M_h = 1 where row and column lie in the same 2h block.

Per chunk (K = 128): 2 · 8 exponent wgmmas ([C, C] x [C, K]) and 7 score wgmmas ([C, K] x [K, C]),
about 24 MFLOP on the tensor cores; one exponential per element of q and k per exponent tile
(8 in all). HBM per (chunk, head): reads q, k (bf16) and lg (f32), 32 KB; writes q~, k^ and
A (bf16), 40 KB, d 0.5 KB. Shared memory ~105 KB (lg's float32 tile shares its space with X and
Y), so two CTAs fit on an SM and one's loads overlap the other's compute.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import (pl, plgpu, products, store_split, summed_products,
                                              tiled_smem, wgmma_zeros)

CHUNK = 64
LEVELS = tuple(CHUNK >> i for i in range(1, CHUNK.bit_length()))   # h = 32, 16, ..., 1
F32 = jnp.float32


def _iota(shape, dim: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _anchor(row: jax.Array, h: int) -> jax.Array:
    """m(r): the last row of the first half of r's block of 2h rows."""
    return row - jax.lax.rem(row, 2 * h) + (h - 1)


def _level_interval(row: jax.Array, h: int) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of level h's exponent rows (module docstring)."""
    m = _anchor(row, h)
    return jnp.minimum(row, m), jnp.maximum(row, m)


def interval_exponent(e_smem, lg_parts, bounds, interpret: bool) -> jax.Array:
    """(E @ lg) [C, K] float32 for E[r, u] = [lo(r) < u <= hi(r)]: ``bounds(row)`` -> (lo, hi)
    for the [C, C] row iota; E is written to ``e_smem`` (bf16 [C, C]) and multiplied with each
    bf16 part of lg in ``lg_parts`` (summed in one accumulator)."""
    C = e_smem.shape[0]
    K = lg_parts[0].shape[-1]
    row, col = _iota((C, C), 0), _iota((C, C), 1)
    lo, hi = bounds(row)
    e_smem[...] = jnp.where((col > lo) & (col <= hi), 1.0, 0.0).astype(e_smem.dtype)
    plgpu.commit_smem()
    (x,) = summed_products((wgmma_zeros((C, K)),), ([(e_smem, part) for part in lg_parts],),
                           interpret)
    return x


def _kernel(scale: float, interpret: bool, q_ref, k_ref, lg_ref, qt_out, kh_out, a_out, d_out,
            q_smem, k_smem, lg_hi, lg_lo, e_smem, d_smem, loaded):
    n, hd, bi = (jax.lax.axis_index(a) for a in ("chunks", "heads", "rows"))
    C, K = q_smem.shape
    rows = pl.ds(n * C, C)
    layout = plgpu.Layout.WGMMA
    load = lambda ref: plgpu.layout_cast(ref[...], layout).astype(F32)
    lg_parts = (lg_hi, lg_lo)

    def split_gates(lg_smem):
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hd], q_smem, loaded)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hd], k_smem, loaded)
        plgpu.copy_gmem_to_smem(lg_ref.at[bi, rows, hd], lg_smem, loaded)
        plgpu.barrier_wait(loaded)
        lg = load(lg_smem)
        d_smem[...] = jnp.exp(jnp.sum(lg, axis=0))
        store_split(lg_parts, lg)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(d_smem, d_out.at[bi, hd, n])

    pl.run_scoped(split_gates, tiled_smem((C, K), F32))

    def tiles_and_scores(x_smem, y_smem):
        row = _iota((C, K), 0)
        exponent = functools.partial(interval_exponent, e_smem, lg_parts, interpret=interpret)
        q_t = scale * load(q_smem) * jnp.exp(exponent(lambda r: (r * 0 - 1, r)))
        k_h = load(k_smem) * jnp.exp(exponent(lambda r: (r, r * 0 + (C - 1))))
        x_smem[...] = q_t.astype(x_smem.dtype)
        y_smem[...] = k_h.astype(y_smem.dtype)
        plgpu.commit_smem()
        for src, dst in ((x_smem, qt_out), (y_smem, kh_out)):
            plgpu.copy_smem_to_gmem(src, dst.at[bi, rows, hd])

        score_row, score_col = _iota((C, C), 0), _iota((C, C), 1)
        (qk,) = products((wgmma_zeros((C, C)),), ((q_smem, k_smem.transpose((1, 0))),),
                         interpret)
        a = jnp.where(score_row == score_col, qk, 0.0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # q~, k^ have left x_smem, y_smem
        for h in LEVELS:
            f = jnp.exp(exponent(functools.partial(_level_interval, h=h)))
            second = jax.lax.rem(row, 2 * h) >= h
            x_smem[...] = jnp.where(second, load(q_smem) * f, 0.0).astype(x_smem.dtype)
            y_smem[...] = jnp.where(second, 0.0, load(k_smem) * f).astype(y_smem.dtype)
            plgpu.commit_smem()
            (s,) = products((wgmma_zeros((C, C)),), ((x_smem, y_smem.transpose((1, 0))),),
                            interpret)
            same_block = jax.lax.div(score_row, 2 * h) == jax.lax.div(score_col, 2 * h)
            a = a + jnp.where(same_block, s, 0.0)
        e_smem[...] = (scale * a).astype(e_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(e_smem, a_out.at[bi, hd, rows])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(tiles_and_scores, *[tiled_smem((C, K), q_smem.dtype)] * 2)


def gk_prepass(q: jax.Array, k: jax.Array, lg: jax.Array, scale: float, *,
               interpret: Any = None):
    """q, k [B, Tp, H, K] bf16 (Tp a multiple of CHUNK), lg [B, Tp, H, K] float32 total log
    gates -> (q~, k^, A [B, H, Tp, CHUNK], d [B, H, Tp / CHUNK, K] float32); q~, k^ [B, Tp, H, K]
    and A in q's dtype."""
    B, Tp, H, K = q.shape
    C, dtype = CHUNK, q.dtype
    tile = jax.ShapeDtypeStruct(q.shape, dtype)
    out_type = (tile, tile, jax.ShapeDtypeStruct((B, H, Tp, C), dtype),
                jax.ShapeDtypeStruct((B, H, Tp // C, K), F32))
    return plgpu.kernel(
        functools.partial(_kernel, float(scale), interpret is not None),
        out_type=out_type,
        scratch_types=[
            tiled_smem((C, K), dtype), tiled_smem((C, K), dtype),       # q, k
            tiled_smem((C, K), dtype), tiled_smem((C, K), dtype),       # lg hi, lo
            tiled_smem((C, C), dtype),                                  # E, then A
            plgpu.SMEM((K,), F32),                                      # d
            plgpu.Barrier(num_arrivals=3),
        ],
        grid=(Tp // C, H, B),
        grid_names=("chunks", "heads", "rows"),
        **({} if interpret is None else {"interpret": interpret}),
    )(q, k, lg.astype(F32))
