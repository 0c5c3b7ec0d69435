"""Forward Hopper (Mosaic GPU) kernel of block-sparse flash attention.

Work items are (query block of BLOCK_Q = 128 rows, q head h, batch row b). Their order
(``mosaic_gpu_util.Schedule``, shared with the backward): the heads hb = b Hq + h in groups
whose k and v fit in L2 (``L2_BYTES``), group after group; within a group, query block nq - 1
first, then nq - 2, ..., each for the group's heads in turn. So the items of a causal mask
come longest-first within a group, and the CTAs running at one time read the k/v of a few
heads (L2 hits rather than HBM reads). A grid of ``ctas`` CTAs (``mosaic_gpu_util.launch_ctas``:
by default one per item, which the GPU starts in item order; ``CTAS`` = fewer gives a persistent
grid), CTA c taking items c, c + ctas, c + 2 ctas, ... (a static stride: in each round the
CTAs get items of similar length, and as the stride is not a multiple of the group's head
count each CTA's query blocks drift through all lengths over its rounds). Each CTA has three
warpgroups that walk the same items in the same order:

* warpgroups 0 and 1 (consumers) own 64 query rows each. Their q tile comes by TMA into one of
  two buffers: item i's tile into buffer i % 2, and item i + 1's is requested as soon as item
  i's visits are done, so it arrives while item i's epilogue runs. When Dv = D, item i's o
  tile is written over its own q buffer (free once its visits are done);
* warpgroup 2 (producer, few registers) walks the items' visit lists (``visit_rows``) and brings
  the visited key / value blocks of BLOCK_K = 128 rows (and their segment ids) by TMA into a
  STAGES-deep ring: slot ``step % STAGES`` is refilled once both consumers have signalled that
  they are done with its keys (resp. values). ``step`` counts visits across the CTA's items, so
  the producer fills the ring with the next item's first key blocks while the consumers finish
  the current item. GQA: the k/v head is ``h // groups`` in the TMA source; k and v are never
  repeated.

Per visit v (key block j, kind from the block map), each consumer keeps per row, in registers,

    s2  = log2(e) scale q k_j^T                   (wgmma, float32 [64, 128]; -inf where masked)
    m'  = max(m, max_k s2),    p = exp2(s2 - m'),   alpha = exp2(m - m')
    l'  = alpha l + sum_k p,   acc' = alpha acc + p v_j      (wgmma, p in bf16)

masking only visits that need it (``mosaic_gpu_util.mask_logits``: PARTIAL by the mask's
formula, PAD_ONLY by k < T, every visit by segment ids when given). A row that saw nothing
keeps m = -inf and l = 0 (the exponent base is then taken as 0, so no NaN appears) and gets
o = 0, lse2 = +inf. Padded query rows (>= T) get lse2 = +inf too, so their recomputed weights
are exactly 0 in both backward kernels whatever their q, dO and delta hold. Outputs o = acc / l
(bf16, by TMA) and lse2 = m + log2 l (float32 [B, H, Tp]: base-2 log-sum-exp, for the
backward); an item's stores are awaited (their reads of shared memory) only before the next
item's epilogue and q request reuse those buffers.

Turn taking (``PINGPONG``, the FA3 schedule): a two-arrival barrier that each consumer passes
right after issuing its q k^T wgmma and again after its softmax, warpgroup 1 one pass ahead of
warpgroup 0 for the whole launch (the two walk the same visits, so the passes pair up, across
items too); so one consumer's softmax runs while the other's products occupy the tensor cores.

Speed (H100, experiments/results/h100_2026-11-23_s5_call2/ab.log): at the causal anchor one CTA
per item took 1.06 ms and a persistent grid of one CTA per SM 1.15 ms (equal at full T = 16k),
so one CTA per item is the default; the item order alone took the forward from 1.63 ms (session
4, per-head order) to 1.06.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import per_row, pl, plgpu, tiled_smem, wgmma_zeros
from pallas_kernels.sparse.mosaic_gpu_util import (L2_BYTES, LOG2E, Schedule, Walk, for_each_item,
                                                   mask_logits, product, refill_wait, scores,
                                                   unpack, walk_visits)

BLOCK_Q = 128       # query rows per item (two consumer warpgroups of WG_ROWS)
WG_ROWS = 64        # rows of one consumer warpgroup (the wgmma M)
BLOCK_K = 128       # keys per visited block
STAGES = 2          # depth of the k/v TMA ring
Q_BUFFERS = 2       # q tiles per consumer: the current item's and the next one's
CONSUMERS = 2
CONSUMER_REGISTERS = 232
PINGPONG = True     # consumers take turns on the tensor cores (module docstring)
PRODUCER_REGISTERS = 40
CTAS: int | None = None   # grid size (fewer than the items: persistent); None: one per item


def schedule(cfg: Walk, blocks: int, heads: int, batch: int, kv_head_bytes: int) -> Schedule:
    """The forward's items: query blocks longest-first, head groups whose k and v fit in
    ``L2_BYTES`` (a k/v head's bytes count once for its ``cfg.groups`` q heads)."""
    return Schedule.of(cfg.interpreted, blocks, heads, batch, kv_head_bytes, shared_by=cfg.groups,
                       l2_bytes=L2_BYTES, ctas=CTAS)


def _kernel(cfg: Walk, sched: Schedule, q_ref, k_ref, v_ref, rows_ref, seg_ref, o_ref, lse_ref):
    D, Dv = q_ref.shape[-1], v_ref.shape[-1]
    dtype = q_ref.dtype
    q_tiles = Q_BUFFERS * CONSUMERS  # tile of buffer n, consumer wg: n * CONSUMERS + wg
    seg_ids = [plgpu.SMEM((q_tiles, WG_ROWS), jnp.int32),                  # of the q rows
               plgpu.SMEM((STAGES, BLOCK_K), jnp.int32)                    # of the k ring
               ] if cfg.use_segments else [None, None]
    scratch = [tiled_smem((q_tiles, WG_ROWS, D), dtype),             # q (then o when Dv = D)
               None if Dv == D else tiled_smem((CONSUMERS, WG_ROWS, Dv), dtype),  # o
               tiled_smem((STAGES, BLOCK_K, D), dtype),              # k ring
               tiled_smem((STAGES, BLOCK_K, Dv), dtype),             # v ring
               tiled_smem((CONSUMERS, WG_ROWS, BLOCK_K), dtype) if cfg.interpreted else None,
               plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32),        # lse2
               *seg_ids]
    copies = 2 if cfg.use_segments else 1
    barriers = [plgpu.Barrier(num_arrivals=copies, num_barriers=q_tiles),     # q loaded
                plgpu.Barrier(num_arrivals=copies, num_barriers=STAGES),      # k loaded
                plgpu.Barrier(num_barriers=STAGES),                           # v loaded
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES),   # k consumed
                plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=STAGES),   # v consumed
                plgpu.Barrier(num_arrivals=CONSUMERS)]                        # turn taking
    body = functools.partial(_body, cfg, sched, q_ref, k_ref, v_ref, rows_ref, seg_ref,
                             o_ref, lse_ref)
    pl.run_scoped(body, scratch, barriers, collective_axes="wg")


