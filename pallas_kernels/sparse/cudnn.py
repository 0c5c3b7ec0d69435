"""cuDNN flash attention on NVIDIA GPUs, for the masks that it runs at full speed.

``jax.nn.dot_product_attention(implementation="cudnn")`` is fast only when the mask is given as
a formula (``is_causal`` / ``local_window_size``); an explicit boolean mask drops it far below.
So this implementation accepts exactly the ``Local`` family of masks without packed segments
or soft cap:

    Full()            all keys                      -> no flags
    Causal()          k <= q                        -> is_causal
    Local(left, 0)    q - left <= k <= q            -> is_causal, local_window_size=(left, 0)

and declines everything else (auto then moves on to the next implementation). It is the GPU
path of the softmax layers until a Hopper block-sparse kernel is registered.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.sparse.masks import Local


def _flags(mask: Any) -> dict[str, Any] | None:
    """dot_product_attention flags for ``mask``, or None when it has no formula cuDNN takes."""
    if not isinstance(mask, Local) or mask.right not in (None, 0):
        return None
    if mask.right is None:  # Full() when left is None; a one-sided future window is not offered
        return {} if mask.left is None else None
    return {"is_causal": True, "local_window_size": None if mask.left is None else (mask.left, 0)}


def dpa_accepts(q, k, v, *, mask, segment_ids, logits_soft_cap, **_: Any) -> str | None:
    """None when the masks, dtypes and shapes fit cuDNN's fast path (apart from the platform)."""
    if _flags(mask) is None:
        return "cuDNN runs only Full, Causal and Local(left, 0) masks at speed"
    if segment_ids is not None:
        return "packed segments would need an explicit mask, which leaves cuDNN's fast path"
    if logits_soft_cap is not None:
        return "cuDNN attention has no logits soft cap"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention takes bfloat16 or float16, got {q.dtype}"
    if v.shape[-1] != q.shape[-1] or q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"cuDNN attention here needs equal q/v head dims, a multiple of 8, <= 128; got {q.shape[-1]}, {v.shape[-1]}"
    return None


def cudnn_accepts(q, k, v, **kwargs: Any) -> str | None:
    if common.platform() != "gpu":
        return f"cuDNN attention runs on NVIDIA GPUs, not {common.platform()}"
    return dpa_accepts(q, k, v, **kwargs)


def dpa_attention(q, k, v, *, mask, scale: float, implementation: str = "cudnn", **_: Any) -> jax.Array:
    """The op through ``jax.nn.dot_product_attention`` (GQA handled by it: k/v heads divide q heads)."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation, **_flags(mask))
