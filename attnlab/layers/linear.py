"""Linear attention with a feature map phi and one of two output normalisations.

    S_t = S_{t-1} + phi(k_t)^T v_t,      o_t = scale * phi(q_t) S_t
    "norm" (TransNormer NormAttention):  y_t = RMSNorm_head(o_t)               (default)
    "sum"  (Katharopoulos et al. 2020):  y_t = o_t / (phi(q_t) . sum_{s<=t} phi(k_s))
    "none":                              y_t = o_t

Feature maps: identity, elu+1, relu, silu, and "hedgehog" (Zhang et al. 2024, learnable):
phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h, W_h initialised to the identity, which
doubles the key width of the state. The "sum" denominator is computed by the same recurrence
on v extended with a column of ones (state [K, V+1]), so decoding needs nothing extra.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.layers.recurrent import RecurrentAttention
from attnlab.layers.registry import register_attention

FEATURE_MAPS = ("identity", "elu+1", "relu", "silu", "hedgehog")
NORMALIZATIONS = ("norm", "sum", "none")
_FIXED_MAPS = {
    "identity": lambda x: x,
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class HedgehogFeatureMap(nnx.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] over features, one W_h [K, K] per head."""

    def __init__(self, num_heads: int, dim: int, *, param_dtype: Any):
        self.weight = nnx.Param(jnp.broadcast_to(jnp.eye(dim, dtype=param_dtype),
                                                 (num_heads, dim, dim)))

    def __call__(self, x: jax.Array) -> jax.Array:
        z = jnp.einsum("bthk,hkf->bthf", x.astype(jnp.float32),
                       self.weight[...].astype(jnp.float32))
        return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1).astype(x.dtype)


@register_attention("linear", code="L")
class LinearAttention(RecurrentAttention):
    """Ungated linear attention; ``feature_map`` in FEATURE_MAPS, ``normalization`` in
    NORMALIZATIONS (default "norm": TransNormer's output RMS norm). Other options as in
    RecurrentAttention (short_conv, output_gate, key_dim, impl, ...)."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, feature_map: str = "elu+1",
                 normalization: str = "norm", param_dtype: Any = jnp.float32,
                 eps: float = 1e-6, **kwargs: Any):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                             f"got {normalization!r}")
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, param_dtype=param_dtype,
                         output_norm=normalization == "norm", **kwargs)
        self.feature_map, self.normalization, self.eps = feature_map, normalization, eps
        self.hedgehog = (HedgehogFeatureMap(self.num_heads, self.key_dim, param_dtype=param_dtype)
                         if feature_map == "hedgehog" else None)

    @property
    def state_shape(self) -> tuple[int, int]:
        k = 2 * self.key_dim if self.hedgehog is not None else self.key_dim
        return k, self.head_dim + (self.normalization == "sum")

    def _phi(self, x: jax.Array) -> jax.Array:
        return self.hedgehog(x) if self.hedgehog is not None else _FIXED_MAPS[self.feature_map](x)

    def _terms(self, x, q, k, v):
        if self.normalization == "sum":
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        return self._phi(q), self._phi(k), v, {}

    def _finish(self, o, v):
        if self.normalization != "sum":
            return o
        of = o.astype(jnp.float32)
        return (of[..., :-1] / (of[..., -1:] + self.eps)).astype(o.dtype)