def _body(cfg: Walk, sched: Schedule, q_ref, k_ref, v_ref, rows_ref, seg_ref, o_ref, lse_ref,
          scratch, barriers):
    q_smem, o_smem, k_smem, v_smem, p_smem, lse_smem, qseg_smem, kseg_smem = scratch
    q_loaded, k_loaded, v_loaded, k_consumed, v_consumed, turns = barriers
    wg = jax.lax.axis_index("wg")
    row_of = lambda b, h, q_block: cfg.map_row(b, h, q_block, sched.blocks)
    each_item = functools.partial(
        for_each_item, sched, lambda b, h, q_block: rows_ref[row_of(b, h, q_block), 0])

    @pl.when(wg < CONSUMERS)
    def _consumer():
        if not cfg.interpreted:
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        Dv = v_smem.shape[-1]

        def request_q(item, buffer):
            """TMA of this warpgroup's q rows (and their segment ids) of ``item``."""
            b, h, q_block = sched.coords(item)
            rows = pl.ds(q_block * BLOCK_Q + wg * WG_ROWS, WG_ROWS)
            tile = buffer * CONSUMERS + wg
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[tile], q_loaded.at[tile])
            if cfg.use_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], qseg_smem.at[tile],
                                        q_loaded.at[tile])

        def take_turn():
            plgpu.barrier_arrive(turns)
            plgpu.barrier_wait(turns)

        request_q(jax.lax.axis_index("cta"), 0)
        if PINGPONG:
            pl.when(wg == 1)(take_turn)

        def consume(i, count, item, b, h, q_block, start):
            row = row_of(b, h, q_block)
            buffer = jax.lax.rem(i, Q_BUFFERS)
            tile = buffer * CONSUMERS + wg
            first = q_block * BLOCK_Q + wg * WG_ROWS
            rows = pl.ds(first, WG_ROWS)
            plgpu.barrier_wait(q_loaded.at[tile])
            q_seg = (plgpu.layout_cast(qseg_smem[tile], row_layout) if cfg.use_segments else None)
            m = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), row_layout)
            l = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), row_layout)
            acc = wgmma_zeros((WG_ROWS, Dv))

            def visit(step, _, code, carry):
                acc, m, l = carry
                k_block, kind = unpack(code)
                slot = jax.lax.rem(step, STAGES)
                plgpu.barrier_wait(k_loaded.at[slot])
                (s,) = scores(cfg, (q_smem.at[tile], k_smem.at[slot]),
                              after_issue=take_turn if PINGPONG else None)
                k_seg = (plgpu.layout_cast(kseg_smem[slot], plgpu.Layout.WGMMA.reduce(0))
                         if cfg.use_segments else None)
                plgpu.barrier_arrive(k_consumed.at[slot])
                s = mask_logits(cfg, s * cfg.log2_scale, kind, first, k_block * BLOCK_K, q_seg,
                                k_seg)
                m_new = jnp.maximum(m, jnp.max(s, axis=1))
                base = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
                p = jnp.exp2(s - per_row(base, s.shape))
                alpha = jnp.exp2(m - base)
                l = l * alpha + jnp.sum(p, axis=1)
                acc = acc * per_row(alpha, acc.shape)
                if PINGPONG:
                    plgpu.barrier_arrive(turns)
                plgpu.barrier_wait(v_loaded.at[slot])
                if PINGPONG:
                    plgpu.barrier_wait(turns)
                acc = product(acc, p.astype(v_smem.dtype), v_smem.at[slot],
                              None if p_smem is None else p_smem.at[wg], cfg.interpreted)
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l

            acc, m, l = walk_visits(rows_ref, lambda _: row, 1, visit,
                                    (acc, m, l), start=start)
            # the previous item's o and lse2 stores have read their tiles (the other q
            # buffer, o_smem, lse_smem): both can be overwritten now
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            @pl.when(i + 1 < count)
            def _():
                request_q(item + sched.ctas, Q_BUFFERS - 1 - buffer)

            seen = l > 0.0
            l_safe = jnp.where(seen, l, 1.0)
            o = acc * per_row(jnp.where(seen, 1.0 / l_safe, 0.0), acc.shape)
            lse_smem[wg] = jnp.where(seen & _real_rows(cfg, first, row_layout),
                                     m + jnp.log(l_safe) * LOG2E, jnp.inf)
            o_tile = q_smem.at[tile] if o_smem is None else o_smem.at[wg]
            o_tile[...] = o.astype(o_tile.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_tile, o_ref.at[b, rows, h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])

        each_item(consume)
        if PINGPONG:
            pl.when(wg == 0)(take_turn)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        if not cfg.interpreted:
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

        def produce(i, count, item, b, h, q_block, start):
            row = row_of(b, h, q_block)
            kv_head = jax.lax.div(h, cfg.groups)

            def load(step, _, code, carry):
                keys = pl.ds(unpack(code)[0] * BLOCK_K, BLOCK_K)
                slot = jax.lax.rem(step, STAGES)
                refill_wait(step, STAGES, k_consumed)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot],
                                        k_loaded.at[slot])
                if cfg.use_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, keys], kseg_smem.at[slot],
                                            k_loaded.at[slot])
                refill_wait(step, STAGES, v_consumed)
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot],
                                        v_loaded.at[slot])
                return carry

            walk_visits(rows_ref, lambda _: row, 1, load, (), start=start)

        each_item(produce)


