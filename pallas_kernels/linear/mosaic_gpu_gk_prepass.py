"""The chunk-parallel prepass of the per-channel-gate (GLA) Hopper path as a Mosaic GPU kernel:
from the raw log gates, q~, k^, the intra-chunk scores A and the state decays d below, one CTA
(one warpgroup) per (chunk, head, batch row) (``gk_prepass``, the forward's); and its first
steps alone for the backward's walks (``gk_decays``: q~, k^ as bf16 hi + lo parts, and d).

Per chunk of C = 64 rows, with lg the total log gates [C, K] (float32, <= 0), b their
chunk-local inclusive cumulative sums (non-increasing along the chunk) and q, k [C, K] bf16:

    q~ = scale · q ⊙ e^{b}                      k^ = k ⊙ e^{b_last - b}        d = e^{b_last}
    A_ij = scale · sum_c q_ic k_jc e^{b_ic - b_jc}   for j <= i, else 0

Exponents as interval sums. Every exponent is a sum of lg over an interval of rows,
x_t[r, c] = sum_{lo_t(r) < u <= hi_t(r)} lg[u, c] = (E_t @ lg)[r, c] with E_t a 0/1 matrix
[C, C] (exact in bf16; ``interval_matrices``) times lg as bf16 hi + lo parts (``store_split``,
float32 accumulation): two [C, C] x [C, K] wgmmas per exponent tile, ~2^-17 relative to the
interval's sum of |lg|. No cumulative sum is subtracted from another, so no exponent loses
accuracy to cancellation, and every exponent is <= 0: nothing overflows, whatever the gates.

Anchors. e^{b_i - b_j} = e^{b_i - b_m} e^{b_m - b_j} with both factors <= 1 for any anchor row m
with j <= m <= i. The pairs i > j are cut by the highest bit in which i and j differ: at level
h = 32, 16, ..., 1 (blocks of 2h rows), i lies in the second half and j in the first half of the
same block, and the block's anchor is m_h(r) = 2h·floor(r / 2h) + h - 1 (the last row of its
first half). Levels 32 and 16 are the 16-row sub-chunk anchors of the off-diagonal 16 x 16
blocks (six blocks from two tiles); levels 8 .. 1 resolve the four diagonal 16 x 16 blocks.
With F_h[r] = e^{-|b_r - b_{m_h(r)}|} (one exponent tile: E: min(r, m) < u <= max(r, m)),

    S_h = (q ⊙ F_h) (k ⊙ F_h)^T,   A = scale · (diag(q k^T) + sum_h M_h ⊙ S_h)

with M_h the pairs of level h: h <= (i XOR j) < 2h and i > j. S_h is right on those pairs and
finite elsewhere (every factor is <= 1), so the operands need no masks; the [C, C] select does
it (``level_mask``).

Bounded chunks. Where every diagonal block of DIAGONAL_BLOCK = 32 rows has log gates summing
to >= -BOUNDED_DECAY = -60 on every channel (checked from lg's block sums before any
exponent: see Forms below), one anchor per block replaces the levels below it: with m(r) the
middle row of r's block and x_r = b_r - b_{m(r)} (one exponent tile, E_mid with entries -1, 0,
1),

    S_mid = (q ⊙ e^{x}) (k ⊙ e^{-x})^T   on the pairs i >= j of one block

(e^{x_i} e^{-x_j} = e^{b_i - b_j}), plus the exact levels above the block (h = 32). Every
factor lies within e^{+-60}: e^{60} ~ 1e26 (masked entries, i < j, are at most that times
|q||k| K, far below float32's and bf16's 3e38) and e^{-60} ~ 9e-27 (far above their least
normal, 1e-38), so nothing overflows or flushes. Floating-point products keep relative
precision at any magnitude, so the cost of a wide range is only x's own error: x_i - x_j is a
difference of two sums from the hi + lo exponent tile, absolute error ~2^-17 (|x_i| + |x_j|)
<= 2^-17 · 120 ~ 9e-4 relative in the score, below the bf16 rounding of A (2^-9). Gates of
log_sigmoid(N(0, 1)) (~-0.8 a step, blocks ~-26) stay bounded; a segment reset is not. Four
exponent tiles (q~, k^, the anchor's, level 32's) and two score products instead of eight and
seven. The same idea (a bound on sub-chunk decays deciding between a factored and
an exact form) is FlashKDA's and jax-linear-attention's "bounded chunks". The backward's
pullback differentiates the bisection form (the same function).

Forms (``form``, static): "bounded" (every chunk bounded: the caller checked), "exact" (the
bisection everywhere) and "per_chunk" (each CTA checks its chunk from lg's block sums and
branches, ``lax.cond``). The branch has a price: at the anchor the per-chunk kernel's forward
took 0.695 ms with every chunk bounded where the static bounded form took 0.612, and 1.091
with none bounded where the static bisection took 0.930 (one H100 run,
h100_2026-12-07_s13_call3); so the op picks one static form for the whole call where it can
(``mosaic_gpu_gk.gate_bounds``).

Work per chunk (K = 128), unbounded chunks, against the kernel this replaces (same math):

    exponent tiles       8 (q~, k^, six levels), 2 wgmmas [64, 64] x [64, 128] each
    exponentials         8 · C · K = 64 Ki, as ex2.approx (``approx_math``, relative error
                         ~2^-22): 2 instructions each, was the accurate exp (~10)
    score wgmmas         7 [64, 128] x [128, 64] (six levels and diag(q k^T)), each issued
                         together with the next tile's two exponent wgmmas: 9 waits on the
                         tensor cores per chunk, was 23
    interval matrices    constants TMA-loaded from L2 (8 KB bf16 each, fetched while the
                         previous tile's exponentials run), was built from iotas in registers
                         (~10 integer ops on 32 elements per thread and tile)
    operand masks        none, was a select on 2 · C · K elements per level
    CUDA-core work       ~5.5 k instructions per thread (per level: q and k reloaded from
                         SMEM, converted, scaled, rounded and stored, 64 elements each; the
                         exp; a 4-op select on the 32 score elements), estimated ~14 k before
    HBM per chunk, head  reads q, k (bf16) and lg (f32), 64 KB; writes q~, k^, A (bf16),
                         40 KB, d 0.5 KB (unchanged); plus 64 KB of interval matrices from L2

Alternatives counted and not taken. Column anchors per 16-row sub-chunk J (anchor b at J's last
row) for the off-diagonal 16 x 16 blocks take one exponent tile per J (3) where levels 32 and
16 take 2. An elementwise diagonal (e^{b_i - b_j} per pair and channel, as fla's chunk_gla)
takes 16 exponentials per element of q where levels 8 .. 1 take 4. One anchor in the middle of
a diagonal block for every chunk overflows float32 for strong gates unless they are clamped,
which changes the value: hence the per-chunk bound above.

Shared memory ~107 KB (q, k, lg hi / lo, X, Y 16 KB each, one interval matrix; lg's float32
tile shares its space with X and Y), so two CTAs fit on an SM and one's loads overlap the
other's compute.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mosaic_gpu_common import (pl, plgpu, store_split, summed_products,
                                              tiled_smem, transposed, wgmma_zeros)

CHUNK = 64
LEVELS = tuple(CHUNK >> i for i in range(1, CHUNK.bit_length()))   # h = 32, 16, ..., 1
F32 = jnp.float32
DIAGONAL_BLOCK = 32     # rows of the diagonal blocks a bounded chunk runs through one anchor
BOUNDED_DECAY = 60.0    # bounded: every diagonal block's log gates sum to >= -this per channel
FORMS = ("bounded", "per_chunk", "exact")   # module docstring


def interval_matrices(chunk: int = CHUNK) -> np.ndarray:
    """E_t [2 + log2(C), C, C] float32 0/1, E_t[r, u] = [lo_t(r) < u <= hi_t(r)], for t = q~
    (u <= r: b_r), k^ (u > r: b_last - b_r), then the levels h = C/2, ..., 1 (between r and its
    anchor m_h(r): |b_r - b_m|)."""
    r, u = np.arange(chunk)[:, None], np.arange(chunk)[None, :]
    bounds = [(np.full_like(r, -1), r), (r, np.full_like(r, chunk - 1))]
    for h in LEVELS:
        m = r - r % (2 * h) + h - 1
        bounds.append((np.minimum(r, m), np.maximum(r, m)))
    return np.stack([(u > lo) & (u <= hi) for lo, hi in bounds]).astype(np.float32)


def middle_anchor_matrix(block: int, chunk: int = CHUNK) -> np.ndarray:
    """E_mid [C, C] float32 in {-1, 0, 1}: (E_mid @ lg)[r] = b_r - b_m with m(r) the middle
    row (block/2 - 1) of r's diagonal block of ``block`` rows: the sum of lg over (m, r] for
    r > m, minus the sum over (r, m] for r < m; exact in bf16."""
    r, u = np.arange(chunk)[:, None], np.arange(chunk)[None, :]
    m = r - r % block + block // 2 - 1
    return (((u > m) & (u <= r)).astype(np.float32) - ((u > r) & (u <= m)).astype(np.float32))


def _iota(shape, dim: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def diagonal_mask(C: int) -> jax.Array:
    """[C, C] bool in the WGMMA layout: the pairs i == j."""
    return _iota((C, C), 0) == _iota((C, C), 1)


def symmetric_level_mask(C: int, h: int) -> jax.Array:
    """[C, C] bool in the WGMMA layout: the pairs of level h in either order,
    h <= i XOR j < 2h (``level_mask`` and its transpose)."""
    code = _iota((C, C), 0) ^ _iota((C, C), 1)
    return (code >= h) & (code < 2 * h)


def block_lower_mask(C: int, block: int, strict: bool = False, upper: bool = False
                     ) -> jax.Array:
    """[C, C] bool in the WGMMA layout: the pairs i >= j (``strict``: i > j; ``upper``: the
    mirror image, j >= i or j > i) within one diagonal block of ``block`` rows (a power of
    two: i and j agree above bit ``block``)."""
    i, j = _iota((C, C), 0), _iota((C, C), 1)
    i, j = (j, i) if upper else (i, j)
    return ((i ^ j) < block) & ((i > j) if strict else (i >= j))


def bounded_chunk(lg: jax.Array, bound: float, b_last: jax.Array | None = None) -> jax.Array:
    """Whether every diagonal block (DIAGONAL_BLOCK rows) of the log gates ``lg`` [C, W]
    (WGMMA layout) sums to >= -``bound`` on every channel: a scalar bool, the same in every
    thread. ``b_last``: lg's column sums, where the caller has them (one block per chunk)."""
    C = lg.shape[0]
    row_block = _iota(lg.shape, 0) // DIAGONAL_BLOCK
    if C == DIAGONAL_BLOCK:
        sums = [jnp.sum(lg, axis=0) if b_last is None else b_last]
    else:
        sums = [jnp.sum(jnp.where(row_block == n, lg, 0.0), axis=0)
                for n in range(C // DIAGONAL_BLOCK)]
    return functools.reduce(jnp.minimum, [jnp.min(x) for x in sums]) >= -bound


def in_form(form: str, bounded: Any, fast: Callable[[], Any], exact: Callable[[], Any]) -> Any:
    """``fast()`` (the bounded form) or ``exact()`` (the bisection) as the static ``form`` says
    (one of FORMS); "per_chunk": ``lax.cond`` on this CTA's ``bounded``."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}, expected one of {FORMS}")
    if form == "per_chunk":
        return jax.lax.cond(bounded, fast, exact)
    return (fast if form == "bounded" else exact)()


def level_mask(C: int, h: int) -> jax.Array:
    """[C, C] bool in the WGMMA layout: the pairs (i, j) of level h with i > j (i in the second
    half, j in the first half of one 2h block)."""
    return symmetric_level_mask(C, h) & (_iota((C, C), 0) > _iota((C, C), 1))


def lower_triangle(C: int) -> jax.Array:
    """[C, C] bool in the WGMMA layout: the pairs i >= j."""
    return _iota((C, C), 0) >= _iota((C, C), 1)


def second_halves(shape: tuple[int, int], h: int) -> jax.Array:
    """[R, W] bool in the WGMMA layout: the rows r in the second half of their block of 2h
    rows (bit h of r set), across all columns."""
    return (_iota(shape, 0) & h) != 0


def suffix_sums(C: int) -> jax.Array:
    """[C, C] bool in the WGMMA layout: U_ij = [j >= i], so (U @ x)_i = sum_{j >= i} x_j."""
    return _iota((C, C), 1) >= _iota((C, C), 0)


def load_wgmma(ref: Any) -> jax.Array:
    """An SMEM tile read into registers (WGMMA layout) as float32."""
    return plgpu.layout_cast(ref[...], plgpu.Layout.WGMMA).astype(F32)


class ExponentTiles:
    """The exponent tiles x_t = E_t @ lg of one chunk on the tensor cores (module docstring):
    ``fetch(t)`` starts the TMA load of E_t (from ``e_ref``, [tiles, C, C]) into ``e_smem``,
    free once the products of E_{t-1} are done; ``products(t)`` waits for it and returns the
    operand pairs of x_t, E_t times each part of lg in ``lg_parts`` (bf16 hi, lo [C, W])."""

    def __init__(self, e_ref: Any, e_smem: Any, e_loaded: Any, lg_parts: tuple[Any, ...]):
        self.e_ref, self.e_smem, self.e_loaded, self.lg_parts = e_ref, e_smem, e_loaded, lg_parts
        self.count = e_ref.shape[0]

    def fetch(self, t: int) -> None:
        plgpu.copy_gmem_to_smem(self.e_ref.at[t], self.e_smem, self.e_loaded)

    def products(self, t: int) -> list:
        plgpu.barrier_wait(self.e_loaded)
        return [(self.e_smem, part) for part in self.lg_parts]


def _load_chunk(q_ref, k_ref, lg_ref, e_ref, d_out, q_smem, k_smem, lg_hi, lg_lo, e_smem,
                d_smem, loaded, e_loaded, flag: bool = False
                ) -> tuple[ExponentTiles, Any, Any, Any, Any]:
    """The first steps of both kernels here: q, k and lg of this CTA's chunk into SMEM, lg split
    into bf16 hi + lo for the exponent tiles, d = e^{b_last} written out; E_0 on its way.
    Returns the exponent tiles, the chunk's (batch row, rows, head) indices and (``flag``)
    whether the chunk is bounded (b_last >= -BOUNDED_DECAY on every channel), else None."""
    n, hd, bi = (jax.lax.axis_index(a) for a in ("chunks", "heads", "rows"))
    C, K = q_smem.shape
    exponents = ExponentTiles(e_ref, e_smem, e_loaded, (lg_hi, lg_lo))
    rows = pl.ds(n * C, C)
    exponents.fetch(0)

    def split_gates(lg_smem):
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hd], q_smem, loaded)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hd], k_smem, loaded)
        plgpu.copy_gmem_to_smem(lg_ref.at[bi, rows, hd], lg_smem, loaded)
        plgpu.barrier_wait(loaded)
        lg = load_wgmma(lg_smem)
        b_last = jnp.sum(lg, axis=0)
        d_smem[...] = jnp.exp(b_last)
        store_split((lg_hi, lg_lo), lg)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(d_smem, d_out.at[bi, hd, n])
        return bounded_chunk(lg, BOUNDED_DECAY, b_last) if flag else None

    bounded = pl.run_scoped(split_gates, tiled_smem((C, K), F32))
    return exponents, bi, rows, hd, bounded


def _kernel(scale: float, form: str, interpret: bool, q_ref, k_ref, lg_ref, e_ref, qt_out,
            kh_out, a_out, d_out, q_smem, k_smem, lg_hi, lg_lo, e_smem, d_smem, loaded, e_loaded):
    C, K = q_smem.shape
    exponents, bi, rows, hd, bounded = _load_chunk(
        q_ref, k_ref, lg_ref, e_ref, d_out, q_smem, k_smem, lg_hi, lg_lo, e_smem, d_smem,
        loaded, e_loaded, flag=form == "per_chunk")
    load = load_wgmma

    def write_scores(a: jax.Array) -> None:
        a_smem = e_smem   # every interval product is done
        a_smem[...] = (scale * a).astype(a_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(a_smem, a_out.at[bi, hd, rows])
        plgpu.wait_smem_to_gmem(0)

    def tiles_and_scores(plan, with_diagonal: bool, x_smem, y_smem):
        """q~ (tile 0), k^ (tile 1), then per entry (E index, level h) of ``plan`` the scores
        (q ⊙ e^x)(k ⊙ e^x)^T on the pairs of level h, or with h = None (the middle anchor)
        (q ⊙ e^x)(k ⊙ e^{-x})^T on the diagonal blocks; diag(q k^T) at tile 1 when
        ``with_diagonal``. Each tile's scores are issued with the next tile's exponents."""
        sequence = [0, 1] + [index for index, _ in plan]
        (x,) = summed_products((wgmma_zeros((C, K)),), (exponents.products(0),), interpret)
        exponents.fetch(sequence[1])   # loads while this tile's exponentials and stores run
        a = None
        for t in range(len(sequence)):
            f = jnp.exp(x)
            if t == 0:
                x_smem[...] = (scale * load(q_smem) * f).astype(x_smem.dtype)   # q~
            elif t == 1:
                y_smem[...] = (load(k_smem) * f).astype(y_smem.dtype)           # k^
            else:
                if t == 2:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # q~, k^ have left
                x_smem[...] = (load(q_smem) * f).astype(x_smem.dtype)
                g = jnp.exp(-x) if plan[t - 2][1] is None else f
                y_smem[...] = (load(k_smem) * g).astype(y_smem.dtype)
            plgpu.commit_smem()
            if t == 1:
                plgpu.copy_smem_to_gmem(x_smem, qt_out.at[bi, rows, hd])
                plgpu.copy_smem_to_gmem(y_smem, kh_out.at[bi, rows, hd])
            inits, operands = [], []
            scored = t >= 2 or (t == 1 and with_diagonal)
            if scored:
                pair = (q_smem, k_smem) if t == 1 else (x_smem, y_smem)
                inits.append(wgmma_zeros((C, C)))
                operands.append([(pair[0], transposed(pair[1]))])
            if t + 1 < len(sequence):
                inits.append(wgmma_zeros((C, K)))
                operands.append(exponents.products(sequence[t + 1]))
            outs = summed_products(tuple(inits), tuple(operands), interpret)
            if t + 1 < len(sequence):
                x = outs[-1]
            if t + 2 < len(sequence):
                exponents.fetch(sequence[t + 2])
            if scored:
                h = None if t == 1 else plan[t - 2][1]
                mask = (diagonal_mask(C) if t == 1 else level_mask(C, h) if h is not None
                        else block_lower_mask(C, DIAGONAL_BLOCK))
                term = jnp.where(mask, outs[0], 0.0)
                a = term if a is None else a + term
        write_scores(a)

    levels = [(2 + n, h) for n, h in enumerate(LEVELS)]
    bounded_plan = [(2 + len(LEVELS), None)] + [(n, h) for n, h in levels if h >= DIAGONAL_BLOCK]

    def scores(x_smem, y_smem):
        in_form(form, bounded, lambda: tiles_and_scores(bounded_plan, False, x_smem, y_smem),
                lambda: tiles_and_scores(levels, True, x_smem, y_smem))

    pl.run_scoped(scores, *[tiled_smem((C, K), q_smem.dtype)] * 2)


def _decays_kernel(scale: float, interpret: bool, q_ref, k_ref, lg_ref, e_ref, q_hi_out,
                   q_lo_out, k_hi_out, k_lo_out, d_out, q_smem, k_smem, lg_hi, lg_lo, e_smem,
                   d_smem, loaded, e_loaded):
    """q~ and k^ as bf16 hi + lo parts (``store_split``) and d, for the backward's walks."""
    C, K = q_smem.shape
    exponents, bi, rows, hd, _ = _load_chunk(q_ref, k_ref, lg_ref, e_ref, d_out, q_smem,
                                             k_smem, lg_hi, lg_lo, e_smem, d_smem, loaded,
                                             e_loaded)

    def decayed(hi_smem, lo_smem):
        for t, (x_smem, factor, hi_out, lo_out) in enumerate(
                ((q_smem, scale, q_hi_out, q_lo_out), (k_smem, 1.0, k_hi_out, k_lo_out))):
            (x,) = summed_products((wgmma_zeros((C, K)),), (exponents.products(t),), interpret)
            if t == 0:
                exponents.fetch(1)
            else:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # q~'s parts have left
            store_split((hi_smem, lo_smem), factor * load_wgmma(x_smem) * jnp.exp(x))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(hi_smem, hi_out.at[bi, rows, hd])
            plgpu.copy_smem_to_gmem(lo_smem, lo_out.at[bi, rows, hd])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(decayed, *[tiled_smem((C, K), q_smem.dtype)] * 2)


def _launch(body, name: str, matrices: np.ndarray, out_type: tuple, q: jax.Array,
            k: jax.Array, lg: jax.Array, interpret: Any) -> Any:
    """One CTA per (chunk, head, batch row) with the SMEM of ``_load_chunk``; ``matrices``:
    its exponent matrices E_t [tiles, C, C]."""
    B, Tp, H, K = q.shape
    C, dtype = CHUNK, q.dtype
    return plgpu.kernel(
        functools.partial(body, interpret is not None),
        kernel_name=name,
        out_type=out_type,
        scratch_types=[
            tiled_smem((C, K), dtype), tiled_smem((C, K), dtype),       # q, k
            tiled_smem((C, K), dtype), tiled_smem((C, K), dtype),       # lg hi, lo
            tiled_smem((C, C), dtype),                                  # E_t (then A)
            plgpu.SMEM((K,), F32),                                      # d
            plgpu.Barrier(num_arrivals=3),
            plgpu.Barrier(num_arrivals=1),
        ],
        grid=(Tp // C, H, B),
        grid_names=("chunks", "heads", "rows"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else {"interpret": interpret}),
    )(q, k, lg.astype(F32), jnp.asarray(matrices, dtype))


def _decays_type(q: jax.Array) -> jax.ShapeDtypeStruct:
    B, Tp, H, K = q.shape
    return jax.ShapeDtypeStruct((B, H, Tp // CHUNK, K), F32)


def gk_prepass(q: jax.Array, k: jax.Array, lg: jax.Array, scale: float, *,
               form: str = "per_chunk", interpret: Any = None):
    """q, k [B, Tp, H, K] bf16 (Tp a multiple of CHUNK), lg [B, Tp, H, K] float32 total log
    gates -> (q~, k^, A [B, H, Tp, CHUNK], d [B, H, Tp / CHUNK, K] float32); q~, k^ [B, Tp, H, K]
    and A in q's dtype. ``form``: one of FORMS (module docstring); "bounded" only where every
    diagonal block's gates sum to >= -BOUNDED_DECAY on every channel."""
    B, Tp, H, K = q.shape
    tile = jax.ShapeDtypeStruct(q.shape, q.dtype)
    out_type = (tile, tile, jax.ShapeDtypeStruct((B, H, Tp, CHUNK), q.dtype), _decays_type(q))
    matrices = np.concatenate([interval_matrices(), middle_anchor_matrix(DIAGONAL_BLOCK)[None]])
    return _launch(functools.partial(_kernel, float(scale), form), "gla_prepass", matrices,
                   out_type, q, k, lg, interpret)


def gk_decays(q: jax.Array, k: jax.Array, lg: jax.Array, scale: float, *,
              interpret: Any = None):
    """The backward's form of the prepass: q~ and k^ to float32 accuracy as bf16 (hi, lo)
    pairs (hi + lo within ~2^-16 of the float32 value; the exponents as in ``gk_prepass``), and
    d, from the same inputs -> ((q~ hi, q~ lo), (k^ hi, k^ lo), d); no scores."""
    tile = jax.ShapeDtypeStruct(q.shape, q.dtype)
    q_hi, q_lo, k_hi, k_lo, d = _launch(functools.partial(_decays_kernel, float(scale)),
                                        "gla_decays", interval_matrices()[:2],
                                        (tile,) * 4 + (_decays_type(q),),
                                        q, k, lg, interpret)
    return (q_hi, q_lo), (k_hi, k_lo), d
