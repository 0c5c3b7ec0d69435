"""The block-sparse softmax attention op: input checks and the one place where an implementation is chosen.

Implementations are registered by name with a ``run`` function and an ``accepts`` check:

    register_implementation("mosaic_gpu", run, accepts, priority=0)   # e.g. a Hopper kernel

``impl=None`` (auto) tries the registered implementations by ascending priority and runs the
first whose ``accepts`` returns None (fail-closed: a reason string means "not this call");
``impl="<name>"`` runs that one or raises with its reason. Built in: "cudnn" (NVIDIA GPUs, the
masks cuDNN runs at speed; priority 5), "mosaic_gpu" (our Hopper kernels, ``mosaic_gpu_op``;
priority 6), "pallas" (portable Pallas kernel: CPU interpret mode and Mosaic TPU; priority 10)
and "xla" (plain jnp, priority 100, accepts every mask object).

Why cuDNN before mosaic_gpu: cuDNN takes only Full / Causal / Local(left, 0) without segments
or soft cap, where it is the measured anchor (1.12 / 4.27 ms at the DESIGN.md shape); every
other Hopper call (block-sparse and other formula masks, packed segments) declines there and
runs the Hopper kernel, which visits only the blocks the block map lists. ``impl="mosaic_gpu"``
runs it on the cuDNN cases too (the benchmark compares the two).

Both ``run`` and ``accepts`` take ``(q, k, v, *, mask, segment_ids, scale, logits_soft_cap,
block_sizes)`` with inputs already checked, ``mask`` a Mask or a BlockMap, ``scale`` a float.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from pallas_kernels import common
from pallas_kernels.sparse.cudnn import cudnn_accepts, dpa_attention
from pallas_kernels.sparse.masks import Full, Mask
from pallas_kernels.sparse.mask_info import BlockMap, BlockSizes
from pallas_kernels.sparse.mosaic_gpu_op import mosaic_gpu_accepts, mosaic_gpu_flash_attention
from pallas_kernels.sparse.pallas_op import pallas_accepts, pallas_flash_attention
from pallas_kernels.sparse.reference import attention_reference
from pallas_kernels.mosaic_gpu_common import GPU_CHECKED


REGISTRY = common.Registry("sparse attention")


def register_implementation(name: str, run: Callable[..., jax.Array],
                            accepts: Callable[..., str | None], *, priority: int,
                            auto: bool = True) -> None:
    """Register (or replace) an implementation; lower ``priority`` is tried first by auto
    (``auto=False``: only ``impl=name`` runs it)."""
    REGISTRY.register(name, run, accepts, priority=priority, auto=auto)


def implementations() -> list[str]:
    """Registered implementation names in auto order."""
    return REGISTRY.names()


def _xla_run(q, k, v, *, mask, segment_ids, scale, logits_soft_cap, block_sizes):
    return attention_reference(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale,
                               logits_soft_cap=logits_soft_cap)


def _xla_accepts(q, k, v, *, mask, **_: Any) -> str | None:
    if isinstance(mask, BlockMap):
        return "the XLA path needs a Mask object, not a prebuilt BlockMap"
    return None


register_implementation("cudnn", dpa_attention, cudnn_accepts, priority=5)
register_implementation("mosaic_gpu", mosaic_gpu_flash_attention, mosaic_gpu_accepts, priority=6,
                        auto="sparse" in GPU_CHECKED)
register_implementation("pallas", pallas_flash_attention, pallas_accepts, priority=10)
register_implementation("xla", _xla_run, _xla_accepts, priority=100)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | BlockMap | None = None,
                    segment_ids: jax.Array | None = None, scale: float | None = None,
                    logits_soft_cap: float | None = None,
                    block_sizes: BlockSizes | tuple[int, int] | None = None,
                    impl: str | None = None) -> jax.Array:
    """Masked (block-sparse) softmax attention.

        o[b,q,h] = sum_k softmax_k(s[b,h,q,:] | allowed) v[b,k,h // G],
        s = scale <q[b,q,h], k[b,k,h // G]>, capped to c tanh(s / c) when logits_soft_cap = c,
        allowed = mask(q, k) and segment_ids[b,q] == segment_ids[b,k]; rows with nothing
        allowed give zeros.

    q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] with Hq a multiple of Hkv (GQA);
    ``mask`` a Mask (default Full()) or a BlockMap from ``make_block_map`` (e.g. built inside
    jit from a device BlockSparse); ``scale`` defaults to D ** -0.5; ``block_sizes``
    (block_q, block_k) are the kernel tiles; ``impl`` None (auto) or a registered name.
    Returns o [B, T, Hq, Dv] in q's dtype.
    """
    B, T, _, _, D, _ = common.check_qkv(q, k, v)
    common.check_segment_ids(segment_ids, B, T)
    if mask is None:
        mask = Full()
    if not isinstance(mask, (Mask, BlockMap)):
        raise TypeError(f"mask must be a Mask, a BlockMap or None, got {type(mask).__name__}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive or None, got {logits_soft_cap}")
    kwargs = dict(mask=mask, segment_ids=segment_ids, scale=D ** -0.5 if scale is None else float(scale),
                  logits_soft_cap=logits_soft_cap,
                  block_sizes=None if block_sizes is None else BlockSizes(*block_sizes))
    return REGISTRY.choose(impl, q, k, v, **kwargs).run(q, k, v, **kwargs)
