"""The delta rule's forward walk with warp specialisation (Hopper, Mosaic GPU): the math of
``mosaic_gpu_kernel``'s forward, split over two warpgroups per V block of 64 columns so that
only the state recurrence is on the sequential path.

With one warpgroup per V block (``mosaic_gpu_kernel``) every chunk costs the state's three
rounds of products plus the output's (S^T q^T, q k^T, the masked decayed scores A, Δ^T A^T)
and their elementwise work, all in one instruction stream: at T = 16k, B = 2, H = 16 (64
CTAs, latency-bound) the gated forward took 0.743 ms for 256 chunks on the H100 (2.9 µs a
chunk), jax-linear-attention 0.555 ms (2.2 µs; it splits the work the same way as below; run
h100_2026-11-24_s7_call2). Here, per chunk n (C = 64, notation of
``mosaic_gpu_kernel``):

    state warpgroup (w = 1), the sequential path, S^T [64, K] float32 in registers:
        Y^T = v^T - (S^T k^T) ⊙ Γ,   Δ^T = Y^T T_β^T             (left operands: registers)
        hand S (bf16 [K, 64]) and Δ (bf16 [C, 64]) over in shared memory (two slots, barriers
        ``ready`` / ``free``),
        S_next^T = γ S^T + (Δ^T ⊙ λ) k
    output warpgroup (w = 0), one chunk behind at most, also the TMA producer:
        A = scale (q k^T ⊙ D) masked (before the handover arrives),
        o = scale Γ ⊙ (q S) + A Δ                                      (shared-memory operands)
        o -> HBM.
    With ``save_states`` the state warpgroup also stores the handed-over S (TMA) as the saved
    state of the chunk.

The output side reads S and Δ rounded to bf16, as the one-warpgroup walk's products do
(there its register operands are rounded too), so both walks give the same results up to the
order of float32 sums. Shared memory at K = 128 (bf16 tiles, two ring stages): q, k 64 KB,
T_β, v 32 KB, the two handover slots 48 KB, A and the o tile 16 KB, the float32 carry's
staging 32 KB, vectors ~3 KB: ~195 KB, one CTA per SM.

Scope: the plain and the vjp forward (``save_states``) at one V block per CTA; the piece-map
pass and the reverse walk stay in ``mosaic_gpu_kernel``. ``walk`` runs it for every forward
while ``mosaic_gpu_kernel.WARP_SPECIALIZED`` is set (it is off: not yet timed or checked on a
GPU; where it wins, latency-bound small B·H or also the throughput-bound large B·H that
``default_groups`` gives two V blocks per CTA, is for the benchmark to say).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.delta.mosaic_gpu_kernel import CHUNK, STAGES, V_BLOCK, Gate, Walk
from pallas_kernels.mosaic_gpu_common import (SWIZZLE, Registers, TileRing, launch_walk,
                                              load_transposed, per_col, per_row, pl, plgpu,
                                              products, tiled_smem, transposed, wgmma_zeros)

F32 = jnp.float32
OUTPUT, STATE = 0, 1  # warpgroup roles (warpgroup 0 issues the TMA ring's copies)


def _state_loop(cfg: Walk, refs, ring, state_t, save):
    """The state warpgroup's chunk loop; returns the final S^T. ``save(n, hand)``: with
    ``save_states``, the TMA store of the handed-over S of chunk n (else None)."""
    loaded, ready, free = refs["loaded"], refs["ready"], refs["free"]
    C, Vb, dtype = CHUNK, refs["v"].shape[-1], refs["k"].dtype

    def chunk_step(n, state_t):
        slot, hand = jax.lax.rem(n, ring.stages), jax.lax.rem(n, 2)
        plgpu.barrier_wait(loaded.at[slot])
        k, tb, v = refs["k"].at[slot], refs["m"].at[slot], refs["v"].at[slot]
        s_lo = Registers(state_t.astype(dtype), refs["stage"][0])
        (ks_t,) = products((wgmma_zeros((Vb, C)),), ((s_lo, transposed(k)),), cfg.interpret)
        if cfg.gated:  # b along the columns and its last value only (no [C, C] decay here)
            b_row = plgpu.layout_cast(refs["br"][slot], plgpu.Layout.WGMMA.reduce(0))
            b_last = refs["bc"][slot, C - 1]
            ks_t = ks_t * per_col(jnp.exp(b_row), (Vb, C))
        y_t = load_transposed(v).astype(F32) - ks_t
        plgpu.barrier_wait(free.at[hand])  # the output side is done with this slot
        if save is not None:  # and so is the TMA store of chunk n - 2's saved state
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)

        def hand_over_state():
            transposed(refs["s_hand"].at[hand])[...] = state_t.astype(dtype)

        (delta_t,) = products((wgmma_zeros((Vb, C)),),
                              ((Registers(y_t.astype(dtype), refs["stage"][1]), transposed(tb)),),
                              cfg.interpret, during=hand_over_state)
        transposed(refs["d_hand"].at[hand])[...] = delta_t.astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(ready.at[hand])
        if save is not None:
            save(n, hand)
        if cfg.gated:
            delta_t = delta_t * per_col(jnp.exp(b_last - b_row), (Vb, C))
            state_t = state_t * jnp.exp(b_last)
        (state_t,) = products((state_t,), ((Registers(delta_t.astype(dtype), refs["stage"][1]),
                                            k),), cfg.interpret)
        ring.release(n, slot)
        return state_t

    return jax.lax.fori_loop(0, cfg.chunks, chunk_step, state_t)


def _output_loop(cfg: Walk, refs, ring, o_ref, where) -> None:
    """The output warpgroup's chunk loop (it also refills the TMA ring)."""
    bi, h, cols = where
    loaded, ready, free = refs["loaded"], refs["ready"], refs["free"]
    C, Vb = CHUNK, refs["v"].shape[-1]
    layout = plgpu.Layout.WGMMA
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=layout)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=layout)
    causal = row >= col
    for hand in range(2):  # both handover slots start free
        plgpu.barrier_arrive(free.at[hand])

    def chunk_step(n, carry):
        slot, hand = jax.lax.rem(n, ring.stages), jax.lax.rem(n, 2)
        plgpu.barrier_wait(loaded.at[slot])
        q, k = refs["q"].at[slot], refs["k"].at[slot]
        (scores,) = products((wgmma_zeros((C, C)),), ((q, transposed(k)),), cfg.interpret)
        if cfg.gated:
            gate = Gate.read(refs["bc"], refs["br"], slot, row, col)
            scores = scores * jnp.exp(jnp.where(causal, gate.diff(), 0.0))
        refs["a"][...] = jnp.where(causal, scores * cfg.scale, 0.0).astype(refs["a"].dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(ready.at[hand])
        qs, o = products((wgmma_zeros((C, Vb)), wgmma_zeros((C, Vb))),
                         ((q, refs["s_hand"].at[hand]), (refs["a"], refs["d_hand"].at[hand])),
                         cfg.interpret)
        ring.release(n, slot)
        plgpu.barrier_arrive(free.at[hand])
        factor = per_row(cfg.scale * jnp.exp(gate.b_col), (C, Vb)) if cfg.gated else cfg.scale
        o = o + qs * factor
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last o has left its tile
        refs["o"][...] = o.astype(refs["o"].dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(refs["o"], o_ref.at[bi, pl.ds(n * C, C), h, cols])
        return carry

    jax.lax.fori_loop(0, cfg.chunks, chunk_step, 0)


def _kernel(cfg: Walk, q_ref, k_ref, m_ref, x_ref, b_ref, s0_ref, *refs):
    """One CTA: V block ``vb`` (64 columns), head ``h``, batch row ``bi``; two warpgroups."""
    refs = list(refs)
    o_ref = refs.pop(0)
    states_ref = refs.pop(0) if cfg.save_states else None
    sf_ref, loaded, consumed, s0_loaded, ready, free = refs
    vb, h, bi = (jax.lax.axis_index(n) for n in ("vblocks", "heads", "rows"))
    w = jax.lax.axis_index("wg")
    K, C, Vb, stages = k_ref.shape[-1], CHUNK, V_BLOCK, STAGES
    cols = pl.ds(vb * Vb, Vb)
    dtype = k_ref.dtype
    f32_tile = plgpu.SMEM((Vb, K), F32, transforms=(plgpu.TilingTransform((8, 32)),
                                                     plgpu.SwizzleTransform(SWIZZLE)))
    scratch = dict(
        q=tiled_smem((stages, C, K), dtype), k=tiled_smem((stages, C, K), dtype),
        m=tiled_smem((stages, C, C), dtype), v=tiled_smem((stages, C, Vb), dtype),
        bc=plgpu.SMEM((stages, C), F32), br=plgpu.SMEM((stages, C), F32),
        s_hand=tiled_smem((2, K, Vb), dtype), d_hand=tiled_smem((2, C, Vb), dtype),
        a=tiled_smem((C, C), dtype), o=tiled_smem((C, Vb), dtype), carry=f32_tile)
    if cfg.interpret:  # staging of the state side's register operands
        scratch.update(stage_s=tiled_smem((Vb, K), dtype), stage_y=tiled_smem((Vb, C), dtype))

    def body(**bufs):
        bufs.update(loaded=loaded, ready=ready, free=free,
                    stage=(bufs.pop("stage_s", None), bufs.pop("stage_y", None)))

        def issue_loads(n, slot):
            rows = pl.ds(n * C, C)
            bar = loaded.at[slot]
            for ref, name in ((q_ref, "q"), (k_ref, "k"), (m_ref, "m")):
                plgpu.copy_gmem_to_smem(ref.at[bi, rows, h], bufs[name].at[slot], bar)
            plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, h, cols], bufs["v"].at[slot], bar)
            if cfg.gated:  # b twice: one buffer per register layout it is read in
                for name in ("bc", "br"):
                    plgpu.copy_gmem_to_smem(b_ref.at[bi, h, rows], bufs[name].at[slot], bar)

        ring = TileRing(issue_loads, stages=stages, num_chunks=cfg.chunks, groups=2, w=w,
                        consumed=consumed)
        ring.prefill()

        @pl.when(w == STATE)
        def _():
            carry = bufs["carry"]
            if cfg.has_s0:
                plgpu.copy_gmem_to_smem(s0_ref.at[bi, h, cols, :], carry, s0_loaded.at[STATE])
                plgpu.barrier_wait(s0_loaded.at[STATE])
                state_t = plgpu.layout_cast(carry[...], plgpu.Layout.WGMMA)
            else:
                state_t = wgmma_zeros((Vb, K))
            save = None
            if cfg.save_states:
                save = lambda n, hand: plgpu.copy_smem_to_gmem(
                    bufs["s_hand"].at[hand], states_ref.at[bi, n, h, :, cols])
            state_t = _state_loop(cfg, bufs, ring, state_t, save)
            carry[...] = state_t
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(carry, sf_ref.at[bi, h, cols, :])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(w == OUTPUT)
        def _():
            _output_loop(cfg, bufs, ring, o_ref, (bi, h, cols))
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(body, **scratch, collective_axes="wg")


def launch(cfg: Walk, args: tuple[jax.Array, ...], out_type: list[Any],
           interpret: Any) -> tuple[jax.Array, ...]:
    """The kernel launch for ``mosaic_gpu_kernel._launch``: args (q, k, T_β, v, b, s0) and
    out_type as there (the forward's carry as S^T: s0 and the final state [B, H, V, K])."""
    B, _, H, _ = args[1].shape
    V = args[3].shape[-1]
    copies = 4 + (2 if cfg.gated else 0)
    return launch_walk(functools.partial(_kernel, cfg), args, out_type=out_type,
                       copies=copies, stages=STAGES, groups=2, grid=(V // V_BLOCK, H, B),
                       interpret=interpret, approx_math=True, name="delta_walk_ws",
                       barriers=[plgpu.Barrier(num_arrivals=1, num_barriers=2),    # ready
                                 plgpu.Barrier(num_arrivals=1, num_barriers=2)])   # free
