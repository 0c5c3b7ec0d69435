"""Attention masks as small objects: a formula, a block classification, never a required [T, T] array.

A mask says which key position ``k`` a query position ``q`` may attend to (True = attend).

  Full()                     every pair
  Causal()                   k <= q
  Local(left, right)         q - left <= k <= q + right   (None = unbounded on that side)
  ChunkedCausal(chunk)       k <= q and k // chunk == q // chunk
  BlockSparse(kv_blocks, block_q, block_k)
                             key block kv_blocks[b, h, i, :] (-1 = unused slot) of query block i,
                             whole blocks; host NumPy or device (jit) arrays
  Dense(bool_array)          explicit [T, T] or [H, T, T] boolean array (costs O(T^2))
  a & b, a | b               element-wise and / or

Every mask answers three questions:
  * ``values(q_pos, k_pos)`` -> bool [Bm, Hm, len(q_pos), len(k_pos)] for 1-D position arrays,
    NumPy in, NumPy out; jnp in (or a device-array mask), jnp out. Bm, Hm are 1 unless the mask
    depends on batch / head. Used by the XLA path (chunked over query blocks) and for host tiles.
  * ``block_classes(nq, nk, bq, bk)`` -> int8 [Bm, Hm, nq, nk] with EMPTY / PARTIAL / FULL per
    (query block, key block). Formula masks do O(nq * nk) interval arithmetic, never O(T^2).
    ``&`` is the element-wise minimum of classes and ``|`` the maximum (exact for empty/full
    claims, conservative "partial" otherwise).
  * ``kernel_rule(bq, bk)`` -> how a kernel evaluates a PARTIAL block (see ``KernelRule``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2


def array_module(*arrays: Any) -> Any:
    """jnp if any argument is a jax array (or tracer), else NumPy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


class KernelRule(NamedTuple):
    """How a kernel masks a PARTIAL block of a mask.

    kind "formula": evaluate ``formula.element(q_pos, k_pos)`` (a Mask whose leaves are all
        formulas). ``conditional`` means the formula is only valid inside blocks that the block
        map lists as PARTIAL (a whole-block leaf has already been resolved there), so it may not
        be combined further.
    kind "const": the mask is whole-block (aligned BlockSparse): visited blocks are all True.
    kind "tile": no formula; the kernel reads a packed boolean tile per PARTIAL block.
    """

    kind: str
    formula: "Mask | None" = None
    conditional: bool = False


class Mask:
    """Base class; see the module docstring for the contract."""

    def values(self, q_pos: Any, k_pos: Any) -> Any:
        raise NotImplementedError

    def block_classes(self, nq: int, nk: int, bq: int, bk: int) -> Any:
        raise NotImplementedError

    def kernel_rule(self, bq: int, bk: int) -> KernelRule:
        raise NotImplementedError

    def leaves(self) -> list["Mask"]:
        return [self]

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, _check_mask(other))

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, _check_mask(other))


def _check_mask(m: Any) -> Mask:
    if not isinstance(m, Mask):
        raise TypeError(f"masks combine only with masks, got {type(m).__name__}")
    return m


class FormulaMask(Mask):
    """A mask given by ``element(q, k)``: broadcasting integer arrays -> bool.

    ``element`` uses only operators (<=, &, //) so it runs on NumPy, jnp and inside a kernel.
    """

    def element(self, q: Any, k: Any) -> Any:
        raise NotImplementedError

    def values(self, q_pos: Any, k_pos: Any) -> Any:
        xp = array_module(q_pos, k_pos)
        q = xp.asarray(q_pos)[:, None]
        k = xp.asarray(k_pos)[None, :]
        return xp.broadcast_to(self.element(q, k), (q.shape[0], k.shape[1]))[None, None]

    def kernel_rule(self, bq: int, bk: int) -> KernelRule:
        return KernelRule("formula", self)


