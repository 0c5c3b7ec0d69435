"""The chunk-parallel gradient kernel of the per-channel-gate (GLA) Hopper backward: dq, dk and
the chunk-local part of the log-gate gradient, one CTA (one warpgroup) per (chunk, head, batch
row), from the cotangents of the prepass outputs (``mosaic_gpu_gk_prepass``, whose docstring
has the bisection and the interval sums used here).

Per chunk of C = 64 rows, with dq~, dk^ [C, K] float32 (from the backward's dq and dk walks),
dA = tril(dO v^T) [C, C] (the cotangent of the intra-chunk scores, computed here from dO and
v [C, V] bf16) and the gates held fixed:

    dq = scale e^{b} ⊙ dq~ + scale diag(dA) k + scale sum_h [second half] e^{x_h} ⊙ (D_h @ Y_h)
    dk = e^{b_last - b} ⊙ dk^ + scale diag(dA) q + scale sum_h [first half] e^{x_h} ⊙ (D_h^T @ X_h)

with x_h, X_h, Y_h of the prepass's level h (float32 here) and D_h = dA on pairs in the same
2h block. Then the gate gradient's identity per channel (``mosaic_gpu_gk``):

    dG = q ⊙ dq - k ⊙ dk,      dlg_local[r] = sum_{r <= u < C} dG[u]      (within the chunk)

and the caller adds the sums of the later chunks (row 0 of each chunk's dlg_local).

Precision: the gate gradient subtracts nearly equal terms (each intra-chunk pair (i, j) adds
the same P_ij to dG_i and takes it from dG_j), so every tensor-core product here reads float32
values: dA, X_h, Y_h as bf16 hi + lo parts (all four part products, so D_h @ Y_h and
D_h^T @ X_h are the exact bilinear forms of the same held values) and dG's level terms are
formed from those held values (X_h ⊙ (D_h @ Y_h) - Y_h ⊙ (D_h^T @ X_h); q~ ⊙ dq~ - k^ ⊙ dk^ with
the hi + lo q~, k^ the walks read), so a pair's two contributions cancel to float32 accuracy;
lg as hi + lo for the exponents (interval sums), dG as three parts (hi, mid, lo) for its
reverse cumulative sum; dO v^T and the 0/1 interval matrices are exact in bf16.

K is processed in slabs of W = 64 columns (every quantity but dA is per channel), so the
float32 accumulators dq, dk, dG [C, W] and dA [C, C] fit in registers. Per chunk and slab:
2 · 8 exponent wgmmas, 6 · 8 level-product wgmmas and 3 for the cumulative sum, all
[C, C] x [C, W] (~0.5 MFLOP each), plus dO v^T once per chunk: ~70 MFLOP per chunk at
K = V = 128. HBM per
(chunk, head): reads q, k, dO, v (bf16, 64 KB at K = V = 128) and lg, dq~, dk^ (float32, 96 KB),
writes dq, dk (bf16, 32 KB) and dlg_local (float32, 32 KB). Shared memory ~100 KB (scoped
phases share space), two CTAs per SM.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.linear.mosaic_gpu_gk_prepass import (CHUNK, LEVELS, interval_sums, iota,
                                                         level_interval, prefix, suffix)
from pallas_kernels.mosaic_gpu_common import (bf16_parts, pl, plgpu, products, store_split,
                                              summed_products, tiled_smem, wgmma_zeros)

SLAB = 64   # key channels per pass
F32 = jnp.float32
BF16 = jnp.bfloat16


def _split_product(a_parts, b_parts, interpret: bool) -> jax.Array:
    """a @ b [C, W] float32 for a, b given as bf16 hi + lo parts: all four part products, so
    the result is the exact bilinear form of the parts' values up to float32 sums (the gate
    gradient's pairs cancel only if both sides see the same values)."""
    pairs = [(a, b) for a in a_parts for b in b_parts]
    (out,) = summed_products((wgmma_zeros((a_parts[0].shape[0], b_parts[0].shape[-1])),),
                             (pairs,), interpret)
    return out


