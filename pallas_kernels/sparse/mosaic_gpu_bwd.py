"""Backward Hopper (Mosaic GPU) kernels of block-sparse flash attention.

With lse2 saved by the forward and delta = rowsum(dO ⊙ O) (XLA), every visited pair of a
64-query and a 64-key tile gives (base-2 logits as in the forward, ``mosaic_gpu_util``)

    p  = exp2(s2 - lse2)  (0 on masked pairs),   dp = dO v^T,   ds = p (dp - delta)
    dq += scale ds k,     dk += scale ds^T q,    dv += p^T dO

in two kernels, each with two consumer warpgroups and a TMA producer warpgroup as in the
forward, and no atomics. Both launch like the forward: by default one CTA per item (an H100
ran the causal anchor's forward+backward in 4.75 ms so, 6.11 ms with one CTA per SM:
experiments/results/h100_2026-11-23_s5_call2/ab.log; ``CTAS`` = fewer gives a persistent
grid), the items in the order of ``mosaic_gpu_util.Schedule`` (heads in
L2-sized groups, CTA c taking items c, c + ctas, ...), every warpgroup walking the CTA's items
in turn:

* dq: items (query block of 128 rows, q head, batch row), query blocks longest-first for a
  causal mask (the last first), head groups whose k and v fit in ``L2_BYTES``. Each consumer
  owns 64 rows: q, dO, lse2, delta (and segment ids) resident in SMEM, dq in registers; it
  walks the item's forward visit list; the producer brings each visited 128-key block of k and
  v into a STAGES-deep ring, which the consumers take as two 64-key halves (s, dp: [64, 64]
  float32, so s, dp and dq fit in the registers).
* dk/dv: items (key block of 128, k/v head, batch row), key blocks in increasing order (the
  longest first for a causal mask), head groups whose q, dO, lse2 and delta fit in
  ``L2_BYTES``. Each consumer owns 64 keys: k, v (and segment ids) resident, dk and dv in
  registers, computed transposed (s^T = k q^T); it walks the transposed visit list of every q
  head of its group in turn (GQA: dk and dv summed in registers over the group); the producer
  brings each visited 128-row block of q, dO, lse2 and delta, taken as two 64-row halves.

The ring's step counter runs on across a CTA's items (``for_each_item``), so the producer
fills the ring with the next item's first blocks while the consumers finish the current one.
SMEM at D = Dv = 128: the resident tiles take 64 KiB and the ring 128 KiB (plus 1 to 2 KiB
of row vectors), so the resident tiles cannot be double-buffered (256 KiB); they are reloaded
per item instead: dq's dO, lse2, delta and segment ids are requested as soon as the item's visits
are done, its q (whose tile takes the dq result for the TMA store) once that store has read
it; dk/dv's k, v and segment ids once the dk, dv stores (from the k, v tiles) have read them.
Speed: the persistent launch is meant to hide the per-CTA load, ring prefill and store latency
of a launch of one CTA per item; it has not been timed on the GPU yet.

Padded query rows (>= T) and rows that saw nothing have lse2 = +inf (set by the forward), so
their p and ds are exactly 0: padded rows add nothing to dk and dv whatever their q, dO and
delta hold (the op pads dO with zeros, but the kernel does not rely on it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import (per_col, per_row, pl, plgpu, tiled_smem,
                                              wgmma_zeros)
from pallas_kernels.sparse.mosaic_gpu_fwd import (BLOCK_K, BLOCK_Q, CONSUMER_REGISTERS, CONSUMERS,
                                                  PRODUCER_REGISTERS, STAGES, WG_ROWS)
from pallas_kernels.sparse.mosaic_gpu_util import (L2_BYTES, Schedule, Walk, for_each_item,
                                                   mask_logits, product, refill_wait, scores,
                                                   unpack, visit_count, walk_visits)

HALF = 64  # rows of a visited block taken per step (the wgmma N of s and dp)
# grid size of both kernels (fewer CTAs than items: persistent); None: one CTA per item
CTAS: int | None = None
# per-row / per-column vectors of a wgmma-layout tile
ROW, COL = (plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)) if plgpu else (None, None)


def _roles(cfg: Walk, consumer, producer) -> None:
    """Warpgroups 0 .. CONSUMERS - 1 run ``consumer(wg)``, the last one ``producer()``."""
    wg = jax.lax.axis_index("wg")

    @pl.when(wg < CONSUMERS)
    def _():
        if not cfg.interpreted:
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        consumer(wg)

    @pl.when(wg == CONSUMERS)
    def _():
        if not cfg.interpreted:
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        producer()


def _launch(cfg: Walk, kernel, sched: Schedule, out_type, *args):
    return plgpu.kernel(
        functools.partial(kernel, cfg, sched), kernel_name="sparse_bwd", out_type=out_type,
        grid=(sched.ctas,),
        grid_names=("cta",), num_threads=CONSUMERS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": cfg.interpret} if cfg.interpreted else {}),
    )(*args)


def _barriers(cfg: Walk, *, resident_copies: int, ring_copies: int) -> list:
    """Both backward kernels' barriers: each warpgroup's resident tiles of an item loaded (one
    barrier per warpgroup), a ring slot loaded (one per slot), a slot consumed by every
    warpgroup. With segments one segment-id copy joins each load."""
    seg = 1 if cfg.use_segments else 0
    return [plgpu.Barrier(num_arrivals=resident_copies + seg, num_barriers=CONSUMERS),
            plgpu.Barrier(num_arrivals=ring_copies + seg, num_barriers=STAGES),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES)]


def _copy_all(copies, slot, barrier) -> None:
    """TMA of each (gmem source, smem buffer) pair into ``buffer.at[slot]``, all on ``barrier``."""
    for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst.at[slot], barrier)


# ----------------------------------------------------------------------------------------- dq

def _dq_kernel(cfg: Walk, sched: Schedule, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               rows_ref, seg_ref, dq_ref):
    D, Dv, dtype = q_ref.shape[-1], v_ref.shape[-1], q_ref.dtype
    W = CONSUMERS
    scratch = [tiled_smem((W, WG_ROWS, D), dtype),                         # q, then dq
               tiled_smem((W, WG_ROWS, Dv), dtype),                        # dO
               plgpu.SMEM((W, WG_ROWS), jnp.float32),                      # lse2
               plgpu.SMEM((W, WG_ROWS), jnp.float32),                      # delta
               tiled_smem((STAGES, BLOCK_K, D), dtype),                    # k ring
               tiled_smem((STAGES, BLOCK_K, Dv), dtype),                   # v ring
               tiled_smem((W, WG_ROWS, HALF), dtype) if cfg.interpreted else None,  # ds stage
               plgpu.SMEM((W, WG_ROWS), jnp.int32) if cfg.use_segments else None,
               plgpu.SMEM((STAGES, BLOCK_K), jnp.int32) if cfg.use_segments else None]
    barriers = _barriers(cfg, resident_copies=4, ring_copies=2)  # q, dO, lse2, delta | k, v
    row_of = lambda b, h, q_block: cfg.map_row(b, h, q_block, sched.blocks)
    each_item = functools.partial(
        for_each_item, sched, lambda b, h, q_block: rows_ref[row_of(b, h, q_block), 0])

    def body(scratch, barriers):
        q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, stage, qseg, kseg = scratch
        resident, loaded, consumed = barriers

        def consumer(wg):
            def request(item, q: bool, rest: bool):
                """TMA of this warpgroup's resident tiles of ``item``: q and / or the rest."""
                b, h, q_block = sched.coords(item)
                rows = pl.ds(q_block * BLOCK_Q + wg * WG_ROWS, WG_ROWS)
                copies = ((q_ref.at[b, rows, h], q_smem),) if q else ()
                if rest:
                    copies += ((do_ref.at[b, rows, h], do_smem),
                               (lse_ref.at[b, h, rows], lse_smem),
                               (delta_ref.at[b, h, rows], delta_smem)) + (
                                   ((seg_ref.at[b, rows], qseg),) if cfg.use_segments else ())
                _copy_all(copies, wg, resident.at[wg])

            request(jax.lax.axis_index("cta"), True, True)

            def one_item(i, count, item, b, h, q_block, start):
                row = row_of(b, h, q_block)
                first = q_block * BLOCK_Q + wg * WG_ROWS
                rows = pl.ds(first, WG_ROWS)
                plgpu.barrier_wait(resident.at[wg])
                lse = plgpu.layout_cast(lse_smem[wg], ROW)
                delta = plgpu.layout_cast(delta_smem[wg], ROW)
                q_seg = plgpu.layout_cast(qseg[wg], ROW) if cfg.use_segments else None

                def visit(step, _, code, dq):
                    k_block, kind = unpack(code)
                    slot = jax.lax.rem(step, STAGES)
                    plgpu.barrier_wait(loaded.at[slot])
                    for half in range(BLOCK_K // HALF):
                        keys = pl.ds(half * HALF, HALF)
                        k_tile, v_tile = k_ring.at[slot, keys], v_ring.at[slot, keys]
                        s, dp = scores(cfg, (q_smem.at[wg], k_tile), (do_smem.at[wg], v_tile))
                        k_seg = (plgpu.layout_cast(kseg[slot, keys], COL) if cfg.use_segments
                                 else None)
                        s = mask_logits(cfg, s * cfg.log2_scale, kind, first,
                                        k_block * BLOCK_K + half * HALF, q_seg, k_seg)
                        p = jnp.exp2(s - per_row(lse, s.shape))
                        ds = p * (dp - per_row(delta, s.shape))
                        dq = product(dq, ds.astype(dtype), k_tile,
                                     None if stage is None else stage.at[wg], cfg.interpreted)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return dq

                dq = walk_visits(rows_ref, lambda _: row, 1, visit,
                                 wgmma_zeros((WG_ROWS, D)), start=start)
                q_smem[wg] = (dq * cfg.scale).astype(dtype)
                plgpu.commit_smem()  # also: every thread is past its reads of the item's tiles
                has_next = i + 1 < count
                pl.when(has_next)(lambda: request(item + sched.ctas, False, True))
                plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                pl.when(has_next)(lambda: request(item + sched.ctas, True, False))

            each_item(one_item)
            plgpu.wait_smem_to_gmem(0)

        def producer():
            def one_item(i, count, item, b, h, q_block, start):
                kv_head = jax.lax.div(h, cfg.groups)

                def load(step, _, code, carry):
                    keys = pl.ds(unpack(code)[0] * BLOCK_K, BLOCK_K)
                    slot = jax.lax.rem(step, STAGES)
                    refill_wait(step, STAGES, consumed)
                    _copy_all(((k_ref.at[b, keys, kv_head], k_ring),
                               (v_ref.at[b, keys, kv_head], v_ring)) + (
                                   ((seg_ref.at[b, keys], kseg),) if cfg.use_segments else ()),
                              slot, loaded.at[slot])
                    return carry

                walk_visits(rows_ref, lambda _: row_of(b, h, q_block), 1, load, (), start=start)

            each_item(one_item)

        _roles(cfg, consumer, producer)

    pl.run_scoped(body, scratch, barriers, collective_axes="wg")


# -------------------------------------------------------------------------------------- dk, dv

def _dkv_kernel(cfg: Walk, sched: Schedule, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                rows_ref, seg_ref, dk_ref, dv_ref):
    D, Dv, dtype = q_ref.shape[-1], v_ref.shape[-1], q_ref.dtype
    W = CONSUMERS
    keys_per_wg = BLOCK_K // W
    scratch = [tiled_smem((W, keys_per_wg, D), dtype),                     # k, then dk
               tiled_smem((W, keys_per_wg, Dv), dtype),                    # v, then dv
               tiled_smem((STAGES, BLOCK_Q, D), dtype),                    # q ring
               tiled_smem((STAGES, BLOCK_Q, Dv), dtype),                   # dO ring
               plgpu.SMEM((STAGES, BLOCK_Q), jnp.float32),                 # lse2 ring
               plgpu.SMEM((STAGES, BLOCK_Q), jnp.float32),                 # delta ring
               tiled_smem((W, keys_per_wg, HALF), dtype) if cfg.interpreted else None,  # stage
               plgpu.SMEM((W, keys_per_wg), jnp.int32) if cfg.use_segments else None,
               plgpu.SMEM((STAGES, BLOCK_Q), jnp.int32) if cfg.use_segments else None]
    barriers = _barriers(cfg, resident_copies=2, ring_copies=4)  # k, v | q, dO, lse2, delta
    # rows of the transposed visit lists of k/v head hk's q heads hk * groups + g
    rows_of = lambda b, hk, kb: lambda g: cfg.map_row(b, hk * cfg.groups + g, kb, sched.blocks)
    each_item = functools.partial(
        for_each_item, sched, lambda b, hk, kb: visit_count(rows_ref, rows_of(b, hk, kb),
                                                            cfg.groups))

    def body(scratch, barriers):
        k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, stage, kseg, qseg = scratch
        resident, loaded, consumed = barriers

        def consumer(wg):
            def request(item):
                """TMA of this warpgroup's k, v (and segment ids) of ``item``."""
                b, hk, kb = sched.coords(item)
                keys = pl.ds(kb * BLOCK_K + wg * keys_per_wg, keys_per_wg)
                _copy_all(((k_ref.at[b, keys, hk], k_smem), (v_ref.at[b, keys, hk], v_smem)) + (
                    ((seg_ref.at[b, keys], kseg),) if cfg.use_segments else ()),
                          wg, resident.at[wg])

            request(jax.lax.axis_index("cta"))

            def one_item(i, count, item, b, hk, kb, start):
                first = kb * BLOCK_K + wg * keys_per_wg
                keys = pl.ds(first, keys_per_wg)
                plgpu.barrier_wait(resident.at[wg])
                k_seg = plgpu.layout_cast(kseg[wg], ROW) if cfg.use_segments else None

                def visit(step, _, code, carry):
                    dk, dv = carry
                    q_block, kind = unpack(code)
                    slot = jax.lax.rem(step, STAGES)
                    plgpu.barrier_wait(loaded.at[slot])
                    for half in range(BLOCK_Q // HALF):
                        rows = pl.ds(half * HALF, HALF)
                        q_tile, do_tile = q_ring.at[slot, rows], do_ring.at[slot, rows]
                        st, dpt = scores(cfg, (k_smem.at[wg], q_tile), (v_smem.at[wg], do_tile))
                        lse = plgpu.layout_cast(lse_ring[slot, rows], COL)
                        delta = plgpu.layout_cast(delta_ring[slot, rows], COL)
                        q_seg = (plgpu.layout_cast(qseg[slot, rows], COL) if cfg.use_segments
                                 else None)
                        st = mask_logits(cfg, st * cfg.log2_scale, kind,
                                         q_block * BLOCK_Q + half * HALF, first, q_seg, k_seg,
                                         transposed=True)
                        pt = jnp.exp2(st - per_col(lse, st.shape))
                        dst = pt * (dpt - per_col(delta, st.shape))
                        wg_stage = None if stage is None else stage.at[wg]
                        dv = product(dv, pt.astype(dtype), do_tile, wg_stage, cfg.interpreted)
                        dk = product(dk, dst.astype(dtype), q_tile, wg_stage, cfg.interpreted)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return dk, dv

                zeros = (wgmma_zeros((keys_per_wg, D)), wgmma_zeros((keys_per_wg, Dv)))
                dk, dv = walk_visits(rows_ref, rows_of(b, hk, kb), cfg.groups, visit,
                                     zeros, start=start)
                k_smem[wg] = (dk * cfg.scale).astype(dtype)
                v_smem[wg] = dv.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, keys, hk])
                plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, keys, hk])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                pl.when(i + 1 < count)(lambda: request(item + sched.ctas))

            each_item(one_item)
            plgpu.wait_smem_to_gmem(0)

        def producer():
            def one_item(i, count, item, b, hk, kb, start):
                def load(step, g, code, carry):
                    h = hk * cfg.groups + g
                    rows = pl.ds(unpack(code)[0] * BLOCK_Q, BLOCK_Q)
                    slot = jax.lax.rem(step, STAGES)
                    refill_wait(step, STAGES, consumed)
                    _copy_all(((q_ref.at[b, rows, h], q_ring), (do_ref.at[b, rows, h], do_ring),
                               (lse_ref.at[b, h, rows], lse_ring),
                               (delta_ref.at[b, h, rows], delta_ring)) + (
                                   ((seg_ref.at[b, rows], qseg),) if cfg.use_segments else ()),
                              slot, loaded.at[slot])
                    return carry

                walk_visits(rows_ref, rows_of(b, hk, kb), cfg.groups, load, (), start=start)

            each_item(one_item)

        _roles(cfg, consumer, producer)

    pl.run_scoped(body, scratch, barriers, collective_axes="wg")


