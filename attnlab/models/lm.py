"""Decoder-only language model whose per-layer attention comes from the registry.

    h_0   = E[tokens]                                   (token embedding, no positional add:
                                                          softmax layers apply RoPE themselves)
    a_l   = h_{l-1} + Attn_l(RMSNorm(h_{l-1}), segment_ids, positions)
    h_l   = a_l + W_down( silu(W_gate RMSNorm(a_l)) * (W_up RMSNorm(a_l)) )     (SwiGLU)
    logits = RMSNorm(h_L) @ E^T   (tied)   or   RMSNorm(h_L) @ W_out   (untied), float32

``Attn_l`` is the registered layer named by ``pattern`` (e.g. "LLLS" -> linear, linear,
linear, softmax, repeated to ``num_layers``). Parameters are created in ``param_dtype``
(float32 master weights) and computation runs in ``dtype`` (e.g. bfloat16). No parameter
carries sharding metadata, so the model builds without a mesh; the train code shards it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.layers.registry import expand_pattern, make_attention, uses_layer_depth

_INIT_STD = 0.02  # GPT-2 style normal init for embeddings and projections


def _normal(std: float) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


class SwiGLU(nnx.Module):
    """y = W_down(silu(W_gate x) * W_up x), no biases."""

    def __init__(self, d_model: int, mlp_dim: int, *, out_std: float, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        def linear(d_in: int, d_out: int, std: float) -> nnx.Linear:
            return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal(std), rngs=rngs)

        self.gate = linear(d_model, mlp_dim, _INIT_STD)
        self.up = linear(d_model, mlp_dim, _INIT_STD)
        self.down = linear(mlp_dim, d_model, out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + Attn(RMSNorm x), then + SwiGLU(RMSNorm x).

    ``__call__`` runs the attention over a whole sequence, ``decode`` continues it from the
    layer's cache; both share ``_residual`` (norms, residual adds and the MLP).
    """

    def __init__(self, attention: str, *, d_model: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, mlp_dim: int, out_std: float, attention_options: Mapping[str, Any],
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.attention_name = attention
        self.attn_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = make_attention(attention, d_model=d_model, num_heads=num_heads,
                                   num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs, **dict(attention_options))
        self.mlp_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(d_model, mlp_dim, out_std=out_std, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def _residual(self, x: jax.Array, attend: Callable[[jax.Array], tuple[jax.Array, Any]]
                  ) -> tuple[jax.Array, Any]:
        """The block around ``attend`` (normed input -> (attention output, extra)); returns the
        block output and ``attend``'s extra (the new cache when decoding)."""
        y, extra = attend(self.attn_norm(x))
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), extra

    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self._residual(x, lambda h: (self.attn(h, segment_ids=segment_ids,
                                                      positions=positions), None))[0]

    def decode(self, x: jax.Array, cache: Any, positions: jax.Array | None = None
               ) -> tuple[jax.Array, Any]:
        """x [B, t, d_model]: t >= 1 new positions after those already in ``cache``."""
        return self._residual(x, lambda h: self.attn.decode(h, cache, positions=positions))


class DecoderLM(nnx.Module):
    """Decoder LM: ``model(tokens, segment_ids=None, positions=None) -> float32 logits``.

    tokens [B, T] int; segment_ids [B, T] int (packed documents, default all ones);
    positions [B, T] int (position inside each document, default 0..T-1).

    Decoding (the contract of ``attnlab.generate``): ``cache = model.init_cache(B, max_len)``,
    then ``logits, cache = model.decode(tokens, cache)`` with tokens [B, t], t >= 1 (a prefill,
    then single steps); the logits equal those of the full forward at the same positions.

    Layers whose class sets ``uses_layer_depth`` (see ``attnlab.layers.registry``) receive
    ``layer_index`` (0-based) and ``num_layers`` from the model, e.g. Lightning's depth decay.
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 pattern: str, mlp_dim: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, tie_embeddings: bool = True,
                 attention_options: Mapping[str, Mapping[str, Any]] | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"model.d_model={d_model} is not divisible by model.num_heads="
                                 f"{num_heads}; set model.head_dim explicitly")
            head_dim = d_model // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"model.num_heads={num_heads} is not a multiple of "
                             f"model.num_kv_heads={num_kv_heads}")
        names = expand_pattern(pattern, num_layers)
        options = {k: dict(v) for k, v in (attention_options or {}).items()}
        self.dtype = dtype
        self.layer_names = tuple(names)
        self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=_normal(_INIT_STD), rngs=rngs)
        out_std = _INIT_STD / (2 * num_layers) ** 0.5  # residual-branch outputs, GPT-2 scaling
        self.blocks = nnx.List([
            DecoderBlock(name, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, mlp_dim=mlp_dim, out_std=out_std,
                         attention_options=_layer_options(name, options, index, num_layers),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for index, name in enumerate(names)])
        self.final_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.unembed = None if tie_embeddings else nnx.Param(
            _normal(_INIT_STD)(rngs.params(), (d_model, vocab_size), param_dtype))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        return self.embed(tokens)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        w = self.embed.embedding[...].T if self.unembed is None else self.unembed[...]
        return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        x = self._embed(tokens)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        for block in self.blocks:
            x = block(x, segment_ids, positions)
        return self._logits(x)

    def init_cache(self, batch_size: int, max_len: int) -> list[Any]:
        """One cache per block (KV cache for softmax layers, O(1) state for recurrent ones),
        room for ``max_len`` positions in all."""
        return [block.attn.init_cache(batch_size, max_len) for block in self.blocks]

    def decode(self, tokens: jax.Array, cache: list[Any], positions: jax.Array | None = None
               ) -> tuple[jax.Array, list[Any]]:
        """Logits [B, t, V] (float32) of t >= 1 new tokens [B, t] following those in ``cache``,
        and the updated cache. ``positions`` [B, t] defaults to the next cache slots."""
        if len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.blocks)} blocks; "
                             "make it with model.init_cache")
        x = self._embed(tokens)
        new_cache = []
        for block, block_cache in zip(self.blocks, cache):
            x, block_cache = block.decode(x, block_cache, positions)
            new_cache.append(block_cache)
        return self._logits(x), new_cache


def _layer_options(name: str, options: Mapping[str, Mapping[str, Any]], index: int,
                   num_layers: int) -> dict[str, Any]:
    """``attention_options[name]`` plus layer_index / num_layers for depth-aware layers."""
    layer_options = dict(options.get(name, {}))
    if uses_layer_depth(name):
        given = sorted({"layer_index", "num_layers"} & set(layer_options))
        if given:
            raise ValueError(f"model.attention_options.{name} sets {given}; the model passes "
                             "each layer its own depth")
        layer_options.update(layer_index=index, num_layers=num_layers)
    return layer_options


def build_model(model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> DecoderLM:
    """DecoderLM from a ``config.model`` ConfigDict (dtypes given as names, e.g. "bfloat16")."""
    c = dict(model_config)
    if c.get("vocab_size") is None:
        raise ValueError("model.vocab_size is not set (the train code fills it from the data)")
    return DecoderLM(
        vocab_size=c["vocab_size"], d_model=c["d_model"], num_layers=c["num_layers"],
        num_heads=c["num_heads"], num_kv_heads=c.get("num_kv_heads"),
        head_dim=c.get("head_dim"), mlp_dim=c["mlp_dim"], pattern=c["pattern"],
        tie_embeddings=c.get("tie_embeddings", True),
        attention_options=c.get("attention_options") or {},
        dtype=jnp.dtype(c.get("dtype", "float32")),
        param_dtype=jnp.dtype(c.get("param_dtype", "float32")), rngs=rngs)
