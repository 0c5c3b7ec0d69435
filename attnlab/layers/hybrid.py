"""Intra-layer hybrid: gated linear attention and sliding-window softmax on shared q, k, v
(in the spirit of Liger attention and LoLA: the window keeps exact recent recall, the recurrent
state summarises everything older at O(1) cost).

    o_lin_t = RMSNorm_head( q_t S_t ),   S_t = exp(g_t) S_{t-1} + k_t^T v_t,
              g_t = -exp(A_log) softplus(x_t W_dt + b_dt)               (Mamba-2 style decay)
    o_swa_t = softmax attention of R q_t over R k_j, t - window < j <= t  (RoPE R, same heads)
    y_t     = W_o( a_h o_lin_t + (1 - a_h) o_swa_t ),   a_h = sigmoid(mix_h), a_h = 1/2 at init

Decoding carries the window branch's KV cache and the linear branch's float32 state.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import sparse as sparse_ops

from attnlab.layers.common import (HeadRMSNorm, ScalarDecay, apply_rope, default_positions, dense,
                                   repeat_kv, resolve_heads, split_heads)
from attnlab.layers.recurrent import run_recurrence
from attnlab.layers.registry import register_attention
from attnlab.layers.softmax import (append_kv_cache, attend_kv_cache, causal_mask,
                                    decode_positions, init_kv_cache)


@register_attention("hybrid", code="H")
class HybridAttention(nnx.Module):
    """Linear (scalar-decay) + sliding-window softmax in one layer, mixed per head.

    Options: ``window`` (default 64 keys), ``rope_theta``, ``impl``, ``chunk_size``.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, impl: str | None = None,
                 window: int = 64, rope_theta: float = 10000.0, chunk_size: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(
            d_model, num_heads, num_kv_heads, head_dim)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.rope_theta, self.impl, self.chunk_size = window, rope_theta, impl, chunk_size
        self.dtype = dtype
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d_model, H * D, **kw)
        self.k_proj = dense(d_model, Hkv * D, **kw)
        self.v_proj = dense(d_model, Hkv * D, **kw)
        self.decay = ScalarDecay(d_model, H, **kw)
        self.norm = HeadRMSNorm(D, param_dtype=param_dtype)
        self.mix = nnx.Param(jnp.zeros((H,), param_dtype))
        self.o_proj = dense(H * D, d_model, **kw)

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        return q, k, v, self.decay(x)[0]

    def _linear_inputs(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        return q, repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)

    def _rope(self, q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)

    def _combine(self, o_lin: jax.Array, o_swa: jax.Array) -> jax.Array:
        a = jax.nn.sigmoid(self.mix[...].astype(jnp.float32))[:, None]
        o = a * self.norm(o_lin).astype(jnp.float32) + (1 - a) * o_swa.astype(jnp.float32)
        return self.o_proj(o.reshape(*o.shape[:2], -1).astype(self.dtype))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        B, T, _ = x.shape
        if positions is None:
            positions = default_positions(segment_ids, B, T)
        q, k, v, g = self._project(x)
        o_lin, _ = run_recurrence("linear", *self._linear_inputs(q, k, v), g=g,
                                  scale=self.head_dim ** -0.5, segment_ids=segment_ids,
                                  impl=self.impl, chunk_size=self.chunk_size)
        qr, kr = self._rope(q, k, positions)
        o_swa = sparse_ops.flash_attention(qr, kr, v, mask=causal_mask(self.window),
                                           segment_ids=segment_ids, impl=self.impl)
        return self._combine(o_lin, o_swa)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, Any]:
        state = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
        return {"state": state, "kv": init_kv_cache(batch_size, max_len, self.num_kv_heads,
                                                    self.head_dim, self.dtype)}

    def decode(self, x: jax.Array, cache: dict[str, Any],
               positions: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        B, t, _ = x.shape
        q, k, v, g = self._project(x)
        o_lin, state = run_recurrence("linear", *self._linear_inputs(q, k, v), g=g,
                                      scale=self.head_dim ** -0.5, initial_state=cache["state"],
                                      output_final_state=True, stepwise=t == 1, impl=self.impl,
                                      chunk_size=self.chunk_size)
        qr, kr = self._rope(q, k, decode_positions(positions, cache["kv"]["index"], B, t))
        kv = append_kv_cache(cache["kv"], kr, v)
        o_swa = attend_kv_cache(qr, kv, cache["kv"]["index"], window=self.window,
                                scale=self.head_dim ** -0.5)
        return self._combine(o_lin, o_swa), {"state": state, "kv": kv}
