"""Block maps: which key blocks each query block visits (and the transpose), computed once.

From a mask, the sequence length and the kernel tiles (bq, bk), with T padded to Tp:

  classes[b, h, i, j]  EMPTY / PARTIAL / FULL from ``Mask.block_classes`` (O(nq * nk) for formula
                       masks), then padding: key blocks wholly past T and query blocks wholly past T
                       become EMPTY, FULL blocks holding padded keys become PAD_ONLY.
  forward  (per query block i)  visits j = fwd_index[b, h, i, v], kind fwd_kind[b, h, i, v]
  backward (per key block j)    visits i = bwd_index[b, h, j, v], kind bwd_kind[b, h, j, v]

Visits are listed in increasing block order and padded to a common count with kind SKIP; a
padded visit repeats the last real index, so a pipelined kernel does not fetch a new block for
it. ``b`` / ``h`` are 1 when the mask does not depend on batch / head.

PARTIAL blocks are masked inside the kernel by the mask's formula (``KernelRule`` "formula" /
"const") or, for masks without one (Dense, unaligned BlockSparse), by a packed int8 tile
``tiles[fwd_tile[b, h, i, v]]`` of shape [bq, bk] (tile 0 is a dummy for non-tile visits).

Host masks give NumPy maps of exact width. A BlockSparse holding jax arrays (e.g. ``select_blocks``
inside jit) gives a map built on device with jnp, whose widths are static upper bounds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.common import round_up
from pallas_kernels.sparse.masks import EMPTY, FULL, PARTIAL, And, BlockSparse, Mask, Or, array_module

SKIP = EMPTY
PAD_ONLY = 3  # a FULL block that holds padded keys: mask only k >= T (and segments)


class BlockSizes(NamedTuple):
    """Kernel tiles: rows of q per block and rows of k/v per block (multiples of 8)."""

    block_q: int = 128
    block_k: int = 128


@dataclasses.dataclass(frozen=True)
class MapMeta:
    """Static description of a block map (hashable: it is part of the kernel's configuration)."""

    seq_len: int
    block_q: int
    block_k: int
    rule_kind: str          # "formula", "const" or "tile" (see masks.KernelRule)
    formula: Mask | None    # evaluated on PARTIAL blocks when rule_kind == "formula"

    @property
    def padded_len(self) -> int:
        return round_up(self.seq_len, math.lcm(self.block_q, self.block_k))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class BlockMap:
    """Forward and transposed visit lists plus packed tiles; a pytree (arrays are leaves)."""

    fwd_index: Any
    fwd_kind: Any
    fwd_tile: Any
    bwd_index: Any
    bwd_kind: Any
    bwd_tile: Any
    tiles: Any
    meta: MapMeta

    def tree_flatten(self):
        return ((self.fwd_index, self.fwd_kind, self.fwd_tile, self.bwd_index, self.bwd_kind,
                 self.bwd_tile, self.tiles), self.meta)

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children, meta)

    @property
    def batch_heads(self) -> tuple[int, int]:
        """(Bm, Hm): 1 where the map is shared over batch / heads."""
        return tuple(self.fwd_index.shape[:2])


def default_block_sizes(mask: Mask, seq_len: int) -> BlockSizes:
    """128 x 128 tiles (fewer for short sequences); an aligned BlockSparse's own blocks when small."""
    cap = round_up(max(seq_len, 1), 8)
    bq = bk = min(128, cap)
    for leaf in mask.leaves():
        if isinstance(leaf, BlockSparse):
            bq = math.gcd(bq, leaf.block_q) if leaf.block_q % 8 == 0 else bq
            bk = math.gcd(bk, leaf.block_k) if leaf.block_k % 8 == 0 else bk
    return BlockSizes(bq, bk)


