"""Shared skeleton of every recurrent (linear / gated / delta-rule) attention layer.

    q, k, v = x W_q, x W_k, x W_v      (optional short causal conv + SiLU on q|k|v)
    q, k, v, gates = family terms      (feature map, decays g / gk, delta strength beta)
    o       = recurrence(q, k, v, gates)         one of the two ops below
    y       = W_o( gate(x) * RMSNorm_head(o) )   (output norm and gate optional)

Linear rule (pallas_kernels.linear):  S_t = diag(exp(gk_t)) exp(g_t) S_{t-1} + k_t^T v_t
Delta rule  (pallas_kernels.delta):   S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - exp(g_t) k_t S_{t-1})
and o_t = scale * q_t S_t; S [K, V] per head, reset at segment boundaries. Training uses the
chunkwise op; decoding carries S (float32, O(1) in length) and the short-conv state, with the
step-by-step op for one token and the chunkwise op for a longer prefill.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import delta as delta_ops
from pallas_kernels import linear as linear_ops

from attnlab.layers.common import (HeadRMSNorm, OutputGate, ShortConv, dense, repeat_kv,
                                   resolve_heads, split_heads)

RULES = ("linear", "delta")


def run_recurrence(rule: str, q: jax.Array, k: jax.Array, v: jax.Array, *,
                   g: jax.Array | None = None, gk: jax.Array | None = None,
                   beta: jax.Array | None = None, scale: float,
                   segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None,
                   output_final_state: bool = False, stepwise: bool = False,
                   impl: str | None = None, chunk_size: int | None = None
                   ) -> tuple[jax.Array, jax.Array | None]:
    """Dispatch to the chunkwise (training, prefill) or step-by-step (one-token decode) op."""
    common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, impl=impl)
    if not stepwise:
        common["chunk_size"] = chunk_size
    if rule == "linear":
        if beta is not None:
            raise ValueError("beta is only used by the delta rule")
        fn = (linear_ops.recurrent_gated_linear_attention if stepwise
              else linear_ops.chunk_gated_linear_attention)
        return fn(q, k, v, g=g, gk=gk, **common)
    if rule == "delta":
        if gk is not None or beta is None:
            raise ValueError("the delta rule takes beta and a scalar gate g, not gk")
        fn = delta_ops.recurrent_delta_rule if stepwise else delta_ops.chunk_delta_rule
        return fn(q, k, v, beta, g=g, **common)
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


class RecurrentAttention(nnx.Module):
    """Base class: projections, short conv, output norm/gate, cache. Subclasses set ``rule`` and
    override ``_terms`` (feature maps and gates) and, where needed, ``_finish``.

    Common options: ``short_conv`` (width ``conv_width``), ``output_gate`` (activation
    ``gate_activation``), ``output_norm`` (per-head RMS norm), ``key_dim`` (per-head q/k width,
    default head_dim), ``scale`` (default key_dim^-1/2), ``chunk_size``, ``impl``.
    GQA: k/v are projected to num_kv_heads heads and shared across each group of q heads.
    """

    rule = "linear"

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, impl: str | None = None,
                 short_conv: bool = False, conv_width: int = 4, output_gate: bool = False,
                 gate_activation: str = "silu", output_norm: bool = True,
                 key_dim: int | None = None, scale: float | None = None,
                 chunk_size: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = resolve_heads(
            d_model, num_heads, num_kv_heads, head_dim)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.key_dim = D if key_dim is None else key_dim
        self.scale = self.key_dim ** -0.5 if scale is None else scale
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        self.d_model = d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d_model, H * self.key_dim, **kw)
        self.k_proj = dense(d_model, Hkv * self.key_dim, **kw)
        self.v_proj = dense(d_model, Hkv * D, **kw)
        self._split = (H * self.key_dim, (H + Hkv) * self.key_dim)
        self.conv = (ShortConv((H + Hkv) * self.key_dim + Hkv * D, conv_width, **kw)
                     if short_conv else None)
        self.norm = HeadRMSNorm(D, param_dtype=param_dtype) if output_norm else None
        self.gate = (OutputGate(d_model, H * D, activation=gate_activation, **kw)
                     if output_gate else None)
        self.o_proj = dense(H * D, d_model, **kw)

    # ---- hooks for the families -------------------------------------------------------------
    def _terms(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        """Family-specific (q, k, v, {g, gk, beta}) from heads [B, T, H, *]; default: none."""
        return q, k, v, {}

    def _finish(self, o: jax.Array, v: jax.Array) -> jax.Array:
        """Family-specific post-processing of the recurrence output (before norm and gate)."""
        return o

    @property
    def state_shape(self) -> tuple[int, int]:
        """(K, V) of the recurrent state per head, after feature maps."""
        return self.key_dim, self.head_dim

    # ---- shared flow --------------------------------------------------------------------------
    def _inputs(self, x: jax.Array, segment_ids: jax.Array | None, conv_state: jax.Array | None,
                decoding: bool) -> tuple[Any, ...]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            qkv = jnp.concatenate([q, k, v], axis=-1)
            if decoding:
                qkv, conv_state = self.conv.step(qkv, conv_state)
            else:
                qkv = self.conv(qkv, segment_ids)
            q, k, v = jnp.split(qkv, self._split, axis=-1)
        H = self.num_heads
        q = split_heads(q, H)
        k = repeat_kv(split_heads(k, self.num_kv_heads), H)
        v = repeat_kv(split_heads(v, self.num_kv_heads), H)
        q, k, v, terms = self._terms(x, q, k, v)
        return q, k, v, terms, conv_state

    def _output(self, o: jax.Array, v: jax.Array, x: jax.Array) -> jax.Array:
        o = self._finish(o, v)
        if self.norm is not None:
            o = self.norm(o)
        o = o.reshape(*o.shape[:2], -1).astype(self.dtype)
        if self.gate is not None:
            o = self.gate(o, x)
        return self.o_proj(o)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        q, k, v, terms, _ = self._inputs(x, segment_ids, None, decoding=False)
        o, _ = run_recurrence(self.rule, q, k, v, scale=self.scale, segment_ids=segment_ids,
                              impl=self.impl, chunk_size=self.chunk_size, **terms)
        return self._output(o, v, x)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        """O(1) cache: the float32 state [B, H, K, V] (and the short-conv inputs); max_len unused."""
        cache = {"state": jnp.zeros((batch_size, self.num_heads, *self.state_shape), jnp.float32)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_state(batch_size)
        return cache

    def decode(self, x: jax.Array, cache: dict[str, jax.Array],
               positions: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        q, k, v, terms, conv_state = self._inputs(x, None, cache.get("conv"), decoding=True)
        o, state = run_recurrence(self.rule, q, k, v, scale=self.scale,
                                  initial_state=cache["state"], output_final_state=True,
                                  stepwise=x.shape[1] == 1, impl=self.impl,
                                  chunk_size=self.chunk_size, **terms)
        new_cache = {"state": state}
        if self.conv is not None:
            new_cache["conv"] = conv_state
        return self._output(o, v, x), new_cache
