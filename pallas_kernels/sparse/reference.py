"""Plain-jnp masked softmax attention: the oracle of the sparse op and its ``impl="xla"`` path.

    s[b,h,q,k] = scale * <q[b,q,h], k[b,k,h // G]>          (G = q heads per k/v head)
    s          = c * tanh(s / c)                              if logits_soft_cap c is given
    allowed    = mask(q, k) and segment_ids[b,q] == segment_ids[b,k]
    o[b,q,h]   = sum_k softmax_k(s | allowed) v[b,k,h // G];  rows with no allowed key give 0

Float32 accumulation, output in the input dtype. The mask is evaluated in-graph one block of
queries at a time (``Mask.values``), so memory is O(B * H * q_chunk * T), never a host [T, T]
array; a Dense mask is of course O(T^2) already.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.sparse.masks import Full, Mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Mask | None = None,
                        segment_ids: jax.Array | None = None, scale: float | None = None,
                        logits_soft_cap: float | None = None, q_chunk: int = 512) -> jax.Array:
    """Masked softmax attention, [B, T, H, D] layout, GQA by head groups. See the module docstring."""
    B, T, Hq, Hkv, D, _ = common.check_qkv(q, k, v)
    common.check_segment_ids(segment_ids, B, T)
    mask = Full() if mask is None else mask
    scale = D ** -0.5 if scale is None else scale
    groups = Hq // Hkv
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    k_pos = jnp.arange(T)
    outs = []
    for start in range(0, T, q_chunk):
        stop = min(start + q_chunk, T)
        qc = q[:, start:stop].astype(jnp.float32).reshape(B, stop - start, Hkv, groups, D)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qc, kf) * scale
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        allowed = _allowed(mask, jnp.arange(start, stop), k_pos, segment_ids, B, Hq, Hkv)
        s = jnp.where(allowed, s, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))  # softmax is shift-invariant
        p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(l > 0, l, 1.0), vf)
        outs.append(o.reshape(B, stop - start, Hq, -1))
    return jnp.concatenate(outs, axis=1).astype(q.dtype)


def _allowed(mask: Mask, q_pos: jax.Array, k_pos: jax.Array, segment_ids: jax.Array | None,
             B: int, Hq: int, Hkv: int) -> Any:
    """bool broadcastable to [B, Hkv, G, len(q_pos), len(k_pos)]."""
    vals = jnp.asarray(mask.values(q_pos, k_pos))  # [Bm, Hm, q, k]
    Bm, Hm = vals.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(f"mask has batch/head dims {(Bm, Hm)}; expected 1 or ({B}, {Hq})")
    vals = vals[:, None] if Hm == 1 else vals.reshape(Bm, Hkv, Hq // Hkv, *vals.shape[2:])
    if segment_ids is not None:
        same = segment_ids[:, q_pos][:, :, None] == segment_ids[:, k_pos][:, None, :]
        vals = vals & same[:, None, None]
    return vals