def make_block_map(mask: Mask, seq_len: int, block_sizes: BlockSizes | tuple[int, int]) -> BlockMap:
    """The block map of ``mask`` for sequences of ``seq_len`` with kernel tiles ``block_sizes``."""
    bq, bk = BlockSizes(*block_sizes)
    if bq % 8 or bk % 8 or bq < 8 or bk < 8:
        raise ValueError(f"block sizes must be positive multiples of 8, got ({bq}, {bk})")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    rule = mask.kernel_rule(bq, bk)
    meta = MapMeta(int(seq_len), bq, bk, rule.kind, rule.formula)
    Tp = meta.padded_len
    nq, nk = Tp // bq, Tp // bk
    classes = mask.block_classes(nq, nk, bq, bk)
    xp = array_module(classes)
    if xp is jnp and rule.kind == "tile":
        raise ValueError("a device-built block map cannot use packed tiles: use BlockSparse blocks "
                         "that are multiples of the kernel blocks, combined with formula masks only")
    k_first = xp.arange(nk) * bk
    q_first = xp.arange(nq) * bq
    classes = xp.where((k_first >= seq_len)[None, None, None, :] | (q_first >= seq_len)[None, None, :, None],
                       EMPTY, classes)
    classes = xp.where((classes == FULL) & (k_first + bk > seq_len)[None, None, None, :], PAD_ONLY, classes)
    if rule.kind == "tile":
        tile_ids, tiles = _pack_tiles(mask, np.asarray(classes), bq, bk)
    else:
        tile_ids = xp.zeros(classes.shape, xp.int32)
        tiles = np.zeros((1, bq, bk), np.int8)
    if xp is np:
        fwd_width = max(1, int((classes != EMPTY).sum(-1).max()))
        bwd_width = max(1, int((classes != EMPTY).sum(-2).max()))
    else:
        fwd_width = min(nk, _visit_bound(mask, nq, nk, bq, bk, axis=-1))
        bwd_width = min(nq, _visit_bound(mask, nq, nk, bq, bk, axis=-2))
    fwd = _compact(xp, classes, tile_ids, fwd_width)
    bwd = _compact(xp, xp.swapaxes(classes, -1, -2), xp.swapaxes(tile_ids, -1, -2), bwd_width)
    return BlockMap(*fwd, *bwd, tiles, meta)


def _compact(xp: Any, classes: Any, tile_ids: Any, width: int) -> tuple[Any, Any, Any]:
    """Per row of ``classes`` [..., n]: the non-empty columns first (in order), ``width`` of them."""
    if xp is np:
        order = np.argsort(classes == EMPTY, axis=-1, kind="stable")[..., :width]
    else:
        order = jnp.argsort(classes == EMPTY, axis=-1, stable=True)[..., :width]
    kind = xp.take_along_axis(classes, order, axis=-1)
    count = (kind != EMPTY).sum(axis=-1, keepdims=True)
    last = xp.take_along_axis(order, xp.maximum(count - 1, 0), axis=-1)
    index = xp.where(kind != EMPTY, order, last)
    tile = xp.take_along_axis(tile_ids, index, axis=-1)
    return index.astype(xp.int32), kind.astype(xp.int32), tile.astype(xp.int32)


def _pack_tiles(mask: Mask, classes: np.ndarray, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile ids [Bm, Hm, nq, nk] (0 = dummy) and int8 tiles [1 + n_partial, bq, bk]."""
    Bm, Hm = classes.shape[:2]
    tile_ids = np.zeros(classes.shape, np.int32)
    tiles = [np.zeros((bq, bk), np.int8)]
    for b, h, i, j in zip(*np.nonzero(classes == PARTIAL)):
        vals = np.asarray(mask.values(np.arange(i * bq, (i + 1) * bq), np.arange(j * bk, (j + 1) * bk)))
        tile_ids[b, h, i, j] = len(tiles)
        tiles.append(vals[min(b, vals.shape[0] - 1), min(h, vals.shape[1] - 1)].astype(np.int8))
    return tile_ids, np.stack(tiles)


def _visit_bound(mask: Mask, nq: int, nk: int, bq: int, bk: int, axis: int) -> int:
    """Static upper bound on non-empty blocks per row (axis=-1) or column (axis=-2) of the classes."""
    if isinstance(mask, And):
        return min(_visit_bound(mask.a, nq, nk, bq, bk, axis), _visit_bound(mask.b, nq, nk, bq, bk, axis))
    if isinstance(mask, Or):
        return _visit_bound(mask.a, nq, nk, bq, bk, axis) + _visit_bound(mask.b, nq, nk, bq, bk, axis)
    if isinstance(mask, BlockSparse) and mask.on_device:
        if axis == -1:  # one mask block spans several kernel key blocks
            return mask.kv_blocks.shape[-1] * (mask.block_k // bk)
        return nq
    classes = np.asarray(mask.block_classes(nq, nk, bq, bk))
    return max(1, int((classes != EMPTY).sum(axis).max()))
