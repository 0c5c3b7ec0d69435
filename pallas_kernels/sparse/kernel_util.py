"""Pieces shared by the sparse forward and backward Pallas kernels.

Kernels work on [B, H, Tp, D] arrays (T padded to Tp) one (bq, bk) tile at a time:

    s = scale * q_i k_j^T        (float32), capped: s = c tanh(s / c)
    allowed(q, k) = visit kind FULL:      segments only
                    PARTIAL:              mask formula or packed tile, k < T, segments
                    PAD_ONLY:             k < T, segments
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.sparse.mask_info import PAD_ONLY, MapMeta
from pallas_kernels.sparse.masks import FULL, PARTIAL

# Finite "minus infinity" for masked logits: exp(MASK_VALUE - m) == 0 for any real m, and
# MASK_VALUE - MASK_VALUE == 0 keeps the running max well defined on all-masked rows.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one sparse attention call (hashable: a custom_vjp nondiff arg)."""

    meta: MapMeta
    scale: float
    soft_cap: float | None
    groups: int             # q heads per k/v head
    map_batch: int          # Bm: 1 (shared map) or B
    map_heads: int          # Hm: 1 (shared map) or Hq
    fwd_width: int          # visits per query block
    bwd_width: int          # visits per key block
    use_segments: bool
    interpret: Any

    @property
    def num_q_blocks(self) -> int:
        return self.meta.padded_len // self.meta.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.meta.padded_len // self.meta.block_k


def map_slot(cfg: KernelConfig, b: Any, h: Any, row: Any, visit: Any, rows: int, width: int) -> Any:
    """Flat index into a [Bm, Hm, rows, width] visit list for batch b, q head h."""
    bm = b if cfg.map_batch > 1 else 0
    hm = h if cfg.map_heads > 1 else 0
    return ((bm * cfg.map_heads + hm) * rows + row) * width + visit


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b^T in float32 (contract the last dims)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T @ b in float32 (contract the first dims)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def logits(cfg: KernelConfig, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Scaled (and soft-capped) scores [bq, bk] plus tanh(s / c) for the cap's gradient."""
    s = dot_nt(q, k) * cfg.scale
    if cfg.soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.soft_cap)
    return cfg.soft_cap * t, t


def segment_mask(cfg: KernelConfig, q_seg_ref: Any, k_seg_ref: Any) -> jax.Array | None:
    """[bq, bk] same-document mask from [bq, 1] and [1, bk] id tiles (None without segments)."""
    if not cfg.use_segments:
        return None
    return q_seg_ref[...] == k_seg_ref[...]


def partial_mask(cfg: KernelConfig, kind: Any, q_block: Any, k_block: Any, tile_ref: Any,
                 seg: jax.Array | None) -> jax.Array:
    """Mask of a PARTIAL or PAD_ONLY visit (see the module docstring)."""
    meta = cfg.meta
    shape = (meta.block_q, meta.block_k)
    q_pos = q_block * meta.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_block * meta.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    ok = k_pos < meta.seq_len
    if meta.rule_kind == "formula":
        ok = ok & (meta.formula.element(q_pos, k_pos) | (kind != PARTIAL))
    elif meta.rule_kind == "tile":
        ok = ok & ((tile_ref[...] != 0) | (kind != PARTIAL))
    return ok if seg is None else ok & seg


def visit_block(cfg: KernelConfig, kind: Any, q_block: Any, k_block: Any, tile_ref: Any,
                q_seg_ref: Any, k_seg_ref: Any, body: Callable[[jax.Array | None], None]) -> None:
    """Run ``body(mask)`` for a visited block: FULL gets the segment mask (or None), PARTIAL and
    PAD_ONLY get ``partial_mask``; SKIP visits run nothing."""

    @pl.when(kind == FULL)
    def _():
        body(segment_mask(cfg, q_seg_ref, k_seg_ref))

    @pl.when((kind == PARTIAL) | (kind == PAD_ONLY))
    def _():
        seg = segment_mask(cfg, q_seg_ref, k_seg_ref)
        body(partial_mask(cfg, kind, q_block, k_block, tile_ref, seg))


