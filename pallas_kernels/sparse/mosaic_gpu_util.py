"""Pieces shared by the Hopper (Mosaic GPU) forward and backward kernels of the sparse op.

* ``visit_rows``: a block map's visit lists packed into one int32 row per (batch, head, block)
  that a kernel reads with scalar loads: ``row[0]`` = number of visits n, ``row[1 + v]`` =
  ``4 * block + kind`` for v < n (the visited block ids in increasing order, kind PARTIAL /
  FULL / PAD_ONLY; SKIP visits are never counted);
* ``Walk``: the static description of a launch (mask rule, scale, GQA groups, map sharing);
* ``mask_logits``: -inf on the pairs a visit does not allow (formula, k >= T, segments),
  evaluated in the wgmma register layout on the visits that need it;
* ``product``: ``acc + a @ b`` with ``a`` a bf16 register array (a register-operand wgmma when
  compiled; staged through shared memory under the CPU interpreter, which has no
  register-operand wgmma);
* ``Schedule`` / ``for_each_item``: the persistent launches' work items (block, head, batch
  row) in L2-sized head groups, block order longest-first for causal masks, CTA c taking items
  c, c + ctas, ... with a visit counter that continues across its items (each kernel's
  docstring says what its items are).

Logits are kept in base 2: ``s2 = log2(e) * scale * q.k``, so softmax weights are
``exp2(s2 - m2)`` and the saved row statistic is ``lse2 = log2(sum_k exp2(s2))`` (+inf on a row
that sees nothing and on a padded row >= T, so its recomputed weights are exactly 0).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import pl, plgpu, products, transposed, wgmma_zeros
from pallas_kernels.sparse.mask_info import PAD_ONLY, MapMeta
from pallas_kernels.sparse.masks import EMPTY, FULL, PARTIAL

LOG2E = math.log2(math.e)
KIND_BITS = 2  # kinds 0..3 fit in the low two bits of a packed visit
INTERPRET_CTAS = 3        # under the CPU interpreter: few CTAs, several items each
L2_BYTES = 32 << 20       # bytes of the heads' streamed operands an item group may keep in L2


def visit_rows(index: Any, kind: Any) -> jax.Array:
    """[Bm, Hm, n, W] visit lists -> int32 [Bm, Hm, n, 1 + W] packed rows (module docstring)."""
    index, kind = jnp.asarray(index, jnp.int32), jnp.asarray(kind, jnp.int32)
    count = jnp.sum(kind != EMPTY, axis=-1, keepdims=True, dtype=jnp.int32)
    return jnp.concatenate([count, index * (1 << KIND_BITS) + kind], axis=-1)


def unpack(code: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(block id, kind) of a packed visit."""
    return jax.lax.shift_right_logical(code, KIND_BITS), code & ((1 << KIND_BITS) - 1)


@dataclasses.dataclass(frozen=True)
class Walk:
    """Static configuration of one sparse-attention launch (hashable)."""

    meta: MapMeta
    scale: float
    groups: int            # q heads per k/v head
    map_batch: int         # Bm: 1 (map shared over the batch) or B
    map_heads: int         # Hm: 1 (shared over heads) or Hq
    use_segments: bool
    interpret: Any         # None (compiled) or e.g. plgpu.InterpretGPUParams() (CPU)

    @property
    def interpreted(self) -> bool:
        return self.interpret is not None

    @property
    def log2_scale(self) -> float:
        return self.scale * LOG2E

    def map_row(self, b: Any, h: Any, block: Any, blocks: int) -> Any:
        """Row of a [Bm, Hm, blocks, .] visit array for batch b and q head h."""
        bm = b if self.map_batch > 1 else 0
        hm = h if self.map_heads > 1 else 0
        return (bm * self.map_heads + hm) * blocks + block


def _needs_key_bound(meta: MapMeta) -> bool:
    return meta.seq_len % meta.block_k != 0 or meta.seq_len % meta.block_q != 0


def allowed_is_trivial(cfg: Walk, partial: bool, padded: bool) -> bool:
    """True when a visit of this kind allows every pair of its tile (no mask to apply)."""
    return not (cfg.use_segments or (padded and _needs_key_bound(cfg.meta))
                or (partial and cfg.meta.rule_kind == "formula"))