def _block_bounds(n: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each of ``n`` blocks of size ``b``."""
    first = np.arange(n, dtype=np.int64) * b
    return first, first + b - 1


def _classes(any_true: np.ndarray, all_true: np.ndarray) -> np.ndarray:
    return np.where(all_true, FULL, np.where(any_true, PARTIAL, EMPTY)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Local(FormulaMask):
    """Sliding window: q - left <= k <= q + right; None means unbounded on that side."""

    left: int | None = None
    right: int | None = None

    def __post_init__(self):
        for name in ("left", "right"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, (int, np.integer)) or val < 0):
                raise ValueError(f"Local.{name} must be a non-negative int or None, got {val!r}")

    def element(self, q: Any, k: Any) -> Any:
        ok = (q >= 0) & (k >= 0)  # positions are never negative: all True, broadcast
        if self.left is not None:
            ok = ok & (k >= q - self.left)
        if self.right is not None:
            ok = ok & (k <= q + self.right)
        return ok

    def block_classes(self, nq: int, nk: int, bq: int, bk: int) -> np.ndarray:
        q0, q1 = _block_bounds(nq, bq)
        k0, k1 = _block_bounds(nk, bk)
        lo = k0[None, :] - q1[:, None]  # smallest k - q in the block
        hi = k1[None, :] - q0[:, None]  # largest k - q in the block
        big = np.iinfo(np.int64).max // 4
        left = big if self.left is None else self.left
        right = big if self.right is None else self.right
        any_true = (hi >= -left) & (lo <= right)
        all_true = (lo >= -left) & (hi <= right)
        return _classes(any_true, all_true)[None, None]


class Full(Local):
    """Every query attends to every key."""

    def __init__(self):
        super().__init__(None, None)

    def __repr__(self) -> str:
        return "Full()"


class Causal(Local):
    """k <= q."""

    def __init__(self):
        super().__init__(None, 0)

    def __repr__(self) -> str:
        return "Causal()"


@dataclasses.dataclass(frozen=True)
class ChunkedCausal(FormulaMask):
    """Causal inside fixed chunks: k <= q and k // chunk == q // chunk."""

    chunk: int

    def __post_init__(self):
        if not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
            raise ValueError(f"ChunkedCausal.chunk must be a positive int, got {self.chunk!r}")

    def element(self, q: Any, k: Any) -> Any:
        # positions are >= 0: truncating division on jax values (floor division would lower
        # through sign, which Mosaic TPU's lowering cannot place on a host without a TPU)
        chunk_of = ((lambda x: jax.lax.div(x, self.chunk)) if array_module(q, k) is jnp
                    else (lambda x: x // self.chunk))
        return (k <= q) & (chunk_of(k) == chunk_of(q))

    def block_classes(self, nq: int, nk: int, bq: int, bk: int) -> np.ndarray:
        c = self.chunk
        q0, q1 = _block_bounds(nq, bq)
        k0, k1 = _block_bounds(nk, bk)
        # Query q sees keys [c * (q // c), q]. Some pair exists iff the smallest q >= k0 in the
        # block sees a key <= k1; every pair iff the last query's chunk starts at or before k0
        # and the first query is at or after k1.
        q_first = np.maximum(q0[:, None], k0[None, :])
        any_true = (q_first <= q1[:, None]) & ((q_first // c) * c <= k1[None, :])
        all_true = (k1[None, :] <= q0[:, None]) & ((q1[:, None] // c) * c <= k0[None, :])
        return _classes(any_true, all_true)[None, None]


def _classes_of_values(vals: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """Classes of an explicit bool [Bm, Hm, nq * bq, nk * bk] array (O(T^2): Dense-like masks only)."""
    Bm, Hm, tq, tk = vals.shape
    vals = vals.reshape(Bm, Hm, tq // bq, bq, tk // bk, bk)
    return _classes(vals.any(axis=(3, 5)), vals.all(axis=(3, 5)))


def _as_4d(name: str, x: Any, layout: str) -> Any:
    """Prepend unit dims up to rank 4 ([B, H, ., .])."""
    if x.ndim < 2 or x.ndim > 4:
        raise ValueError(f"{name} must have layout {layout} (rank 2 to 4), got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


class Dense(Mask):
    """An explicit boolean mask [T, T], [H, T, T] or [B, H, T, T] (True = attend).

    It costs O(T^2) memory; kernels read packed [bq, bk] tiles of its partial blocks.
    """

    def __init__(self, mask: Any):
        mask = _as_4d("Dense mask", mask if isinstance(mask, jax.Array) else np.asarray(mask),
                      "[T, T], [H, T, T] or [B, H, T, T]")
        if mask.dtype != bool:
            raise TypeError(f"Dense mask must be boolean, got {mask.dtype}")
        if mask.shape[-1] != mask.shape[-2]:
            raise ValueError(f"Dense mask must be square in its last two dims, got {mask.shape}")
        self.mask = mask

    def values(self, q_pos: Any, k_pos: Any) -> Any:
        """Positions past the array's size are masked (padding)."""
        xp = array_module(q_pos, k_pos, self.mask)
        n = self.mask.shape[-1]
        inside = (q_pos < n)[:, None] & (k_pos < n)[None, :]
        return xp.asarray(self.mask)[:, :, xp.minimum(q_pos, n - 1)][:, :, :, xp.minimum(k_pos, n - 1)] & inside

    def _host(self) -> np.ndarray:
        try:
            return np.asarray(self.mask)
        except jax.errors.TracerArrayConversionError as e:
            raise ValueError("a Dense mask built from a traced array cannot make a host block map; "
                             "pass a concrete array or use impl='xla'") from e

    def block_classes(self, nq: int, nk: int, bq: int, bk: int) -> np.ndarray:
        m = self._host()
        if m.shape[-1] > nk * bk:
            raise ValueError(f"Dense mask of shape {m.shape} is larger than the sequence")
        return _classes_of_values(Dense(m).values(np.arange(nq * bq), np.arange(nk * bk)), bq, bk)

    def kernel_rule(self, bq: int, bk: int) -> KernelRule:
        return KernelRule("tile")

    def __repr__(self) -> str:
        return f"Dense(shape={tuple(self.mask.shape)})"


class BlockSparse(Mask):
    """Whole blocks: query block i (of ``block_q`` rows) attends to key blocks ``kv_blocks[..., i, :]``.

    ``kv_blocks`` int [nq, n], [H, nq, n] or [B, H, nq, n]; -1 marks an unused slot; duplicates
    are harmless. NumPy arrays give a host block map; jax arrays (e.g. from ``select_blocks``
    inside jit) give a block map built on device.
    """

    def __init__(self, kv_blocks: Any, block_q: int, block_k: int):
        if not isinstance(kv_blocks, jax.Array):
            kv_blocks = np.asarray(kv_blocks)
        kv_blocks = _as_4d("BlockSparse kv_blocks", kv_blocks, "[nq, n], [H, nq, n] or [B, H, nq, n]")
        if not np.issubdtype(kv_blocks.dtype, np.integer):
            raise TypeError(f"BlockSparse kv_blocks must be integer, got {kv_blocks.dtype}")
        if block_q < 1 or block_k < 1:
            raise ValueError(f"BlockSparse block sizes must be positive, got {block_q}, {block_k}")
        self.kv_blocks = kv_blocks
        self.block_q = int(block_q)
        self.block_k = int(block_k)

    @property
    def on_device(self) -> bool:
        return isinstance(self.kv_blocks, jax.Array)

    def _rows(self, q_block: Any) -> tuple[Any, Any]:
        """Slots of query blocks ``q_block`` [n] -> ([Bm, Hm, n, slots], in_range [n]).

        Query blocks past the mask's last row attend to nothing.
        """
        xp = array_module(q_block, self.kv_blocks)
        rows = self.kv_blocks.shape[2]
        return xp.asarray(self.kv_blocks)[:, :, xp.minimum(q_block, rows - 1)], q_block < rows

    def values(self, q_pos: Any, k_pos: Any) -> Any:
        slots, in_rows = self._rows(q_pos // self.block_q)
        hit = (slots[..., None] == (k_pos // self.block_k)[None, None, None, None, :]).any(axis=-2)
        return hit & in_rows[:, None]

    def aligned(self, bq: int, bk: int) -> bool:
        """True when every kernel block lies inside one mask block (classes are empty/full only)."""
        return self.block_q % bq == 0 and self.block_k % bk == 0

    def block_classes(self, nq: int, nk: int, bq: int, bk: int) -> Any:
        if not self.aligned(bq, bk):
            if self.on_device:
                raise ValueError(
                    f"device BlockSparse blocks ({self.block_q}, {self.block_k}) must be multiples "
                    f"of the kernel blocks ({bq}, {bk})")
            return _classes_of_values(self.values(np.arange(nq * bq), np.arange(nk * bk)), bq, bk)
        xp = array_module(self.kv_blocks)
        slots, in_rows = self._rows(xp.arange(nq) * bq // self.block_q)
        kb = xp.arange(nk) * bk // self.block_k
        hit = (slots[..., None] == kb[None, None, None, None, :]).any(axis=-2) & in_rows[:, None]
        return (hit * FULL).astype(xp.int8)

    def kernel_rule(self, bq: int, bk: int) -> KernelRule:
        return KernelRule("const") if self.aligned(bq, bk) else KernelRule("tile")

    def __repr__(self) -> str:
        return f"BlockSparse(kv_blocks={tuple(self.kv_blocks.shape)}, block_q={self.block_q}, block_k={self.block_k})"


@dataclasses.dataclass(frozen=True)
class _Combine(Mask):
    a: Mask
    b: Mask

    def leaves(self) -> list[Mask]:
        return self.a.leaves() + self.b.leaves()

    def block_classes(self, nq: int, nk: int, bq: int, bk: int) -> Any:
        ca, cb = self.a.block_classes(nq, nk, bq, bk), self.b.block_classes(nq, nk, bq, bk)
        return self._op_classes(array_module(ca, cb), ca, cb)

    def kernel_rule(self, bq: int, bk: int) -> KernelRule:
        ra, rb = self.a.kernel_rule(bq, bk), self.b.kernel_rule(bq, bk)
        kinds = {ra.kind, rb.kind}
        if "tile" in kinds or ra.conditional or rb.conditional:
            return KernelRule("tile")
        if kinds == {"const"}:
            return KernelRule("const")
        if kinds == {"formula"}:
            return KernelRule("formula", type(self)(ra.formula, rb.formula))
        # One whole-block side: And visits only where it is full, Or needs the formula only where
        # it is empty; either way the formula alone decides PARTIAL blocks.
        return KernelRule("formula", ra.formula or rb.formula, conditional=True)


class And(_Combine):
    """Both masks allow the pair."""

    def element(self, q: Any, k: Any) -> Any:
        return self.a.element(q, k) & self.b.element(q, k)

    def values(self, q_pos: Any, k_pos: Any) -> Any:
        return self.a.values(q_pos, k_pos) & self.b.values(q_pos, k_pos)

    @staticmethod
    def _op_classes(xp: Any, ca: Any, cb: Any) -> Any:
        return xp.minimum(ca, cb)


class Or(_Combine):
    """Either mask allows the pair."""

    def element(self, q: Any, k: Any) -> Any:
        return self.a.element(q, k) | self.b.element(q, k)

    def values(self, q_pos: Any, k_pos: Any) -> Any:
        return self.a.values(q_pos, k_pos) | self.b.values(q_pos, k_pos)

    @staticmethod
    def _op_classes(xp: Any, ca: Any, cb: Any) -> Any:
        return xp.maximum(ca, cb)
