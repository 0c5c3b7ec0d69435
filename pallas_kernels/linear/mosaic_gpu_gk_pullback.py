"""The pullback of the GLA prepass as a Mosaic GPU kernel: dq, dk from the cotangents of q~, k^
and the intra-chunk scores A, with the gates held fixed (in ``mosaic_gpu_gk._backward``; it
equals ``jax.vjp`` of the prepass's math, ``mosaic_gpu_gk_prepass``), and the chunk-local part of
the gate gradient. One CTA (one warpgroup) per (chunk, head, batch row, block of W = 32 key
channels).

Per chunk of C = 64 rows, with b the chunk-local cumulative log gates, q, k [C, K] bf16, the
cotangents dq~, dk^ [C, K] float32 and dA = dO v^T [C, C], formed here from the chunk's dO, v
[C, V] bf16 (one wgmma, exact in float32; entries above the diagonal are ignored: A is zero
there), and dA' = scale · dA:

    dq_ic = scale · dq~_ic e^{b_ic} + dA'_ii k_ic + sum_{j < i} dA'_ij k_jc e^{b_ic - b_jc}
    dk_jc = dk^_jc e^{b_last,c - b_jc} + dA'_jj q_jc + sum_{i > j} dA'_ij q_ic e^{b_ic - b_jc}

and, for the gate gradient (``mosaic_gpu_gk``: dlg_s = sum_{t >= s} (q ⊙ dq - k ⊙ dk)_t over
the whole sequence), its chunk-local part

    L_ic = sum_{t >= i in the chunk} (q_tc dq_tc - k_tc dk_tc) = (U @ dG)_ic,   U_it = [t >= i]

on the tensor cores (U exact in bf16, dG as hi + lo parts), so dq, dk leave the kernel in q's
dtype and XLA only adds each chunk's suffix of later chunks' totals L_0 (1/64 of the data).

The pairs i > j by the prepass's bisection levels (``mosaic_gpu_gk_prepass``: the same interval
matrices, anchors and level masks M_h; e^{b_i - b_j} = F_h[i] F_h[j], every factor <= 1, so
nothing overflows whatever the gates), with dA'_h = M_h ⊙ dA':

    dq += F_h ⊙ (dA'_h (k ⊙ F_h)),      dk += F_h ⊙ (dA'_h^T (q ⊙ F_h))

One product per level does both. At level h the rows i that receive dq (i > j) are the second
halves of the 2h blocks (bit h of i set) and the rows j that receive dk the first halves, and
dA'_h's columns only read first-half rows, dA'_h^T's only second-half ones. So with the mixed
operand y_r = (q_r if bit h of r is set, else k_r) ⊙ F_h[r] and the symmetric S_h = dA'_h +
dA'_h^T (the pairs of level h in either order, h <= i XOR j < 2h, on the symmetrised scores
D = dA' below the diagonal and dA'^T above it; the [C, C] tile is read once, and again
transposed, ``load_transposed``),

    z = F_h ⊙ (S_h y):   dq_r += z_r on second-half rows,   dk_r += z_r on first-half rows.

Half the products, half the operand tiles of the two-product form: at the anchor below the
kernel took 4.47 ms in that form (H200 s10_call1, W = 64) and 1.77 ms in this one (H100
s11_call1, W = 32, dA then still an input from XLA). The first two exponent tiles of the
prepass give e^{b} and e^{b_last - b}; the diagonal is elementwise. Forming dA here saves XLA's
batched product and the two transposes of dO and v it needs (0.33 ms in s11_call1's profile)
and dA's float32 round trip through HBM: the op's forward+backward at the anchor 4.467 ms with
dA from XLA, 4.209 with dA formed here, 4.402 with D also kept in SMEM instead of registers
(one H100 run, h100_2026-12-07_s12_call1).

Bounded form (where the log gates sum to >= -BOUNDED_DECAY = -60 in every diagonal block of the
prepass's DIAGONAL_BLOCK = 32 rows: on every channel of every chunk with ``form="bounded"``,
checked per CTA with "per_chunk"; the prepass's forms), the levels below the block give way to
one anchor per block, as in the prepass's bounded form: with
x = b - b_{m(r)} (the E_mid tile) and the block's strictly lower pairs P = M_blk ⊙ D,

    dq += e^{x} ⊙ (P (k ⊙ e^{-x})),      dk += e^{-x} ⊙ (P^T (q ⊙ e^{x}))

(two products, hi + lo as the levels; P^T is D on the mirrored mask, D being symmetric), after
level 32: 13 wgmmas instead of 30 for the off-diagonal pairs. The bound is the prepass's:
factors within e^{+-60} neither overflow nor flush (P's mask is applied to D before the
product). The exponents' error, at most ~2^-17 (|x_i| + |x_j|) relative in a term where the
bisection's is ~2^-17 |b_i - b_j|, was the worry for dg, which needs dq and dk float32-close;
measured in interpret mode, it does not show: the chunk-local sums L are 1.36e-5 from float64
autodiff with gates of log_sigmoid(N(0, 1)) on every channel (blocks to -36), 1.21e-5 with the
bisection; 9.8e-6 / 8.1e-6 with blocks to -59 (log_sigmoid(N(0, 1) - 1)); 9.1e-6 / 9.0e-6 for
mild gates with one block at -56; and the op's dgk 4.9e-5 from the float64 oracle
with gates uniform in [-2.5, 0] (blocks to ~-50), 4.6e-5 with the bisection. (Session 12's
bound was 4, from the worst case alone.) The form is the forward prepass's, one for the whole
call (``mosaic_gpu_gk.gate_bounds``): a branch inside the kernel costs time where it is not
needed (one H100 run at the anchor, forward+backward: bounded everywhere 3.58 ms as one static
form, 3.93 with the per-chunk branch; bisection everywhere 4.54 static, 5.54 with the branch;
h100_2026-12-07_s13_call3).

Accuracy. The gate gradient subtracts k ⊙ dk from q ⊙ dq and sums over the sequence
(``mosaic_gpu_gk``), so dq and dk must be close to float32-exact: every level product takes
its float32 operands as bf16 hi + lo parts (``store_split``) and sums hi·hi + hi·lo + lo·hi
in float32 (3 wgmmas where one would do in bf16; the dropped lo·lo is ~2^-16 of the product);
the exponents are the prepass's (E_t @ lg on lg's hi + lo parts, ~2^-17 of the interval's sum
of |lg|), and the exponentials ``ex2.approx`` (~2^-22). Measured in interpret mode (the tests'
inputs, this one-product form): the chunk-local sums L within 2.9e-6..3.8e-6 of float64
autodiff (dq, dk leave in bf16: 1.6e-3, their rounding); the op's dgk 4.7e-5 and dg 3.2e-5 from
the float64 oracle, and dgk 1.6e-4 with strong gates and segment resets (steps of -20; the
two-product form with XLA's q~ / k^ gave up to 1.1e-4 there). Fewer products miss the
gate-gradient bound (3e-4): without lo·hi dgk was off by 1.2e-3, without hi·lo by 8.8e-3.

Channels per CTA (W = ``CHANNELS`` = 32). Everything but dA is per channel, so the channels
split freely (each CTA forms dA). In the two-product form, dq, dk, F and three accumulators in
flight took 32 registers a thread each at W = 64, and ptxas spilled (255 registers, 1336 B of
spill stores and 1980 B of loads a thread: h200_2026-12-06_s10_call1's ptxas report); now dq,
dk, F and two accumulators take W / 2 each and D 32 (at W = 32: 112), and at W = 32 ptxas
still takes 255 registers and spills 308 B (h100_2026-12-07_s11_call1), so the register file,
not the SMEM, holds an SM to two CTAs. W = 32 gives twice the CTAs (its bf16 operand tiles
take the 64-byte swizzle: rows of 32 bf16, and a wgmma's two operands share one). W = 32 vs
64 has not been timed: sessions 10 and 11's pairs (8.047 / 8.201 ms on the H200, 4.467 /
4.605 on the H100) ran the same pullback twice, since the bench variant's switch did not reach
the backward until session 12 (``bench_common.patched``); they show run-to-run spread. 64
stays selectable (``gk_pullback``'s ``channels``; bench variant ``attnlab mosaic_gpu_gk w64``).

Work per CTA, counted at W = 64 (a chunk and head with K = 128 takes two CTAs, adjacent in
the grid so the second read of dO and v hits L2; at W = 32 four, and the per-channel rows
halve):

    dA                   1 wgmma [64, V] x [V, 64] from bf16 dO, v
    exponent tiles       8 (e^{b}, e^{b_last - b}, six levels): 2 wgmmas [64, 64] x [64, 64]
    exponentials         8 · C · W = 32 Ki (``approx_math``)
    level wgmmas         6 levels x 3 (S_h y as hi·hi + hi·lo + lo·hi), [64, 64] x [64, 64]
                         each, issued with the next exponent tile's 2: 9 waits on the tensor
                         cores per CTA (the first three exponent tiles alone); 34 wgmmas in
                         all, 8.9 M multiply-adds (2.9e11 flop at the B = 8, T = 4096, H = 16,
                         K = 128 anchor: ~0.4 ms at the bf16 peak)
    CUDA-core work       per level: q, k reloaded from SMEM; y selected, scaled, split into hi
                         + lo and stored, S_h masked from D (held in registers), split and
                         stored (2 tiles); dq, dk updated (2 selects and adds); D and the
                         diagonal once (a row sum of dA')
    HBM per CTA          reads q, k (bf16, 16 KB), lg, dq~, dk^ (float32, 48 KB), dO, v
                         (bf16, 32 KB at V = 128, once per chunk and head: the chunk's other
                         CTA reads them from L2), writes dq, dk (bf16, 16 KB) and L (float32,
                         16 KB); 224 KB per chunk and head at K = V = 128 (1.8 GB at the
                         anchor: ~0.7 ms at 2.7 TB/s); plus 64 KB of interval matrices from L2
    SMEM                 104 KB: q, k, lg hi / lo, E_t (8 KB each) and dA (16 KB) throughout;
                         then in turn dO, v (bf16, 32 KB at V = 128), lg, dq~, dk^ (float32,
                         48 KB), the level operands (S_h, y hi + lo, 32 KB) and the outputs
                         with dG's hi + lo parts (48 KB; U goes into E_t's tile, free by
                         then; at W = 32: 72 KB)
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.linear import mosaic_gpu_gk_prepass as prepass
from pallas_kernels.linear.mosaic_gpu_gk_prepass import (CHUNK, LEVELS, ExponentTiles,
                                                         block_lower_mask, bounded_chunk,
                                                         diagonal_mask, in_form,
                                                         interval_matrices,
                                                         load_wgmma, lower_triangle,
                                                         middle_anchor_matrix, second_halves,
                                                         suffix_sums, symmetric_level_mask)
from pallas_kernels.mosaic_gpu_common import (load_transposed, per_row, pl, plgpu,
                                              store_split, summed_products, tiled_smem,
                                              transposed, wgmma_zeros)

CHANNELS = 32  # key channels per CTA, W below (or 64: module docstring)
F32 = jnp.float32


def _kernel(scale: float, interpret: bool, form: str, q_ref, k_ref, lg_ref, e_ref, dqt_ref,
            dkh_ref, do_ref, v_ref, dq_out, dk_out, dlg_out, q_smem, k_smem, lg_hi, lg_lo,
            e_smem, da_smem, scores_loaded, loaded, e_loaded):
    nb, hd, bi = (jax.lax.axis_index(a) for a in ("blocks", "heads", "rows"))
    C = q_smem.shape[0]
    W = q_smem.shape[1]
    per_chunk = q_ref.shape[-1] // W
    n, cb = jax.lax.div(nb, per_chunk), jax.lax.rem(nb, per_chunk)
    rows, cols = pl.ds(n * C, C), pl.ds(cb * W, W)
    exponents = ExponentTiles(e_ref, e_smem, e_loaded, (lg_hi, lg_lo))
    exponents.fetch(0)
    tile = lambda: _operand((C, W), q_smem.dtype, W)
    zeros = lambda: wgmma_zeros((C, W))

    def exponent(t: int, fetch: int | None) -> jax.Array:
        """x_t alone; starts loading E_``fetch``."""
        (x,) = summed_products((zeros(),), (exponents.products(t),), interpret)
        if fetch is not None:
            exponents.fetch(fetch)
        return x

    def score_cotangents(do_smem, v_smem):
        """dA = dO v^T of this chunk (float32, exact from bf16) into ``da_smem``; q, k arrive
        with dO and v."""
        for src, dst in ((q_ref.at[bi, rows, hd, cols], q_smem),
                         (k_ref.at[bi, rows, hd, cols], k_smem),
                         (do_ref.at[bi, rows, hd], do_smem), (v_ref.at[bi, rows, hd], v_smem)):
            plgpu.copy_gmem_to_smem(src, dst, scores_loaded)
        plgpu.barrier_wait(scores_loaded)
        (da,) = summed_products((wgmma_zeros((C, C)),), ([(do_smem, transposed(v_smem))],),
                                interpret)
        da_smem[...] = da
        plgpu.commit_smem()

    V = do_ref.shape[-1]
    pl.run_scoped(score_cotangents, tiled_smem((C, V), q_smem.dtype),
                  tiled_smem((C, V), q_smem.dtype))

    def direct_terms(lg_smem, dqt_smem, dkh_smem):
        """dq, dk from dq~, dk^ and the diagonal; returns them, x_2, D and (form "per_chunk")
        whether this CTA's chunk and channels are bounded, else None."""
        for src, dst in ((lg_ref, lg_smem), (dqt_ref, dqt_smem), (dkh_ref, dkh_smem)):
            plgpu.copy_gmem_to_smem(src.at[bi, rows, hd, cols], dst, loaded)
        plgpu.barrier_wait(loaded)
        lg = load_wgmma(lg_smem)
        store_split((lg_hi, lg_lo), lg)
        plgpu.commit_smem()
        bounded = bounded_chunk(lg, prepass.BOUNDED_DECAY) if form == "per_chunk" else None
        sym = scale * jnp.where(lower_triangle(C), load_wgmma(da_smem),
                                load_transposed(da_smem))
        diag = per_row(jnp.sum(jnp.where(diagonal_mask(C), sym, 0.0), axis=1), (C, W))
        dq = scale * load_wgmma(dqt_smem) * jnp.exp(exponent(0, 1)) + diag * load_wgmma(k_smem)
        dk = load_wgmma(dkh_smem) * jnp.exp(exponent(1, 2)) + diag * load_wgmma(q_smem)
        return dq, dk, exponent(2, None), sym, bounded

    dq, dk, x, sym, bounded = pl.run_scoped(direct_terms, tiled_smem((C, W), F32),
                                            tiled_smem((C, W), F32), tiled_smem((C, W), F32))

    def pairs(plan, dq, dk, x, s_hi, s_lo, y_hi, y_lo):
        """The off-diagonal pairs, per entry (E index, level h) of ``plan``: level h's one
        symmetric product, or with h = None (last) the middle anchors' two (docstring); each
        level's products issued with the next entry's exponent tile."""
        if plan[0][0] != 2:   # direct_terms formed x_2; this plan starts elsewhere
            exponents.fetch(plan[0][0])
            x = exponent(plan[0][0], None)
        if len(plan) > 1:
            exponents.fetch(plan[1][0])
        for n, (_, h) in enumerate(plan):
            f = jnp.exp(x)
            following = plan[n + 1][0] if n + 1 < len(plan) else None
            if h is None:
                g = jnp.exp(-x)
                for upper, y, factor, first in ((False, load_wgmma(k_smem) * g, f, True),
                                                (True, load_wgmma(q_smem) * f, g, False)):
                    block = block_lower_mask(C, prepass.DIAGONAL_BLOCK, strict=True,
                                             upper=upper)
                    store_split((y_hi, y_lo), y)
                    store_split((s_hi, s_lo), jnp.where(block, sym, 0.0))
                    plgpu.commit_smem()
                    (z,) = summed_products((zeros(),), ([(s_hi, y_hi), (s_hi, y_lo),
                                                         (s_lo, y_hi)],), interpret)
                    if first:
                        dq = dq + factor * z
                    else:
                        dk = dk + factor * z
                continue
            second = second_halves((C, W), h)
            y = jnp.where(second, load_wgmma(q_smem), load_wgmma(k_smem)) * f
            store_split((y_hi, y_lo), y)
            store_split((s_hi, s_lo), jnp.where(symmetric_level_mask(C, h), sym, 0.0))
            plgpu.commit_smem()
            inits = [zeros()]
            operands = [[(s_hi, y_hi), (s_hi, y_lo), (s_lo, y_hi)]]
            if following is not None:
                inits.append(zeros())
                operands.append(exponents.products(following))
            outs = summed_products(tuple(inits), tuple(operands), interpret)
            if n + 2 < len(plan):
                exponents.fetch(plan[n + 2][0])
            z = f * outs[0]
            dq, dk = dq + jnp.where(second, z, 0.0), dk + jnp.where(second, 0.0, z)
            if following is not None:
                x = outs[1]
        return dq, dk

    levels = [(2 + n, h) for n, h in enumerate(LEVELS)]
    bounded_plan = ([(t, h) for t, h in levels if h >= prepass.DIAGONAL_BLOCK]
                    + [(2 + len(LEVELS), None)])

    def off_diagonal(*scratch):
        return in_form(form, bounded, lambda: pairs(bounded_plan, dq, dk, x, *scratch),
                       lambda: pairs(levels, dq, dk, x, *scratch))

    dq, dk = pl.run_scoped(off_diagonal,
                           *[_operand((C, C), q_smem.dtype, W) for _ in range(2)],
                           *[tile() for _ in range(2)])

    def write_out(dq_smem, dk_smem, dg_hi, dg_lo, dlg_smem):
        """dq, dk in q's dtype; the gate gradient's chunk-local suffix sums (docstring)."""
        dq_smem[...] = dq.astype(dq_smem.dtype)
        dk_smem[...] = dk.astype(dk_smem.dtype)
        store_split((dg_hi, dg_lo), load_wgmma(q_smem) * dq - load_wgmma(k_smem) * dk)
        exponents.e_smem[...] = suffix_sums(C).astype(exponents.e_smem.dtype)  # E is done
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem, dq_out.at[bi, rows, hd, cols])
        plgpu.copy_smem_to_gmem(dk_smem, dk_out.at[bi, rows, hd, cols])
        (dlg,) = summed_products((zeros(),), ([(exponents.e_smem, dg_hi),
                                               (exponents.e_smem, dg_lo)],), interpret)
        dlg_smem[...] = dlg
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dlg_smem, dlg_out.at[bi, rows, hd, cols])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(write_out, tile(), tile(), tile(), tile(), tiled_smem((C, W), F32))