def mask_logits(cfg: Walk, s: jax.Array, kind: jax.Array, q_first: Any, k_first: Any,
                q_seg: jax.Array | None, k_seg: jax.Array | None, transposed: bool = False
                ) -> jax.Array:
    """-inf where the visit does not allow the pair. ``s`` [rows, cols] in the wgmma layout holds
    queries along rows (keys along rows when ``transposed``); q_first / k_first are the first
    positions; q_seg / k_seg the segment ids of the tile's queries / keys in the matching
    reduced layouts (None without segments). FULL visits without segments return ``s``.
    The transposed (dk/dv) walk applies no key bound k < T: there every key row's gradients
    depend on that row alone and padded key rows are dropped. (With the bound, the H100 gave
    dk, dv 0.65 off on every key block for Full + segments + T = 777, while interpret mode,
    Full without segments, T = 768 and Causal + segments + T = 777 were right.)"""
    layout = plgpu.Layout.WGMMA
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    seq_len = cfg.meta.seq_len

    def allowed(partial: bool, padded: bool) -> jax.Array | None:
        ok = None
        both = lambda a, b: b if a is None else a & b
        if partial or padded:
            k_pos = k_first + plgpu.broadcasted_iota(jnp.int32, s.shape, k_axis, layout=layout)
            if padded and _needs_key_bound(cfg.meta):
                ok = k_pos < seq_len
            if partial and cfg.meta.rule_kind == "formula":
                q_pos = q_first + plgpu.broadcasted_iota(jnp.int32, s.shape, q_axis, layout=layout)
                ok = both(ok, cfg.meta.formula.element(q_pos, k_pos))
        if cfg.use_segments:
            qs = jax.lax.broadcast_in_dim(q_seg, s.shape, [q_axis])
            ks = jax.lax.broadcast_in_dim(k_seg, s.shape, [k_axis])
            ok = both(ok, qs == ks)
        return ok

    def apply(partial: bool, padded: bool):
        def branch(s):
            ok = allowed(partial, padded)
            return s if ok is None else jnp.where(ok, s, -jnp.inf)
        return branch

    # (partial, padded) by kind; EMPTY (SKIP) visits are never walked
    flags = {EMPTY: (False, False), PARTIAL: (True, True), FULL: (False, False),
             PAD_ONLY: (False, True)}
    if transposed:  # no key bound (docstring): no visit counts as padded
        flags = {visit: (partial, False) for visit, (partial, _) in flags.items()}
    if all(allowed_is_trivial(cfg, *f) for f in flags.values()):
        return s
    return jax.lax.switch(kind, [apply(*flags[kind]) for kind in range(len(flags))], s)


def scores(cfg: Walk, *pairs: tuple[Any, Any],
           after_issue: Callable[[], None] | None = None) -> tuple[jax.Array, ...]:
    """``a b^T`` [rows of a, rows of b] float32 for each (a, b) pair of SMEM tiles, the wgmmas
    issued back to back; ``after_issue()`` runs once they are issued, before their results are
    awaited (compiled; after them under the interpreter)."""
    zeros = tuple(wgmma_zeros((a.shape[0], b.shape[0])) for a, b in pairs)
    operands = tuple((a, transposed(b)) for a, b in pairs)
    if after_issue is None or cfg.interpreted:
        out = products(zeros, operands, cfg.interpreted)
        if after_issue is not None:
            after_issue()
        return out

    def body(accs):
        for acc, (a, b) in zip(accs, operands):
            plgpu.wgmma(acc, a, b)
        after_issue()
    return pl.run_state(body)(tuple(plgpu.ACC.init(z) for z in zeros))


def product(acc: jax.Array, a: jax.Array, b_ref: Any, stage: Any, interpret: bool) -> jax.Array:
    """``acc + a @ b`` on the tensor cores: ``a`` [M, K] bf16 registers, ``b_ref`` [K, N] SMEM
    (may be a transposed view). ``stage``: an [M, K] SMEM tile used only under the interpreter."""
    if interpret:
        stage[...] = a
        plgpu.commit_smem()
        return products((acc,), ((stage, b_ref),), True)[0]

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def walk_visits(rows_ref: Any, row_of: Callable[[Any], Any], groups: int,
                body: Callable[..., Any], carry: Any, start: Any = 0) -> Any:
    """Fold ``carry = body(step, g, code, carry)`` over the visits of rows ``row_of(g)`` of
    ``rows_ref`` for g = 0 .. groups - 1 in turn; ``step`` counts visits across the groups
    from ``start`` (the visits of the CTA's earlier items: it picks the ring slot), ``code``
    is the packed visit. Producer and consumers of a kernel run the same walk, so they agree
    on every step's slot."""
    def group(g, state):
        start, carry = state
        row = row_of(g)
        count = rows_ref[row, 0]
        carry = jax.lax.fori_loop(
            0, count, lambda v, c: body(start + v, g, rows_ref[row, 1 + v], c), carry)
        return start + count, carry

    state = (jnp.asarray(start, jnp.int32), carry)
    if groups == 1:
        return group(jnp.int32(0), state)[1]
    return jax.lax.fori_loop(0, groups, group, state)[1]


