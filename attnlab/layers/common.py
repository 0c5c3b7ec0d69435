"""Building blocks shared by every attention layer: head sizes, projections, RoPE, short causal
convolution, per-head RMS norm (the "group norm" of GLA/RetNet), output gate, key L2 norm,
positions from segment ids.

Logical axis names (for users who shard these layers): projection kernels are
("embed", "heads") on the way in and ("heads", "embed") on the way out; no parameter carries
sharding metadata, so every layer builds without a mesh.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # normal init of projections (GPT-2 style, as in attnlab.models)


def resolve_heads(d_model: int, num_heads: int, num_kv_heads: int | None,
                  head_dim: int | None) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) with defaults filled and clear errors for bad sizes."""
    if d_model <= 0 or num_heads <= 0:
        raise ValueError(f"d_model and num_heads must be positive, got {d_model}, {num_heads}")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                             "pass head_dim explicitly")
        head_dim = d_model // num_heads
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive multiple of "
                         f"num_kv_heads={num_kv_heads}")
    return num_heads, num_kv_heads, head_dim


def dense(d_in: int, d_out: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
          use_bias: bool = False, std: float = INIT_STD) -> nnx.Linear:
    """y = x W (+ b), W ~ N(0, std^2), computed in ``dtype``."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(stddev=std), rngs=rngs)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, Hkv, D] -> [B, T, H, D] by repeating each k/v head H/Hkv times (GQA groups)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2) if x.shape[2] != num_heads else x


def default_positions(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Position of each token inside its document: 0.. restarting wherever segment_ids changes."""
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return t
    starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - start_index


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding, half-split form: for pairs (x_i, x_{i+D/2}) with angle p * theta^(-2i/D),
    (a, b) -> (a cos - b sin, a sin + b cos). x [B, T, H, D] (D even), positions [B, T]."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    a, b = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum x^2 + eps) over the last axis (in float32, returned in x's dtype)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class HeadRMSNorm(nnx.Module):
    """Per-head RMS norm ("group norm" with one group per head): y = x / rms(x) * w, over head_dim.

    Used on layer outputs (TransNormer NormAttention, RetNet/GLA group norm) and inside branches.
    """

    def __init__(self, dim: int, *, param_dtype: Any, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class ShortConv(nnx.Module):
    """Depthwise causal convolution with SiLU, y_t = silu(sum_{s<W} w_s * x_{t-s}), per channel.

    Taps never cross a document boundary (x_{t-s} counts only if it has the same segment id as
    x_t). Decoding keeps the last W-1 inputs as state, so a step costs O(W) per channel.
    """

    def __init__(self, channels: int, width: int, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        if width < 1:
            raise ValueError(f"short conv width must be >= 1, got {width}")
        self.width, self.channels, self.dtype = width, channels, dtype
        bound = width ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), param_dtype,
                                                   -bound, bound))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def _conv(self, padded: jax.Array, same_doc: jax.Array | None, length: int) -> jax.Array:
        # padded [B, W-1+T, C]; tap s reads padded[:, W-1-s : W-1-s+T].
        w = self.kernel[...].astype(jnp.float32)
        y = jnp.zeros(padded.shape[:1] + (length, self.channels), jnp.float32) + self.bias[...]
        for s in range(self.width):
            tap = padded[:, self.width - 1 - s: self.width - 1 - s + length].astype(jnp.float32)
            if same_doc is not None:
                tap = tap * same_doc[s][..., None]
            y = y + tap * w[s]
        return jax.nn.silu(y).astype(self.dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, C] -> [B, T, C], zero history before each sequence / document start."""
        B, T, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))
        same_doc = None
        if segment_ids is not None:
            seg = jnp.pad(segment_ids, ((0, 0), (self.width - 1, 0)), constant_values=-1)
            same_doc = jnp.stack([
                (seg[:, self.width - 1 - s: self.width - 1 - s + T] == segment_ids)
                for s in range(self.width)]).astype(jnp.float32)
        return self._conv(padded, same_doc, T)

    def init_state(self, batch_size: int) -> jax.Array:
        return jnp.zeros((batch_size, self.width - 1, self.channels), self.dtype)

    def step(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Continue from ``state`` (the previous W-1 inputs) with t >= 1 new inputs x [B, t, C]."""
        padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
        y = self._conv(padded, None, x.shape[1])
        return y, padded[:, padded.shape[1] - (self.width - 1):].astype(self.dtype)


class OutputGate(nnx.Module):
    """o * act(x W_gate) with act = silu (GLA/RetNet "swish gate") or sigmoid."""

    def __init__(self, d_model: int, width: int, *, activation: str = "silu", dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        acts = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}
        if activation not in acts:
            raise ValueError(f"output gate activation must be one of {sorted(acts)}, "
                             f"got {activation!r}")
        self.act = acts[activation]
        self.proj = dense(d_model, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, o: jax.Array, x: jax.Array) -> jax.Array:
        return o * self.act(self.proj(x)).astype(o.dtype)


class ScalarDecay(nnx.Module):
    """Mamba-2 style data-dependent scalar decay per head and step (log space, <= 0):

        dt_t = softplus(x_t W_dt + b_dt),   g_t = -exp(A_log) * dt_t

    with A = exp(A_log) drawn from [1, 16] and dt at init from [1e-3, 1e-1] (log-uniform).
    Returns (g, dt), both [B, T, H] float32.
    """

    def __init__(self, d_model: int, num_heads: int, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.proj = dense(d_model, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        a = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32, 1.0, 16.0)
        dt = jnp.exp(jax.random.uniform(rngs.params(), (num_heads,), jnp.float32,
                                        jnp.log(1e-3), jnp.log(1e-1)))
        self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus^-1

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        dt = jax.nn.softplus(self.proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        return -jnp.exp(self.a_log[...].astype(jnp.float32)) * dt, dt
