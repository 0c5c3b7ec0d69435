"""The Hopper (Mosaic GPU) walk kernel of the scalar-gate chunkwise linear recurrence.

Per batch row and head, state S [K, V] float32, log gate g_t <= 0 per step (or none):

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,        o_t = scale · q_t S_t

The sequence is cut into P *pieces* of whole chunks; one CTA walks one (V blocks, head, batch
row, piece) chunk by chunk from the state handed to it (zeros, or ``s0``), with one warpgroup
per V block of 64 columns (by default two for V = 128: they share the q, k and gate tiles,
each keeps its own f32 state block [K, 64] in registers). With b_i = sum_{s <= i in the chunk} g_s (the
chunk-local cumulative log gate, <= 0, so every exponent below is <= 0 and nothing overflows)
and S the state entering the chunk:

    A      = (q k^T) ⊙ D,        D_ij = exp(b_i - b_j) for j <= i, else 0        [C, C]
    o      = scale · ( A v + diag(exp(b)) (q S) )                                   [C, 64]
    S_next = exp(b_{C-1}) S + k^T (diag(exp(b_{C-1} - b)) v)                        [K, 64]

All four products run on the tensor cores (``wgmma``, bf16 operands from shared memory, float32
accumulators in registers): q k^T and q S (a bf16 copy of S, as K/64 products of q's column
blocks with S's row blocks), then A v (A written to shared memory) and k^T (decayed v) (a
transposed view of the k tile). The three float32 operands S, A and the decayed v live in one
buffer of [64, 64] bf16 tiles per warpgroup: S's copy is read before A and the decayed v are
written and rewritten after they are read, so they share it. q, k, v tiles and the chunk's b
arrive by TMA, double-buffered (warpgroup 0 issues the copies; a slot is refilled once every
warpgroup has signalled that it is done reading it), so chunk n+1 loads while chunk n computes;
o leaves by TMA. The loop's shared memory is a scoped allocation, reused afterwards for the
float32 final state.

``precise`` writes each of S, A and the decayed v as bf16 hi + lo parts (x = hi + lo to
~2^-16 relative, ``mosaic_gpu_common.store_split``) and sums the products with both: three
more wgmmas per chunk (x S_lo, A_lo v, k^T (decayed v)_lo). The backward's dq and dk walks
use it when there is a gate, whose gradient needs them float32-exact (``mosaic_gpu.py``,
"Accuracy of the gate gradient"); q, k, v are exact bf16 inputs there and need no split.
With the shared tile buffer it fits two warpgroups' blocks at K = V = 128 with float32 o.

``reverse`` runs the anti-causal recurrence instead, chunks last to first, R the state
entering a chunk from the later ones:

    o_i    = scale · ( sum_{j >= i} e^{b_j - b_i} (q_i . k_j) v_j + e^{b_{C-1} - b_i} (q_i R) )
    R_prev = e^{b_{C-1}} R + k^T (diag(exp(b)) v)

(the same code with the mask transposed and the two per-row factors swapped); its "final"
state is the one after the first step decayed to before it.

``states_only`` skips q and o: it returns each piece's final state from its ``s0`` (the first
pass of the sequence split; see ``mosaic_gpu.py``).
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
V_BLOCK = 64        # value columns per warpgroup: the S block [K, 64] f32 is 32-64 registers a thread
STAGES = 2          # TMA buffering depth of the q, k, v, b tiles
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class Walk:
    """Static configuration of one kernel launch."""
    chunks: int          # chunks per piece
    pieces: int
    scale: float
    gated: bool
    reverse: bool
    states_only: bool
    has_s0: bool
    precise: bool        # the state, the scores A and the decayed v as bf16 hi + lo parts
    groups: int          # warpgroups per CTA, each with its own V block of 64 columns
    interpret: bool


def _kernel(cfg: Walk, q_ref, k_ref, v_ref, b_ref, s0_ref, *refs):
    """One CTA: V blocks ``vb``, head ``h``, row ``r`` = batch row * pieces + piece; its
    warpgroup ``w`` owns the value columns of block ``vb * groups + w``."""
    o_ref = None if cfg.states_only else refs[0]
    sf_ref, loaded, consumed, s0_loaded = refs[-4:]
    vb, h, r = (jax.lax.axis_index(n) for n in ("vblocks", "heads", "rows"))
    bi, piece = jax.lax.div(r, cfg.pieces), jax.lax.rem(r, cfg.pieces)
    w = warpgroup_index(cfg.groups, h)
    K, Vb = k_ref.shape[-1], V_BLOCK
    cols = pl.ds((vb * cfg.groups + w) * Vb, Vb)
    carry_state(functools.partial(_walk, cfg, q_ref, k_ref, v_ref, b_ref, o_ref, loaded,
                                  consumed, bi, piece, h, vb, w),
                scratch_kw=_walk_scratch(cfg, q_ref.dtype, K, o_ref), groups=cfg.groups, w=w,
                rows=K,
                s0_src=s0_ref.at[r, h, :, cols] if cfg.has_s0 else None, s0_loaded=s0_loaded,
                sf_dst=sf_ref.at[r, h, :, cols])


def _operand_tiles(cfg: Walk, K: int) -> tuple[int, int]:
    """(parts, tiles per warpgroup) of the buffer of [64, 64] bf16 operand tiles (below)."""
    parts = 2 if cfg.precise else 1
    return parts, parts if cfg.states_only else max(parts * K // V_BLOCK, 2 * parts)


def _walk_scratch(cfg: Walk, dtype, K: int, o_ref) -> dict:
    """Shared memory of the chunk loop (one scoped allocation). The float32 operands that go
    to the tensor cores (the decayed v, the scores A and the state S) are written as bf16
    parts (hi, and lo with ``precise``) into ``tiles`` [G n, 64, 64], warpgroup w's own
    tiles w n + i: S part p rows 64 j.. at i = p K/64 + j; A part p at i = p, decayed v part p
    at i = parts + p. Within a chunk step S's tiles are read (q S) before A and the decayed v
    are written, and rewritten (for the next chunk) after those are read, so they share the
    memory: with ``precise`` at K = 128 and float32 o, separate buffers for two warpgroups
    would exceed the 227 KiB of shared memory."""
    G, S, C, Vb = cfg.groups, STAGES, CHUNK, V_BLOCK
    scratch = dict(k_smem=tiled_smem((S, C, K), dtype),
                   v_smem=tiled_smem((G, S, C, Vb), dtype),    # one block per warpgroup
                   bc_smem=plgpu.SMEM((S, C), jnp.float32),    # b, read as a column
                   br_smem=plgpu.SMEM((S, C), jnp.float32),    # b, read as a row
                   tiles=tiled_smem((G * _operand_tiles(cfg, K)[1], C, Vb), dtype))
    if cfg.states_only:
        return scratch
    o_tile = (tiled_smem((G, C, Vb), dtype) if o_ref.dtype == dtype
              else plgpu.SMEM((G, C, Vb), o_ref.dtype))
    return dict(scratch, q_smem=tiled_smem((S, C, K), dtype), o_smem=o_tile)


def _walk(cfg: Walk, q_ref, k_ref, v_ref, b_ref, o_ref, loaded, consumed, bi, piece, h, vb, w,
          state, *, k_smem, v_smem, bc_smem, br_smem, tiles, q_smem=None, o_smem=None):
    """The chunk loop of one warpgroup; returns its final state block."""
    K, C, Vb, N = k_smem.shape[-1], CHUNK, V_BLOCK, cfg.chunks
    P, per_warpgroup = _operand_tiles(cfg, K)
    R = K // Vb                                             # S's row blocks of 64
    tile = lambda i: tiles.at[w * per_warpgroup + i]        # this warpgroup's tile i
    a_parts = [tile(p) for p in range(P)]
    vd_parts = [tile((0 if cfg.states_only else P) + p) for p in range(P)]
    s_blocks = [[tile(p * R + j) for p in range(P)] for j in range(R)]  # S rows 64 j.., parts

    def store_state(state):
        for j, parts in enumerate(s_blocks):
            store_split(parts, state[j * Vb:(j + 1) * Vb])

    def q_times_state(q_tile):
        return [(q_tile.at[:, pl.ds(j * Vb, Vb)], s) for j, parts in enumerate(s_blocks)
                for s in parts]

    cols = pl.ds((vb * cfg.groups + w) * Vb, Vb)
    wgmma_layout = plgpu.Layout.WGMMA
    chunk_at = ((lambda n: piece * N + N - 1 - n) if cfg.reverse else (lambda n: piece * N + n))

    def issue_loads(n, slot):
        rows = pl.ds(chunk_at(n) * C, C)
        bar = loaded.at[slot]
        if not cfg.states_only:
            plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, h], q_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, h], k_smem.at[slot], bar)
        for g in range(cfg.groups):
            v_cols = pl.ds((vb * cfg.groups + g) * Vb, Vb)
            plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, h, v_cols], v_smem.at[g, slot], bar)
        if cfg.gated:  # b twice: one buffer per register layout (column, row) it is read in
            for b_smem in (bc_smem, br_smem):
                plgpu.copy_gmem_to_smem(b_ref.at[bi, h, rows], b_smem.at[slot], bar)

    ring = TileRing(issue_loads, stages=STAGES, num_chunks=N, groups=cfg.groups, w=w, consumed=consumed)
    ring.prefill()
    if not cfg.states_only:
        store_state(state)
        plgpu.commit_smem()
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=wgmma_layout)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=wgmma_layout)
    causal = row <= col if cfg.reverse else row >= col

    def chunk_step(n, state):
        slot = jax.lax.rem(n, STAGES)
        plgpu.barrier_wait(loaded.at[slot])
        q_tile, k_tile, v_tile = (None if cfg.states_only else q_smem.at[slot], k_smem.at[slot],
                                  v_smem.at[w, slot])
        if not cfg.states_only:
            scores, o = summed_products((wgmma_zeros((C, C)), wgmma_zeros((C, Vb))),
                                        ([(q_tile, transposed(k_tile))], q_times_state(q_tile)),
                                        cfg.interpret)
        v_val = plgpu.layout_cast(v_tile[...], wgmma_layout).astype(jnp.float32)
        if cfg.gated:
            b_col = plgpu.layout_cast(bc_smem[slot], wgmma_layout.reduce(1))
            b_last = bc_smem[slot, C - 1]
            reads, writes = jnp.exp(b_col), jnp.exp(b_last - b_col)  # e^{b}, e^{beta - b}
            if cfg.reverse:
                reads, writes = writes, reads
            v_val = v_val * per_row(writes, (C, Vb))
            state = state * jnp.exp(b_last)
            if not cfg.states_only:
                b_row = plgpu.layout_cast(br_smem[slot], wgmma_layout.reduce(0))
                diff = per_row(b_col, (C, C)) - per_col(b_row, (C, C))
                scores = scores * jnp.exp(jnp.where(causal, -diff if cfg.reverse else diff, 0.0))
                o = o * per_row(cfg.scale * reads, (C, Vb))
        elif not cfg.states_only:
            o = o * cfg.scale
        store_split(vd_parts, v_val)
        update = [(transposed(k_tile), vd) for vd in vd_parts]
        if cfg.states_only:
            plgpu.commit_smem()
            (state,) = summed_products((state,), (update,), cfg.interpret)
        else:
            store_split(a_parts, jnp.where(causal, scores * cfg.scale, 0.0))
            plgpu.commit_smem()
            o, state = summed_products((o, state), ([(a, v_tile) for a in a_parts], update),
                                       cfg.interpret)
        ring.release(n, slot)  # every read of this slot is done

        if not cfg.states_only:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous o has left o_smem
            o_smem[w] = o.astype(o_smem.dtype)
            store_state(state)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[w], o_ref.at[bi, pl.ds(chunk_at(n) * C, C), h, cols])
        return state

    state = jax.lax.fori_loop(0, N, chunk_step, state)
    if not cfg.states_only:
        plgpu.wait_smem_to_gmem(0)
    return state


def walk(q: jax.Array | None, k: jax.Array, v: jax.Array, b: jax.Array | None,
         s0: jax.Array | None, *, scale: float, pieces: int = 1, reverse: bool = False,
         states_only: bool = False, precise: bool = False, out_dtype: Any = None,
         groups: int | None = None, interpret: Any = None) -> tuple[jax.Array | None, jax.Array]:
    """The kernel call. q, k [B, Tp, H, K], v [B, Tp, H, V] bf16 with Tp a multiple of
    ``pieces`` * CHUNK (q unused, may be None, with ``states_only``); b [B, H, Tp] float32
    chunk-local cumulative log gates, or None (no gate); s0 [B * pieces, H, K, V] float32 the
    state handed to each piece (row = batch row * pieces + piece), or None (zeros).
    ``groups``: warpgroups (V blocks of 64) per CTA, sharing its q/k tiles; default all of V's
    up to 2 (V = 128: one CTA per head, batch row and piece). ``precise``: S, A and the decayed
    v as bf16 hi + lo parts (module docstring).
    Returns (o [B, Tp, H, V] in ``out_dtype`` (default k's), or None with ``states_only``;
    each piece's final state [B * pieces, H, K, V] float32)."""
    B, Tp, H, K = k.shape
    V = v.shape[-1]
    num_chunks = Tp // CHUNK
    groups = min(2, V // V_BLOCK) if groups is None else groups
    if Tp % (pieces * CHUNK) or V % (V_BLOCK * groups) or K not in HEAD_DIMS:
        raise ValueError(f"walk: T={Tp} must be a multiple of pieces*{CHUNK}={pieces * CHUNK}, "
                         f"V={V} of {V_BLOCK}*groups={V_BLOCK * groups}, K={K} in {HEAD_DIMS}")
    cfg = Walk(num_chunks // pieces, pieces, float(scale), b is not None, reverse, states_only,
               s0 is not None, precise, groups, interpret is not None)
    placeholder = lambda shape: jnp.zeros(shape, jnp.float32)  # never read
    b = b if cfg.gated else placeholder((1, 1, CHUNK))
    s0 = s0 if cfg.has_s0 else placeholder((1, 1, K, V_BLOCK))
    q = k if q is None else q  # never read with states_only
    out_dtype = jnp.dtype(k.dtype if out_dtype is None else out_dtype)
    state_type = jax.ShapeDtypeStruct((B * pieces, H, K, V), jnp.float32)
    out_type = ((state_type,) if states_only
                else (jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype), state_type))
    copies = (0 if states_only else 1) + 1 + cfg.groups + (2 if cfg.gated else 0)
    outs = launch_walk(functools.partial(_kernel, cfg), (q, k, v, b, s0), out_type=out_type,
                       copies=copies, stages=STAGES, groups=cfg.groups,
                       grid=(V // (V_BLOCK * groups), H, B * pieces), interpret=interpret,
                       name=kernel_name("linear_walk", reverse=reverse, states=states_only,
                                        precise=precise))
    return (None, outs[0]) if states_only else tuple(outs)
