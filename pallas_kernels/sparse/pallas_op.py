"""Portable Pallas path of the sparse op: layout, padding, block map and the custom_vjp.

Inputs [B, T, H, D] become [B, H, Tp, D] (T padded to the block map's Tp; padded keys are
masked in the kernel, padded query rows are dropped). The forward kernel saves lse; the
backward runs a dq kernel (forward block map) and a dk/dv kernel (transposed block map), with
delta = rowsum(do * o) computed here.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.sparse.kernel_bwd import backward
from pallas_kernels.sparse.kernel_fwd import forward
from pallas_kernels.sparse.kernel_util import KernelConfig
from pallas_kernels.sparse.mask_info import BlockMap, BlockSizes, default_block_sizes, make_block_map
from pallas_kernels.sparse.masks import BlockSparse, Mask


def pallas_accepts(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | BlockMap,
                   block_sizes: BlockSizes | None, **_: Any) -> str | None:
    """None when the portable kernel can run this call, else the reason."""
    if common.platform() not in ("cpu", "tpu"):
        return (f"the portable kernel runs on TPU (Mosaic) and CPU (interpret), not "
                f"{common.platform()}; a GPU kernel registers separately")
    if isinstance(mask, BlockMap):
        return _block_map_mismatch(mask, q.shape[0], q.shape[1], q.shape[2])
    bq, bk = block_sizes or default_block_sizes(mask, q.shape[1])
    if bq % 8 or bk % 8 or bq < 8 or bk < 8:
        return f"kernel block sizes must be positive multiples of 8, got ({bq}, {bk})"
    for leaf in mask.leaves():
        if isinstance(leaf, BlockSparse) and leaf.on_device and not leaf.aligned(bq, bk):
            return (f"a device BlockSparse with blocks ({leaf.block_q}, {leaf.block_k}) needs kernel "
                    f"blocks dividing them, got ({bq}, {bk})")
    return None


def _block_map_mismatch(bmap: BlockMap, B: int, T: int, Hq: int) -> str | None:
    Bm, Hm = bmap.batch_heads
    if bmap.meta.seq_len != T:
        return f"the BlockMap was built for seq_len {bmap.meta.seq_len}, the inputs have T={T}"
    if Bm not in (1, B) or Hm not in (1, Hq):
        return f"the BlockMap has batch/head dims {(Bm, Hm)}; expected 1 or ({B}, {Hq})"
    return None


def pallas_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | BlockMap,
                           segment_ids: jax.Array | None, scale: float, logits_soft_cap: float | None,
                           block_sizes: BlockSizes | None, interpret: Any = None) -> jax.Array:
    """The sparse op through the portable Pallas kernels (arguments as in ``ops.flash_attention``);
    ``interpret`` overrides the platform default (e.g. ``pltpu.InterpretParams()``)."""
    B, T, Hq, Hkv, _, _ = common.check_qkv(q, k, v)
    if isinstance(mask, BlockMap):
        bmap = mask
    else:
        bmap = make_block_map(mask, T, block_sizes or default_block_sizes(mask, T))
    mismatch = _block_map_mismatch(bmap, B, T, Hq)
    if mismatch:
        raise ValueError(mismatch)
    Bm, Hm = bmap.batch_heads
    Tp = bmap.meta.padded_len
    cfg = KernelConfig(meta=bmap.meta, scale=float(scale), soft_cap=logits_soft_cap, groups=Hq // Hkv,
                       map_batch=Bm, map_heads=Hm, fwd_width=bmap.fwd_index.shape[-1],
                       bwd_width=bmap.bwd_index.shape[-1], use_segments=segment_ids is not None,
                       interpret=common.interpret_params() if interpret is None else interpret)
    to_kernel = lambda x: common.pad_axis(jnp.swapaxes(x, 1, 2), Tp, axis=2)
    q_seg = k_seg = None
    if segment_ids is not None:
        seg = common.pad_axis(segment_ids.astype(jnp.int32), Tp, axis=1)
        q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    visits = (bmap.fwd_index, bmap.fwd_kind, bmap.fwd_tile, bmap.bwd_index, bmap.bwd_kind, bmap.bwd_tile)
    maps = tuple(jnp.asarray(m, jnp.int32) for m in visits) + (jnp.asarray(bmap.tiles, jnp.int8),)
    o = _attention(cfg, to_kernel(q), to_kernel(k), to_kernel(v), q_seg, k_seg, maps)
    return jnp.swapaxes(o[:, :, :T], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: KernelConfig, q, k, v, q_seg, k_seg, maps):
    return forward(cfg, q, k, v, q_seg, k_seg, maps)[0]


def _attention_fwd(cfg, q, k, v, q_seg, k_seg, maps):
    o, lse = forward(cfg, q, k, v, q_seg, k_seg, maps)
    return o, (q, k, v, q_seg, k_seg, maps, o, lse)


def _attention_bwd(cfg, residuals, do):
    q, k, v, q_seg, k_seg, maps, o, lse = residuals
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = backward(cfg, q, k, v, q_seg, k_seg, maps, do, lse, delta)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
