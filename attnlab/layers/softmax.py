"""Softmax attention (MHA / GQA) with RoPE, optional sliding window and logit soft cap.

    o_i = sum_j softmax_j(c * tanh(s_ij / c)) v_j,   s_ij = (R_i q_i) . (R_j k_j) / sqrt(D)

over keys j <= i of the same document (and i - j < window when a window is set); R_p is the
rotary embedding at position p, c the optional soft cap (no tanh when unset). The full-sequence
path runs ``pallas_kernels.sparse.flash_attention`` (mask ``Causal`` or ``Local(window-1, 0)``);
decoding keeps a KV cache of rotated keys and values and attends to it in plain jnp.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import sparse as sparse_ops

from attnlab.layers.common import (apply_rope, default_positions, dense, resolve_heads,
                                   split_heads)
from attnlab.layers.registry import register_attention


def causal_mask(window: int | None) -> Any:
    """The flash-attention mask for causal attention, limited to ``window`` keys when given."""
    return sparse_ops.Causal() if window is None else sparse_ops.Local(window - 1, 0)


def init_kv_cache(batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype: Any) -> dict[str, jax.Array]:
    """Empty KV cache: keys/values [B, max_len, Hkv, D] and the number of filled slots."""
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32)}


def append_kv_cache(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array
                    ) -> dict[str, jax.Array]:
    """Write t new (rotated) keys/values [B, t, Hkv, D] at slot ``cache["index"]`` and advance it.

    The cache must have room (index + t <= max_len); inside jit this cannot be checked.
    """
    index = cache["index"]
    k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    return {"k": k_cache, "v": v_cache, "index": index + k.shape[1]}


def attend_kv_cache(q: jax.Array, cache: dict[str, jax.Array], start: jax.Array, *,
                    window: int | None = None, soft_cap: float | None = None, scale: float,
                    key_mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention of t new queries q [B, t, H, D] (cache slots start .. start + t - 1) over
    an already-appended cache: query slot p sees slots s <= p, s > p - window when a window is
    set, and where ``key_mask`` [B, H, t, max_len] is True when given."""
    B, t, H, D = q.shape
    k_cache, v_cache = cache["k"], cache["v"]
    hkv = k_cache.shape[2]
    qg = q.reshape(B, t, hkv, H // hkv, D)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    q_slot = start + jnp.arange(t)[:, None]
    k_slot = jnp.arange(k_cache.shape[1])[None, :]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    if key_mask is not None:
        allowed = allowed & key_mask.reshape(B, hkv, H // hkv, t, -1)
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgts,bshd->bthgd", p, v_cache.astype(jnp.float32)).reshape(B, t, H, D)
    return o.astype(q.dtype)


def decode_positions(positions: jax.Array | None, index: jax.Array, batch: int,
                     length: int) -> jax.Array:
    """Positions of t new decode tokens: given, or the cache slots index .. index + t - 1."""
    if positions is not None:
        return positions
    return jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32), (batch, length))


@register_attention("softmax", code="S")
class SoftmaxAttention(nnx.Module):
    """Causal softmax attention (MHA when num_kv_heads == num_heads, GQA/MQA when fewer).

    Options: ``window`` (sliding window of that many keys, the query included), ``logits_soft_cap``
    (Gemma-2 style c * tanh(s / c)), ``rope_theta`` (None disables RoPE), ``impl`` (kernel path:
    None auto, "pallas", "xla").
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, impl: str | None = None,
                 window: int | None = None, logits_soft_cap: float | None = None,
                 rope_theta: float | None = 10000.0):
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(
            d_model, num_heads, num_kv_heads, head_dim)
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (keys seen, the query included), got {window}")
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
        self.window, self.soft_cap, self.rope_theta = window, logits_soft_cap, rope_theta
        self.impl, self.dtype = impl, dtype
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d_model, H * D, **kw)
        self.k_proj = dense(d_model, Hkv * D, **kw)
        self.v_proj = dense(d_model, Hkv * D, **kw)
        self.o_proj = dense(H * D, d_model, **kw)

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        if self.rope_theta is not None:
            q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
        return q, k, v

    def _merge(self, o: jax.Array) -> jax.Array:
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        B, T, _ = x.shape
        if positions is None:
            positions = default_positions(segment_ids, B, T)
        q, k, v = self._project(x, positions)
        o = sparse_ops.flash_attention(q, k, v, mask=causal_mask(self.window),
                                       segment_ids=segment_ids, logits_soft_cap=self.soft_cap,
                                       impl=self.impl)
        return self._merge(o)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        return init_kv_cache(batch_size, max_len, self.num_kv_heads, self.head_dim, self.dtype)

    def decode(self, x: jax.Array, cache: dict[str, jax.Array],
               positions: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        B, t, _ = x.shape
        q, k, v = self._project(x, decode_positions(positions, cache["index"], B, t))
        start = cache["index"]
        cache = append_kv_cache(cache, k, v)
        o = attend_kv_cache(q, cache, start, window=self.window, soft_cap=self.soft_cap,
                            scale=self.head_dim ** -0.5)
        return self._merge(o), cache


@register_attention("sliding_window", code="W")
class SlidingWindowAttention(SoftmaxAttention):
    """Softmax attention over the last ``window`` keys (default 256), otherwise as SoftmaxAttention."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, window: int = 256, **kwargs: Any):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, window=window, **kwargs)
