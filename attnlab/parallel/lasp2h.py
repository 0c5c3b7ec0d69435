"""LASP-2H for softmax layers: all-gather K/V along the sequence axis (call inside ``jax.shard_map``).

Device i holds the contiguous time shard [i·L, (i+1)·L) of q, k, v. One ``all_gather`` of
(k, v, segment_ids) gives every device the whole sequence's keys; its local queries, at global
positions i·L + t, then attend causally:

    o_t = sum_s softmax_s(scale · q_t · k_s + mask(t, s)) v_s,
    mask(t, s) = 0 if s <= i·L + t and seg(t) == seg(s) else -inf.

Plain jnp with the full score block: memory O(B·H·L·T) per device (L local, T global steps),
K/V traffic O(T·Hkv·(K + V)) per device. Gradients by autodiff (the transpose of the gather
is a reduce-scatter of dK/dV).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common


def lasp2h_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str,
                            scale: float | None = None,
                            segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal softmax attention of this device's queries against the gathered keys (see module).

    q [B, L, H, K], k [B, L, Hkv, K], v [B, L, Hkv, V] (GQA: H a multiple of Hkv) and
    segment_ids [B, L] are this device's time shard along ``axis_name``; ``scale`` defaults to
    K^-1/2. Returns o [B, L, H, V] in q's dtype (softmax in float32).
    """
    B, L, H, Hkv, K, _ = common.check_qkv(q, k, v)
    common.check_segment_ids(segment_ids, B, L)
    scale = K ** -0.5 if scale is None else float(scale)
    ids = jnp.zeros((B, L), jnp.int32) if segment_ids is None else segment_ids
    k_all, v_all, ids_all = jax.lax.all_gather((k, v, ids), axis_name, axis=1, tiled=True)
    T = k_all.shape[1]

    q_pos = jax.lax.axis_index(axis_name) * L + jnp.arange(L)
    visible = (q_pos[:, None] >= jnp.arange(T)[None, :])[None] & (ids[:, :, None]
                                                                  == ids_all[:, None, :])
    groups = q.reshape(B, L, Hkv, H // Hkv, K)
    scores = scale * jnp.einsum("blhgk,bshk->bhgls", groups, k_all,
                                preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)     # each query sees itself
    weights = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bhgls,bshv->blhgv", weights, v_all.astype(jnp.float32))
    return o.reshape(B, L, H, -1).astype(q.dtype)
