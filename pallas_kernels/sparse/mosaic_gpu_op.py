"""The sparse op through the Hopper (Mosaic GPU) kernels: what they accept, layout, custom_vjp.

    o = softmax(scale q k^T | allowed) v      (see ``ops.flash_attention``)

Inputs stay in the op's [B, T, H, D] layout (TMA reads a [rows, D] tile of one head directly);
T is padded to the block map's Tp (padded keys are masked in the kernels, padded query rows
dropped). The block map is built for the kernels' own tiles (BLOCK_Q, BLOCK_K) = (128, 128)
and packed into one int32 row per block (``visit_rows``).

Forward: ``mosaic_gpu_fwd`` (o and the base-2 lse). Backward (``mosaic_gpu_bwd``): delta =
rowsum(dO ⊙ O) in XLA, then a dq kernel walking the forward visits and a dk/dv kernel walking
the transposed visits; for GQA the dk/dv kernel walks the visits of every q head of its k/v
head's group in turn, so dk and dv are summed in registers, never per q head in memory.

Scope (``mosaic_gpu_accepts`` declines the rest, and everything off Hopper): bf16 q, k, v;
head dims D, Dv in {64, 128}; block_sizes None or (128, 128); masks whose PARTIAL blocks
have a formula (Full, Causal, Local, ChunkedCausal and their & / | combinations) or none
(BlockSparse with blocks that are multiples of 128, alone or & / | with formulas as the block
map allows); segment ids; no logits soft cap; no packed-tile masks (Dense, unaligned
BlockSparse).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.mosaic_gpu_common import hopper_accepts
from pallas_kernels.sparse.mask_info import BlockMap, BlockSizes, make_block_map
from pallas_kernels.sparse.masks import BlockSparse, Mask
from pallas_kernels.sparse.mosaic_gpu_bwd import backward
from pallas_kernels.sparse.mosaic_gpu_fwd import BLOCK_K, BLOCK_Q, forward
from pallas_kernels.sparse.mosaic_gpu_util import Walk, visit_rows

HEAD_DIMS = (64, 128)
TILES = BlockSizes(BLOCK_Q, BLOCK_K)


def _map_reason(bmap: BlockMap, B: int, T: int, Hq: int) -> str | None:
    Bm, Hm = bmap.batch_heads
    meta = bmap.meta
    if (meta.block_q, meta.block_k) != TILES:
        return f"the BlockMap must be built with block sizes {tuple(TILES)} for the Hopper kernel"
    if meta.seq_len != T:
        return f"the BlockMap was built for seq_len {meta.seq_len}, the inputs have T={T}"
    if Bm not in (1, B) or Hm not in (1, Hq):
        return f"the BlockMap has batch/head dims {(Bm, Hm)}; expected 1 or ({B}, {Hq})"
    if meta.rule_kind == "tile":
        return "packed-tile masks (Dense, unaligned BlockSparse) are not supported by the Hopper kernel"
    return None


def mosaic_gpu_accepts(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | BlockMap,
                       logits_soft_cap: float | None, block_sizes: BlockSizes | None,
                       **_: Any) -> str | None:
    """None when the Hopper kernels run this call, else the reason they decline."""
    if (reason := hopper_accepts()) is not None:
        return reason
    reasons = [
        (any(x.dtype != jnp.bfloat16 for x in (q, k, v)), "q, k, v must be bfloat16"),
        (q.shape[-1] not in HEAD_DIMS, f"head dim must be one of {HEAD_DIMS}"),
        (v.shape[-1] not in HEAD_DIMS, f"value head dim must be one of {HEAD_DIMS}"),
        (logits_soft_cap is not None, "the Hopper kernel has no logits soft cap"),
        (block_sizes not in (None, TILES), f"block_sizes must be None or {tuple(TILES)}"),
    ]
    reason = next((r for failed, r in reasons if failed), None)
    if reason is not None:
        return reason
    B, T, Hq = q.shape[:3]
    if isinstance(mask, BlockMap):
        return _map_reason(mask, B, T, Hq)
    if mask.kernel_rule(*TILES).kind == "tile":
        return ("the mask needs packed tiles at 128 x 128 blocks (Dense, or BlockSparse blocks "
                "not multiples of 128): not supported by the Hopper kernel")
    for leaf in mask.leaves():
        if isinstance(leaf, BlockSparse) and leaf.on_device and not leaf.aligned(*TILES):
            return f"a device BlockSparse needs blocks that are multiples of {tuple(TILES)}"
    return None


def mosaic_gpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                               mask: Mask | BlockMap, segment_ids: jax.Array | None,
                               scale: float, logits_soft_cap: float | None = None,
                               block_sizes: BlockSizes | None = None,
                               interpret: Any = None) -> jax.Array:
    """The sparse op through the Hopper kernels (registry contract; call only where
    ``mosaic_gpu_accepts`` returned None). ``interpret``: e.g. ``plgpu.InterpretGPUParams()``
    to run on CPU. Returns o [B, T, Hq, Dv] in q's dtype."""
    del logits_soft_cap, block_sizes  # declined by mosaic_gpu_accepts
    cfg, seg, maps = walk_setup(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale,
                                interpret=interpret)
    pad = lambda x: common.pad_axis(x, cfg.meta.padded_len, axis=1)
    o = _attention(cfg, pad(q), pad(k), pad(v), seg, maps)
    return o[:, :q.shape[1]]


def walk_setup(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | BlockMap,
               segment_ids: jax.Array | None, scale: float, interpret: Any = None
               ) -> tuple[Walk, jax.Array | None, tuple[jax.Array, jax.Array]]:
    """The kernels' static configuration of a call, its segment ids padded to Tp (None
    without) and the packed (forward, transposed) visit rows of its block map."""
    B, T, Hq, Hkv, _, _ = common.check_qkv(q, k, v)
    bmap = mask if isinstance(mask, BlockMap) else make_block_map(mask, T, TILES)
    if (reason := _map_reason(bmap, B, T, Hq)) is not None:
        raise ValueError(reason)
    Bm, Hm = bmap.batch_heads
    cfg = Walk(meta=bmap.meta, scale=float(scale), groups=Hq // Hkv, map_batch=Bm, map_heads=Hm,
               use_segments=segment_ids is not None, interpret=interpret)
    seg = (None if segment_ids is None
           else common.pad_axis(segment_ids.astype(jnp.int32), bmap.meta.padded_len, axis=1))
    maps = (visit_rows(bmap.fwd_index, bmap.fwd_kind), visit_rows(bmap.bwd_index, bmap.bwd_kind))
    return cfg, seg, maps


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: Walk, q, k, v, seg, maps):
    return forward(cfg, q, k, v, maps[0], seg)[0]


def _attention_fwd(cfg, q, k, v, seg, maps):
    o, lse2 = forward(cfg, q, k, v, maps[0], seg)
    return o, (q, k, v, seg, maps, o, lse2)


def _attention_bwd(cfg, residuals, do):
    q, k, v, seg, maps, o, lse2 = residuals
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = backward(cfg, q, k, v, do.astype(q.dtype), lse2, delta, maps, seg)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
