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
  register-operand wgmma).

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

from pallas_kernels.mosaic_gpu_common import pl, plgpu, products, wgmma_zeros
from pallas_kernels.sparse.mask_info import PAD_ONLY, MapMeta
from pallas_kernels.sparse.masks import EMPTY, FULL, PARTIAL

LOG2E = math.log2(math.e)
KIND_BITS = 2  # kinds 0..3 fit in the low two bits of a packed visit


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
    operands = tuple((a, b.transpose((1, 0))) for a, b in pairs)
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
                body: Callable[..., Any], carry: Any) -> Any:
    """Fold ``carry = body(step, g, code, carry)`` over the visits of rows ``row_of(g)`` of
    ``rows_ref`` for g = 0 .. groups - 1 in turn; ``step`` counts visits across the groups
    (it picks the ring slot), ``code`` is the packed visit. Producer and consumers of a kernel
    run the same walk, so they agree on every step's slot."""
    def group(g, state):
        start, carry = state
        row = row_of(g)
        count = rows_ref[row, 0]
        carry = jax.lax.fori_loop(
            0, count, lambda v, c: body(start + v, g, rows_ref[row, 1 + v], c), carry)
        return start + count, carry

    state = (jnp.int32(0), carry)
    if groups == 1:
        return group(jnp.int32(0), state)[1]
    return jax.lax.fori_loop(0, groups, group, state)[1]


def refill_wait(step: Any, stages: int, consumed: Any) -> None:
    """Before refilling ring slot ``step % stages``: wait until its previous contents (step -
    ``stages``) are consumed (no wait for the first ``stages`` steps)."""
    @pl.when(step >= stages)
    def _():
        plgpu.barrier_wait(consumed.at[jax.lax.rem(step, stages)])