def schedules(cfg: Walk, Tp: int, Hq: int, Hkv: int, B: int, D: int, Dv: int, itemsize: int
              ) -> tuple[Schedule, Schedule]:
    """Items of the dq kernel (query blocks, last first; a k/v head's k and v read by its
    ``cfg.groups`` q heads) and of the dk/dv kernel (key blocks, first first; a k/v head reads
    its q heads' q, dO, lse2 and delta)."""
    common = dict(l2_bytes=L2_BYTES, ctas=CTAS)
    dq = Schedule.of(cfg.interpreted, Tp // BLOCK_Q, Hq, B, Tp * (D + Dv) * itemsize,
                     shared_by=cfg.groups, **common)
    dkv = Schedule.of(cfg.interpreted, Tp // BLOCK_K, Hkv, B,
                      cfg.groups * Tp * ((D + Dv) * itemsize + 8), shared_by=1,
                      descending=False, **common)
    return dq, dkv


def backward(cfg: Walk, q, k, v, do, lse2, delta, maps: tuple[jax.Array, jax.Array],
             seg: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) in the dtypes of (q, k, v) from [B, Tp, H, *] inputs, lse2 and delta
    [B, Hq, Tp] float32, the packed forward / transposed visit rows, segment ids or None."""
    B, Tp, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    seg = jnp.zeros((1, BLOCK_K), jnp.int32) if seg is None else seg  # placeholder: never read
    fwd_rows, bwd_rows = (r.reshape(-1, r.shape[-1]) for r in maps)
    dq_sched, dkv_sched = schedules(cfg, Tp, Hq, Hkv, B, D, Dv, q.dtype.itemsize)
    inputs = (q, k, v, do, lse2, delta)
    dq = _launch(cfg, _dq_kernel, dq_sched, jax.ShapeDtypeStruct(q.shape, q.dtype), *inputs,
                 fwd_rows, seg)
    dk, dv = _launch(cfg, _dkv_kernel, dkv_sched, (jax.ShapeDtypeStruct(k.shape, k.dtype),
                                                   jax.ShapeDtypeStruct(v.shape, v.dtype)),
                     *inputs, bwd_rows, seg)
    return dq, dk, dv
