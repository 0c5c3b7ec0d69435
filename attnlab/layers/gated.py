"""Gated linear attention families: one recurrence, different decays.

    S_t = diag(exp(gk_t)) exp(g_t) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

  RetNet     (Sun et al. 2023)   g_h = log(1 - 2^(-5-h)), fixed per head (multi-scale retention)
  Lightning  (Qin et al. 2024)   g_h = -2^(-8(h+1)/H) * (1 - l/L + 1e-5), fixed; silu on q, k
  GLA        (Yang et al. 2024)  gk_t = logsigmoid(x_t W_1 W_2 + b) / 16, per key channel
  Mamba2Like (Dao & Gu 2024)     g_t = -exp(A_log) softplus(x_t W_dt + b_dt), k_t scaled by dt_t,
                                 plus the skip D * v_t; short conv on by default ("simple GLA")

All use the per-head output RMS norm ("group norm") and an output gate by default.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.layers.common import ScalarDecay, dense
from attnlab.layers.recurrent import RecurrentAttention
from attnlab.layers.registry import register_attention


def _per_head_gate(decay: tuple[float, ...], like: jax.Array) -> jax.Array:
    """Broadcast a fixed log-decay per head (H floats) to [B, T, H] float32."""
    return jnp.broadcast_to(jnp.asarray(decay, jnp.float32), like.shape[:3])


@register_attention("retnet", code="R")
class RetNet(RecurrentAttention):
    """Multi-scale retention: fixed decay gamma_h = 1 - 2^(-5-h), group norm and swish gate."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, **kwargs: Any):
        kwargs.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
        self.log_decay = tuple(math.log1p(-2.0 ** (-5.0 - h)) for h in range(self.num_heads))

    def _terms(self, x, q, k, v):
        return q, k, v, {"g": _per_head_gate(self.log_decay, q)}


@register_attention("lightning", code="T")
class LightningAttention(RecurrentAttention):
    """TransNormerLLM / Lightning Attention: fixed ALiBi-like decay per head, scaled down with depth
    (``layer_index`` of ``num_layers``, passed by the model), silu feature map, output norm and
    sigmoid gate."""

    uses_layer_depth = True

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, layer_index: int = 0, num_layers: int = 1,
                 **kwargs: Any):
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"layer_index must be in [0, num_layers={num_layers}), "
                             f"got {layer_index}")
        kwargs.setdefault("output_gate", True)
        kwargs.setdefault("gate_activation", "sigmoid")
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
        depth = 1.0 - layer_index / num_layers + 1e-5
        self.log_decay = tuple(-(2.0 ** (-8.0 * h / self.num_heads)) * depth
                               for h in range(1, self.num_heads + 1))

    def _terms(self, x, q, k, v):
        return jax.nn.silu(q), jax.nn.silu(k), v, {"g": _per_head_gate(self.log_decay, q)}


@register_attention("gla", code="G")
class GatedLinearAttention(RecurrentAttention):
    """GLA: per-key-channel data-dependent decay from a low-rank projection (rank ``gate_rank``),
    gk = logsigmoid(.) / ``gate_normalizer``; group norm and swish output gate."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, gate_rank: int = 16,
                 gate_normalizer: float = 16.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **kwargs: Any):
        kwargs.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **kwargs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gk_down = dense(d_model, gate_rank, **kw)
        self.gk_up = dense(gate_rank, self.num_heads * self.key_dim, use_bias=True, **kw)
        self.gate_normalizer = gate_normalizer

    def _terms(self, x, q, k, v):
        logits = self.gk_up(self.gk_down(x)).astype(jnp.float32)
        gk = jax.nn.log_sigmoid(logits) / self.gate_normalizer
        return q, k, v, {"gk": gk.reshape(q.shape[:3] + (self.key_dim,))}


@register_attention("mamba2", code="M")
class Mamba2Like(RecurrentAttention):
    """Mamba-2 / SSD-style layer as attention (q = C, k = B, v = x): scalar data-dependent decay,
    dt-scaled keys, skip D * v, short conv, gated output norm."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **kwargs: Any):
        kwargs.setdefault("short_conv", True)
        kwargs.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **kwargs)
        self.decay = ScalarDecay(d_model, self.num_heads, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
        self.skip = nnx.Param(jnp.ones((self.num_heads,), param_dtype))

    def _terms(self, x, q, k, v):
        g, dt = self.decay(x)
        return q, (k * dt[..., None]).astype(k.dtype), v, {"g": g}

    def _finish(self, o, v):
        return o + (self.skip[...][:, None] * v).astype(o.dtype)
