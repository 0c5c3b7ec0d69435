"""The Hopper (Mosaic GPU) walk kernel of the per-channel-gate (GLA) linear recurrence.

The gates, the intra-chunk scores and every exponential arrive precomputed
(``mosaic_gpu_gk_prepass``); the kernel is the sequential part only. Per batch row and head it
carries a float32 state S [Dk, Dv] through the chunks of C = 64 steps (in order, or last to
first with ``reverse``) and, for chunk n with tiles x_n, y_n [C, Dk], z_n [C, Dv], intra scores
A_n [C, C] and decay d_n (a vector over S's rows or over its columns):

    out_n   = x_n S + A_n z_n            (A_n^T with ``reverse``; no A term without scores)
    S      <- d_n ⊙ S + y_n^T z_n        (d_n scaling S's rows, ``decay_axis`` 0, or columns, 1)

so out_n reads the state left by the chunks walked before it. The sequence may be cut into
``pieces`` of whole chunks, each walked by its own CTAs from its own entering state s0[piece]
(``states_only`` skips x and out: a pass that only returns each piece's final state; the
caller combines them, see ``mosaic_gpu_gk``). Two options buy float32-like
accuracy from bf16 tensor cores where the gate gradient needs it (the backward's dq and dk
walks): ``z_lo``, the rounding remainder of a float32 z (z = z_hi + z_lo, both bf16, so the
state update is y^T z_hi + y^T z_lo), and ``split_state``, the state read as S_hi + S_lo (two
bf16 copies in shared memory, x S_hi + x S_lo). The forward of GLA is
x = scale q e^{b}, y = k e^{b_last - b}, z = v, A the scaled masked decayed scores, d = e^{b_last}
on the rows; the backward runs the same kernel three more times with the roles permuted (see
``mosaic_gpu_gk``). The "final" state is the one after the last chunk walked.

One CTA walks one (V blocks, head, batch row) with one warpgroup per V block of 64 state
columns (two for Dv = 128, sharing the x, y, A and d tiles); each warpgroup keeps its state
block [Dk, 64] float32 in registers and a bf16 copy in shared memory for x S. Per chunk the
products (x S and A z into one accumulator, y^T z into the state; with the options above, up to
two more) run on the tensor cores (``wgmma``: bf16 operands in shared memory, float32
accumulators), issued back to back; the decay is a register-level broadcast multiply.
Tiles arrive by TMA, double-buffered (warpgroup 0 issues the copies; a slot is refilled once
every warpgroup has signalled it is done reading it), so chunk n+1 loads while chunk n computes;
out leaves by TMA.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import (TileRing, carry_state, kernel_name, launch_walk,
                                              per_col, per_row, pl, plgpu, store_split,
                                              summed_products, tiled_smem, transposed,
                                              warpgroup_index, wgmma_zeros)

CHUNK = 64          # steps per chunk (the wgmma M of one warpgroup)
V_BLOCK = 64        # state columns per warpgroup
STAGES = 2          # TMA buffering depth of the chunk tiles
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class GkWalk:
    """Static configuration of one kernel launch."""
    chunks: int          # chunks per piece
    pieces: int
    states_only: bool    # no x, no out: only the final state of each piece
    reverse: bool
    has_scores: bool
    has_z_lo: bool       # z arrives as z_hi + z_lo
    split_state: bool    # the state is read as S_hi + S_lo
    decay_axis: int      # 0: d scales the state's rows, 1: its columns
    has_s0: bool
    groups: int          # warpgroups per CTA, each with its own V block of 64 columns
    interpret: bool


def _kernel(cfg: GkWalk, x_ref, y_ref, z_ref, z_lo_ref, a_ref, d_ref, s0_ref, *refs):
    """One CTA: V blocks ``vb``, head ``h``, row ``r`` = batch row * pieces + piece;
    warpgroup ``w`` owns the state columns of block ``vb * groups + w``."""
    vb, h, r = (jax.lax.axis_index(n) for n in ("vblocks", "heads", "rows"))
    bi, piece = jax.lax.div(r, cfg.pieces), jax.lax.rem(r, cfg.pieces)
    out_ref = None if cfg.states_only else refs[0]
    sf_ref, loaded, consumed, s0_loaded = refs[-4:]
    w = warpgroup_index(cfg.groups, h)
    Dk, Vb = y_ref.shape[-1], V_BLOCK
    cols = pl.ds((vb * cfg.groups + w) * Vb, Vb)
    loop = functools.partial(_walk, cfg, x_ref, y_ref, z_ref, z_lo_ref, a_ref, d_ref, out_ref,
                             loaded, consumed, bi, piece, h, vb, w)
    carry_state(loop, scratch_kw=_walk_scratch(cfg, y_ref.dtype, Dk, d_ref.shape[-1], out_ref),
                groups=cfg.groups, w=w, rows=Dk,
                s0_src=s0_ref.at[r, h, :, cols] if cfg.has_s0 else None, s0_loaded=s0_loaded,
                sf_dst=sf_ref.at[r, h, :, cols])


def _walk_scratch(cfg: GkWalk, dtype, Dk: int, Dd: int, out_ref) -> dict:
    """Shared memory of the chunk loop (one scoped allocation); z and S as tuples of bf16
    parts (hi, and lo with ``z_lo`` / ``split_state``)."""
    G, S, C, Vb = cfg.groups, STAGES, CHUNK, V_BLOCK
    decay_len = Dd if cfg.decay_axis == 0 else G * Vb
    scratch = dict(
        y_smem=tiled_smem((S, C, Dk), dtype),
        z_smem=tuple(tiled_smem((G, S, C, Vb), dtype)                 # a block per warpgroup
                     for _ in range(2 if cfg.has_z_lo else 1)),
        d_smem=plgpu.SMEM((S, decay_len), jnp.float32))               # this CTA's part of d
    if not cfg.states_only:
        scratch["s_smem"] = tuple(tiled_smem((G, Dk, Vb), dtype)       # S in bf16 (for x S)
                                  for _ in range(2 if cfg.split_state else 1))
        out_tile = (tiled_smem((G, C, Vb), dtype) if out_ref.dtype == dtype
                    else plgpu.SMEM((G, C, Vb), out_ref.dtype))
        scratch.update(x_smem=tiled_smem((S, C, Dk), dtype), out_smem=out_tile)
    if cfg.has_scores:
        scratch["a_smem"] = tiled_smem((S, C, C), dtype)
    return scratch


def _walk(cfg: GkWalk, x_ref, y_ref, z_ref, z_lo_ref, a_ref, d_ref, out_ref, loaded, consumed,
          bi, piece, h, vb, w, state, *, y_smem, z_smem, d_smem, s_smem=None, x_smem=None,
          out_smem=None, a_smem=None):
    """The chunk loop of one warpgroup; returns its final state block."""
    Dk, C, Vb, N = y_smem.shape[-1], CHUNK, V_BLOCK, cfg.chunks
    cols = pl.ds((vb * cfg.groups + w) * Vb, Vb)
    wgmma_layout = plgpu.Layout.WGMMA
    chunk_at = ((lambda n: piece * N + N - 1 - n) if cfg.reverse
                else (lambda n: piece * N + n))

    def issue_loads(n, slot):
        c = chunk_at(n)
        rows, bar = pl.ds(c * C, C), loaded.at[slot]
        if not cfg.states_only:
            plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, h], x_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(y_ref.at[bi, rows, h], y_smem.at[slot], bar)
        for ref, part in zip((z_ref, z_lo_ref), z_smem):
            for g in range(cfg.groups):
                z_cols = pl.ds((vb * cfg.groups + g) * Vb, Vb)
                plgpu.copy_gmem_to_smem(ref.at[bi, rows, h, z_cols], part.at[g, slot], bar)
        if cfg.has_scores:
            plgpu.copy_gmem_to_smem(a_ref.at[bi, h, rows], a_smem.at[slot], bar)
        d_part = (d_ref.at[bi, h, c] if cfg.decay_axis == 0
                  else d_ref.at[bi, h, c, pl.ds(vb * cfg.groups * Vb, cfg.groups * Vb)])
        plgpu.copy_gmem_to_smem(d_part, d_smem.at[slot], bar)

    ring = TileRing(issue_loads, stages=STAGES, num_chunks=N, groups=cfg.groups, w=w, consumed=consumed)
    store_state = lambda state: store_split([part.at[w] for part in s_smem], state)

    ring.prefill()
    if not cfg.states_only:
        store_state(state)
        plgpu.commit_smem()

    def decay_of(slot):
        """d of this chunk broadcast to the state block's shape [Dk, Vb]."""
        if cfg.decay_axis == 0:
            d = plgpu.layout_cast(d_smem[slot], wgmma_layout.reduce(1))
            return per_row(d, (Dk, Vb))
        d = plgpu.layout_cast(d_smem[slot, pl.ds(w * Vb, Vb)], wgmma_layout.reduce(0))
        return per_col(d, (Dk, Vb))

    def chunk_step(n, state):
        slot = jax.lax.rem(n, STAGES)
        plgpu.barrier_wait(loaded.at[slot])
        z_tiles = [part.at[w, slot] for part in z_smem]
        writes = [(transposed(y_smem.at[slot]), z) for z in z_tiles]
        if cfg.states_only:
            (state,) = summed_products((state * decay_of(slot),), (writes,), cfg.interpret)
        else:
            reads = [(x_smem.at[slot], part.at[w]) for part in s_smem]
            if cfg.has_scores:
                a_tile = transposed(a_smem.at[slot]) if cfg.reverse else a_smem.at[slot]
                reads.append((a_tile, z_tiles[0]))
            out, state = summed_products((wgmma_zeros((C, Vb)), state * decay_of(slot)),
                                         (reads, writes), cfg.interpret)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous out has left
            out_smem[w] = out.astype(out_smem.dtype)
            store_state(state)
        plgpu.commit_smem()  # (also orders this step's generic reads of d before the refill)
        ring.release(n, slot)  # every read of this slot is done

        if not cfg.states_only:
            plgpu.copy_smem_to_gmem(out_smem.at[w],
                                    out_ref.at[bi, pl.ds(chunk_at(n) * C, C), h, cols])
        return state

    state = jax.lax.fori_loop(0, N, chunk_step, state)
    if not cfg.states_only:
        plgpu.wait_smem_to_gmem(0)
    return state