def refill_wait(step: Any, stages: int, consumed: Any) -> None:
    """Before refilling ring slot ``step % stages``: wait until its previous contents (step -
    ``stages``) are consumed (no wait for the first ``stages`` steps)."""
    @pl.when(step >= stages)
    def _():
        plgpu.barrier_wait(consumed.at[jax.lax.rem(step, stages)])


def launch_ctas(interpreted: bool, items: int, override: int | None) -> int:
    """CTAs of the grid: ``override`` if set (fewer than ``items``: a persistent grid), else one
    per item on the GPU (on an H100 both kernels ran faster than with one CTA per SM, in the
    same order: experiments/results/h100_2026-11-23_s5_call2/ab.log) and 3 when interpreted
    (so that CPU tests walk several items per CTA)."""
    if override is not None:
        return min(items, override)
    return min(items, INTERPRET_CTAS) if interpreted else items


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Work items (block, head, batch row) of a persistent launch and their order: heads
    hb = b heads + h in groups of ``group`` (the last one may be smaller), group after group;
    within a group block ``blocks - 1 - n`` (``descending``; else block n) for n = 0, 1, ...,
    each with the group's heads in turn. CTA c takes items c, c + ctas, c + 2 ctas, ... (a
    static stride: each round's items are of similar length, and a CTA's blocks drift through
    all lengths over its rounds)."""

    blocks: int   # blocks per head (query blocks of the forward / dq, key blocks of dk/dv)
    heads: int
    batch: int
    group: int    # heads per group
    ctas: int     # CTAs of the grid
    descending: bool = True

    @classmethod
    def of(cls, interpreted: bool, blocks: int, heads: int, batch: int, head_bytes: int, *,
           shared_by: int, l2_bytes: int, ctas: int | None, descending: bool = True
           ) -> Schedule:
        """Groups of as many heads as ``l2_bytes`` holds the streamed operands of, where
        ``head_bytes`` is read by ``shared_by`` heads (GQA: a k/v head's by its q heads);
        ``ctas``: the grid size override (None: ``launch_ctas``)."""
        group = min(heads * batch, max(1, l2_bytes * shared_by // head_bytes))
        items = blocks * heads * batch
        return cls(blocks, heads, batch, group, launch_ctas(interpreted, items, ctas), descending)

    @property
    def items(self) -> int:
        return self.blocks * self.heads * self.batch

    def count(self, cta: Any) -> Any:
        """Number of items of CTA ``cta`` (items cta, cta + ctas, ...)."""
        return jax.lax.div(self.items - 1 - cta, self.ctas) + 1

    def coords(self, item: Any) -> tuple[Any, Any, Any]:
        """(batch row b, head h, block) of work item ``item``."""
        div, rem = jax.lax.div, jax.lax.rem
        g = div(item, self.group * self.blocks)
        first = g * self.group
        size = jax.lax.min(self.group, self.heads * self.batch - first)
        within = item - first * self.blocks
        hb = first + rem(within, size)
        n = div(within, size)
        return div(hb, self.heads), rem(hb, self.heads), (self.blocks - 1 - n if self.descending
                                                          else n)


def for_each_item(sched: Schedule, visits: Callable[[Any, Any, Any], Any],
                  body: Callable[..., None]) -> None:
    """Run ``body(i, count, item, b, h, block, start)`` for this CTA's items i = 0 .. count - 1
    in turn; ``visits(b, h, block)`` is an item's number of visits and ``start`` the visits of
    the CTA's earlier items, so a ring step counter continues across items."""
    cta = jax.lax.axis_index("cta")
    count = sched.count(cta)

    def one(i, start):
        item = cta + i * sched.ctas
        b, h, block = sched.coords(item)
        body(i, count, item, b, h, block, start)
        return start + visits(b, h, block)

    jax.lax.fori_loop(0, count, one, jnp.int32(0))


def visit_count(rows_ref: Any, row_of: Callable[[Any], Any], groups: int) -> Any:
    """Visits of rows ``row_of(g)``, g = 0 .. groups - 1, together (the length of
    ``walk_visits`` over the same rows)."""
    if groups == 1:
        return rows_ref[row_of(0), 0]
    return jax.lax.fori_loop(0, groups, lambda g, n: n + rows_ref[row_of(g), 0], jnp.int32(0))