def _held(value: jax.Array) -> jax.Array:
    """The float32 value bf16 hi + lo parts of ``value`` hold (what the walks read)."""
    return sum(part.astype(F32) for part in bf16_parts(value, 2))


def _score_cotangent(do_ref, v_ref, bi, rows, hd, loaded, interpret: bool) -> jax.Array:
    """dA = tril(dO v^T) [C, C] float32 (exact products, float32 sums)."""
    C, V = CHUNK, do_ref.shape[-1]

    def scoped(do_smem, v_smem):
        plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hd], do_smem, loaded)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hd], v_smem, loaded)
        plgpu.barrier_wait(loaded)
        (s,) = products((wgmma_zeros((C, C)),), ((do_smem, v_smem.transpose((1, 0))),),
                        interpret)
        return s

    s = pl.run_scoped(scoped, tiled_smem((C, V), BF16), tiled_smem((C, V), BF16))
    return jnp.where(iota((C, C), 1) <= iota((C, C), 0), s, 0.0)


def _kernel(scale: float, interpret: bool, q_ref, k_ref, lg_ref, dqt_ref, dkh_ref, do_ref, v_ref,
            dq_out, dk_out, dlg_out, q_smem, k_smem, lg_parts, e_smem, da_loaded, slab_loaded):
    n, hd, bi = (jax.lax.axis_index(a) for a in ("chunks", "heads", "rows"))
    C, W = CHUNK, SLAB
    rows = pl.ds(n * C, C)
    layout = plgpu.Layout.WGMMA
    load = lambda ref: plgpu.layout_cast(ref[...], layout).astype(F32)
    sums = functools.partial(interval_sums, e_smem, interpret=interpret)
    da = _score_cotangent(do_ref, v_ref, bi, rows, hd, da_loaded, interpret)
    score_row, score_col = iota((C, C), 0), iota((C, C), 1)
    da_diag = jnp.sum(jnp.where(score_row == score_col, da, 0.0), axis=1)
    da_diag = jax.lax.broadcast_in_dim(da_diag, (C, W), [0])
    row = iota((C, W), 0)

    for slab in range(q_ref.shape[-1] // W):
        cols = pl.ds(slab * W, W)
        at = lambda ref: ref.at[bi, rows, hd, cols]

        def first_terms(lg_smem, dqt_smem, dkh_smem):
            """Load the slab; split lg; dq, dk and dG from dq~, dk^ and the diagonal of dA."""
            for ref, buf in ((q_ref, q_smem), (k_ref, k_smem), (lg_ref, lg_smem),
                             (dqt_ref, dqt_smem), (dkh_ref, dkh_smem)):
                plgpu.copy_gmem_to_smem(at(ref), buf, slab_loaded.at[slab])
            plgpu.barrier_wait(slab_loaded.at[slab])
            store_split(lg_parts, load(lg_smem))
            plgpu.commit_smem()
            q, k = load(q_smem), load(k_smem)
            e_q, e_k = jnp.exp(sums(lg_parts, prefix)), jnp.exp(sums(lg_parts, suffix))
            dq_t, dk_h = load(dqt_smem), load(dkh_smem)
            dq = scale * (e_q * dq_t + da_diag * k)
            dk = e_k * dk_h + scale * da_diag * q
            dg = _held(scale * q * e_q) * dq_t - _held(k * e_k) * dk_h  # the diagonal's is 0
            return dq, dk, dg

        f32_slab = tiled_smem((C, W), F32)
        dq, dk, dg = pl.run_scoped(first_terms, f32_slab, f32_slab, f32_slab)

        def levels(dq, dk, dg, x_hi, x_lo, y_hi, y_lo, d_hi, d_lo):
            for h in LEVELS:
                f = jnp.exp(sums(lg_parts, functools.partial(level_interval, h=h)))
                second = jax.lax.rem(row, 2 * h) >= h
                same_block = jax.lax.div(score_row, 2 * h) == jax.lax.div(score_col, 2 * h)
                x = store_split((x_hi, x_lo), jnp.where(second, load(q_smem) * f, 0.0))
                y = store_split((y_hi, y_lo), jnp.where(second, 0.0, load(k_smem) * f))
                store_split((d_hi, d_lo), jnp.where(same_block, da, 0.0))
                plgpu.commit_smem()
                t = lambda ref: ref.transpose((1, 0))
                into_q = scale * _split_product((d_hi, d_lo), (y_hi, y_lo), interpret)
                into_k = scale * _split_product((t(d_hi), t(d_lo)), (x_hi, x_lo), interpret)
                dq = dq + jnp.where(second, f * into_q, 0.0)
                dk = dk + jnp.where(second, 0.0, f * into_k)
                dg = dg + (x * into_q - y * into_k)   # x = 0 on first halves, y on second
            return dq, dk, dg

        part = tiled_smem((C, W), BF16)
        score_part = tiled_smem((C, C), BF16)
        dq, dk, dg = pl.run_scoped(functools.partial(levels, dq, dk, dg), part, part, part, part,
                                   score_part, score_part)

        def store(dg_hi, dg_mid, dg_lo, dq_smem, dk_smem, dlg_smem):
            store_split((dg_hi, dg_mid, dg_lo), dg)
            dq_smem[...] = dq.astype(dq_smem.dtype)
            dk_smem[...] = dk.astype(dk_smem.dtype)
            plgpu.commit_smem()
            dlg_smem[...] = sums((dg_hi, dg_mid, dg_lo), functools.partial(suffix, inclusive=True))
            plgpu.commit_smem()
            for buf, out in ((dq_smem, dq_out), (dk_smem, dk_out), (dlg_smem, dlg_out)):
                plgpu.copy_smem_to_gmem(buf, at(out))
            plgpu.wait_smem_to_gmem(0)

        out_part = tiled_smem((C, W), dq_out.dtype)
        pl.run_scoped(store, part, part, part, out_part, out_part, f32_slab)


def gk_gradients(q: jax.Array, k: jax.Array, lg: jax.Array, dq_t: jax.Array, dk_h: jax.Array,
                 do: jax.Array, v: jax.Array, scale: float, *, interpret: Any = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k [B, Tp, H, K] bf16 (Tp a multiple of CHUNK), lg [B, Tp, H, K] float32 total log
    gates, dq_t, dk_h [B, Tp, H, K] float32 cotangents of q~ and k^, do, v [B, Tp, H, V] bf16
    -> (dq, dk [B, Tp, H, K] in q's dtype, dlg_local [B, Tp, H, K] float32: the chunk-local
    reverse cumulative sums of dG, module docstring)."""
    B, Tp, H, K = q.shape
    C = CHUNK
    if K % SLAB:
        raise ValueError(f"gk_gradients: K={K} must be a multiple of {SLAB}")
    return tuple(plgpu.kernel(
        functools.partial(_kernel, float(scale), interpret is not None),
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct(q.shape, F32)),
        scratch_types=[
            tiled_smem((C, SLAB), q.dtype), tiled_smem((C, SLAB), q.dtype),   # q, k slab
            (tiled_smem((C, SLAB), BF16), tiled_smem((C, SLAB), BF16)),       # lg hi, lo
            tiled_smem((C, C), BF16),                                         # interval matrix
            plgpu.Barrier(num_arrivals=2),                                    # dO, v loaded
            plgpu.Barrier(num_arrivals=5, num_barriers=K // SLAB),            # a slab loaded
        ],
        grid=(Tp // C, H, B),
        grid_names=("chunks", "heads", "rows"),
        **({} if interpret is None else {"interpret": interpret}),
    )(q, k, lg.astype(F32), dq_t.astype(F32), dk_h.astype(F32), do, v))