def gk_walk(x: jax.Array | None, y: jax.Array, z: jax.Array, a: jax.Array | None,
            d: jax.Array, s0: jax.Array | None, *, z_lo: jax.Array | None = None,
            split_state: bool = False, reverse: bool = False, decay_axis: int = 0,
            pieces: int = 1, states_only: bool = False, out_dtype: Any = None,
            groups: int | None = None, interpret: Any = None
            ) -> tuple[jax.Array | None, jax.Array]:
    """The kernel call (module docstring). x, y [B, Tp, H, Dk], z [B, Tp, H, Dv] bf16 with Tp
    a multiple of ``pieces`` * CHUNK (x unused, may be None, with ``states_only``);
    a [B, H, Tp, C] bf16 intra scores (row i of a chunk's [C, C] block at time i) or None;
    d [B, H, Tp / C, Dk or Dv] float32 decays (``decay_axis`` 0 or 1); s0 [B * pieces, H, Dk,
    Dv] float32 state entering each piece (row = batch row * pieces + piece) or None (zeros);
    z_lo like z or None and ``split_state`` (module docstring). ``groups``: warpgroups
    (V blocks of 64) per CTA, default all of Dv's up to 2.
    Returns (out [B, Tp, H, Dv] in ``out_dtype`` (default z's), or None with ``states_only``;
    each piece's final state [B * pieces, H, Dk, Dv] float32)."""
    B, Tp, H, Dk = y.shape
    Dv = z.shape[-1]
    groups = min(2, Dv // V_BLOCK) if groups is None else groups
    if Tp % (pieces * CHUNK) or Dv % (V_BLOCK * groups) or Dk not in HEAD_DIMS:
        raise ValueError(f"gk_walk: T={Tp} must be a multiple of pieces*{CHUNK}="
                         f"{pieces * CHUNK}, Dv={Dv} of {V_BLOCK}*groups={V_BLOCK * groups}, "
                         f"Dk={Dk} in {HEAD_DIMS}")
    if d.shape != (B, H, Tp // CHUNK, (Dk, Dv)[decay_axis]):
        raise ValueError(f"gk_walk: decay shape {d.shape} does not fit axis {decay_axis}")
    cfg = GkWalk(Tp // (CHUNK * pieces), pieces, states_only, reverse,
                 a is not None and not states_only, z_lo is not None,
                 split_state and not states_only, decay_axis, s0 is not None, groups,
                 interpret is not None)
    x = y if x is None else x  # never read with states_only
    placeholder = lambda shape, dtype: jnp.zeros(shape, dtype)  # never read
    a = a if cfg.has_scores else placeholder((1, 1, CHUNK, CHUNK), z.dtype)
    s0 = s0 if cfg.has_s0 else placeholder((1, 1, Dk, V_BLOCK), jnp.float32)
    z_lo = z_lo if cfg.has_z_lo else placeholder((1, CHUNK, 1, V_BLOCK), z.dtype)
    out_dtype = jnp.dtype(z.dtype if out_dtype is None else out_dtype)
    copies = ((0 if states_only else 1) + 1 + cfg.groups * (2 if cfg.has_z_lo else 1)
              + (1 if cfg.has_scores else 0) + 1)
    state_type = jax.ShapeDtypeStruct((B * pieces, H, Dk, Dv), jnp.float32)
    out_type = ((state_type,) if states_only
                else (jax.ShapeDtypeStruct((B, Tp, H, Dv), out_dtype), state_type))
    outs = launch_walk(functools.partial(_kernel, cfg), (x, y, z, z_lo, a, d, s0),
                       out_type=out_type, copies=copies, stages=STAGES, groups=cfg.groups,
                       grid=(Dv // (V_BLOCK * groups), H, B * pieces), interpret=interpret,
                       name=kernel_name("gla_walk", reverse=reverse, states=states_only,
                                        split=split_state))
    return (None, outs[0]) if states_only else tuple(outs)