def _operand(shape: tuple[int, int], dtype: Any, W: int) -> Any:
    """A bf16 tensor-core operand tile: with W = 32 channels the [C, W] rows are 64 bytes, and
    both operands of a wgmma must share a swizzle, so every operand tile then takes 64."""
    return tiled_smem(shape, dtype, swizzle=min(128, W * jnp.dtype(dtype).itemsize))


def gk_pullback(q: jax.Array, k: jax.Array, lg: jax.Array, dq_t: jax.Array, dk_h: jax.Array,
                do: jax.Array, v: jax.Array, scale: float, *, form: str = "exact",
                channels: int | None = None, interpret: Any = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k [B, Tp, H, K] bf16 (Tp a multiple of CHUNK, K a multiple of 64), lg [B, Tp, H, K]
    the total log gates, dq~, dk^ [B, Tp, H, K] float32 and dO, v [B, Tp, H, V] bf16 -> (dq, dk)
    [B, Tp, H, K] in q's dtype, the pullback of the prepass (q~, k^, A) at (dq~, dk^, dA =
    dO v^T chunk by chunk) with the gates held fixed, and the chunk-local suffix sums of
    q ⊙ dq - k ⊙ dk [B, Tp, H, K] float32 (module docstring). ``form``: one of the prepass's
    FORMS: "bounded" (only where every diagonal block's gates sum to >= -BOUNDED_DECAY on
    every channel), "per_chunk" (each CTA checks its chunk and channels and branches) or
    "exact" (the bisection). ``channels``: W, the key channels per CTA (32 or 64; K a multiple
    of it), default ``CHANNELS`` (read at trace time)."""
    B, Tp, H, K = q.shape
    C, dtype, W = CHUNK, q.dtype, CHANNELS if channels is None else channels
    if W not in (32, 64) or K % W:
        raise ValueError(f"gk_pullback: channels={W} must be 32 or 64 and divide K={K}")
    grad = jax.ShapeDtypeStruct(q.shape, dtype)
    matrices = np.concatenate([interval_matrices(C),
                               middle_anchor_matrix(prepass.DIAGONAL_BLOCK, C)[None]])
    return plgpu.kernel(
        functools.partial(_kernel, float(scale), interpret is not None, form),
        out_type=(grad, grad, jax.ShapeDtypeStruct(q.shape, F32)),
        kernel_name="gla_pullback",
        scratch_types=[
            _operand((C, W), dtype, W), _operand((C, W), dtype, W),     # q, k
            _operand((C, W), dtype, W), _operand((C, W), dtype, W),     # lg hi, lo
            _operand((C, C), dtype, W),                                 # E_t
            tiled_smem((C, C), F32),                                    # dA
            plgpu.Barrier(num_arrivals=4),                              # q, k, dO, v
            plgpu.Barrier(num_arrivals=3),                              # lg, dq~, dk^
            plgpu.Barrier(num_arrivals=1),                              # E_t
        ],
        grid=(Tp // C * (K // W), H, B),
        grid_names=("blocks", "heads", "rows"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else {"interpret": interpret}),
    )(q, k, lg.astype(F32), jnp.asarray(matrices, dtype), dq_t.astype(F32),
      dk_h.astype(F32), do.astype(dtype), v.astype(dtype))