def _real_rows(cfg: Walk, first, layout) -> jax.Array | bool:
    """True on the rows first .. first + WG_ROWS - 1 that are real queries (< T), in ``layout``;
    plain True when T needs no padding."""
    if cfg.meta.padded_len == cfg.meta.seq_len:
        return True
    rows = first + plgpu.broadcasted_iota(jnp.int32, (WG_ROWS,), 0, layout=layout)
    return rows < cfg.meta.seq_len


def forward(cfg: Walk, q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array,
            seg: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """q [B, Tp, Hq, D], k [B, Tp, Hkv, D], v [B, Tp, Hkv, Dv] bf16 (Tp a multiple of BLOCK_Q
    and BLOCK_K), rows [Bm, Hm, Tp / BLOCK_Q, 1 + W] packed forward visits, segment ids
    [B, Tp] int32 or None -> (o [B, Tp, Hq, Dv] in q's dtype, lse2 [B, Hq, Tp] float32)."""
    B, Tp, Hq, _ = q.shape
    Dv = v.shape[-1]
    placeholder = jnp.zeros((1, BLOCK_K), jnp.int32)  # never read without segments
    rows = rows.reshape(-1, rows.shape[-1])
    sched = schedule(cfg, Tp // BLOCK_Q, Hq, B, Tp * (q.shape[-1] + Dv) * q.dtype.itemsize)
    return plgpu.kernel(
        functools.partial(_kernel, cfg, sched),
        kernel_name="sparse_fwd",
        out_type=(jax.ShapeDtypeStruct((B, Tp, Hq, Dv), q.dtype),
                  jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)),
        grid=(sched.ctas,),
        grid_names=("cta",),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": cfg.interpret} if cfg.interpreted else {}),
    )(q, k, v, rows, placeholder if seg is None else seg)
