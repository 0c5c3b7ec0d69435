"""Delta-rule families: the state is corrected toward v_t for key k_t instead of only added to.

    S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - exp(g_t) k_t S_{t-1}),   o_t = scale * q_t S_t

  DeltaNet       (Schlag et al. 2021; Yang et al. 2024)  g = 0
  GatedDeltaNet  (Yang, Kautz & Hatamizadeh 2025)        g_t = -exp(A_log) softplus(x_t W + b)

beta_t = sigmoid(x_t W_beta) per head; q and k go through silu and are L2-normalised (the rule
is stable only for ||k|| <= sqrt(2 / beta)); short conv and group norm on by default, and the
gated variant adds a swish output gate.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.layers.common import ScalarDecay, dense, l2_normalize
from attnlab.layers.recurrent import RecurrentAttention
from attnlab.layers.registry import register_attention


@register_attention("deltanet", code="D")
class DeltaNet(RecurrentAttention):
    """DeltaNet: delta rule with learned write strength beta, L2-normalised silu q/k."""

    rule = "delta"

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **kwargs: Any):
        kwargs.setdefault("short_conv", True)
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **kwargs)
        self.beta_proj = dense(d_model, self.num_heads, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def _terms(self, x, q, k, v):
        q, k = l2_normalize(jax.nn.silu(q)), l2_normalize(jax.nn.silu(k))
        beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
        return q, k, v, {"beta": beta}


@register_attention("gated_deltanet", code="E")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet plus a Mamba-2 style data-dependent decay and a swish output gate."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **kwargs: Any):
        kwargs.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **kwargs)
        self.decay = ScalarDecay(d_model, self.num_heads, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

    def _terms(self, x, q, k, v):
        q, k, v, terms = super()._terms(x, q, k, v)
        return q, k, v, {**terms, "g": self.decay(x)[0]}