class Coords(NamedTuple):
    """Which tiles one grid step works on: batch, q head / block, k/v head / block, map slot."""

    b: Any
    q_head: Any
    q_block: Any
    kv_head: Any
    k_block: Any
    slot: Any


def forward_coords(cfg: KernelConfig, b: Any, h: Any, i: Any, j: Any, index_ref: Any) -> Coords:
    """Grid (B, Hq, nq, fwd_width): query block i of head h, its j-th visited key block."""
    slot = map_slot(cfg, b, h, i, j, cfg.num_q_blocks, cfg.fwd_width)
    return Coords(b, h, i, lax.div(h, cfg.groups), index_ref[slot], slot)


def transposed_coords(cfg: KernelConfig, b: Any, hk: Any, kb: Any, j: Any, index_ref: Any) -> Coords:
    """Grid (B, Hkv, nk, groups * bwd_width): key block kb of k/v head hk; step j is visit
    j % bwd_width of q head hk * groups + j // bwd_width."""
    # lax.div / rem: grid indices are >= 0, and floor division would lower through sign,
    # which Mosaic TPU's lowering cannot place without a TPU attached (export from a CPU host)
    h = hk * cfg.groups + lax.div(j, cfg.bwd_width)
    slot = map_slot(cfg, b, h, kb, lax.rem(j, cfg.bwd_width), cfg.num_k_blocks, cfg.bwd_width)
    return Coords(b, h, index_ref[slot], hk, kb, slot)


CoordsFn = Callable[..., Coords]


def _coords(cfg: KernelConfig, coords_fn: CoordsFn, args: tuple) -> Coords:
    return coords_fn(cfg, *args[:4], args[4])


def q_side_spec(cfg: KernelConfig, coords_fn: CoordsFn, width: int) -> pl.BlockSpec:
    """[B, Hq, Tp, width] arrays tiled by query block (q, do, o, lse, delta)."""
    def index(*args):
        c = _coords(cfg, coords_fn, args)
        return c.b, c.q_head, c.q_block, 0
    return pl.BlockSpec((None, None, cfg.meta.block_q, width), index)


def kv_side_spec(cfg: KernelConfig, coords_fn: CoordsFn, width: int) -> pl.BlockSpec:
    """[B, Hkv, Tp, width] arrays tiled by key block (k, v, dk, dv)."""
    def index(*args):
        c = _coords(cfg, coords_fn, args)
        return c.b, c.kv_head, c.k_block, 0
    return pl.BlockSpec((None, None, cfg.meta.block_k, width), index)


def mask_inputs(cfg: KernelConfig, coords_fn: CoordsFn, q_seg: Any, k_seg: Any,
                tiles: Any) -> tuple[list[pl.BlockSpec], list[jax.Array]]:
    """Specs and arrays of the optional inputs: segment ids [B, Tp, 1] / [B, 1, Tp], packed tiles."""
    specs, arrays = [], []
    if cfg.use_segments:
        def q_index(*args):
            c = _coords(cfg, coords_fn, args)
            return c.b, c.q_block, 0

        def k_index(*args):
            c = _coords(cfg, coords_fn, args)
            return c.b, 0, c.k_block
        specs += [pl.BlockSpec((None, cfg.meta.block_q, 1), q_index),
                  pl.BlockSpec((None, 1, cfg.meta.block_k), k_index)]
        arrays += [q_seg, k_seg]
    if cfg.meta.rule_kind == "tile":
        def tile_index(*args):
            return args[6][_coords(cfg, coords_fn, args).slot], 0, 0
        specs.append(pl.BlockSpec((None, cfg.meta.block_q, cfg.meta.block_k), tile_index))
        arrays.append(tiles)
    return specs, arrays


def split_mask_refs(cfg: KernelConfig, refs: list) -> tuple[Any, Any, Any, list]:
    """(q_seg_ref, k_seg_ref, tile_ref, remaining refs) in the order ``mask_inputs`` made them."""
    q_seg = k_seg = tile = None
    if cfg.use_segments:
        q_seg, k_seg, *refs = refs
    if cfg.meta.rule_kind == "tile":
        tile, *refs = refs
    return q_seg, k_seg, tile, refs
