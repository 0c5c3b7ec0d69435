"""Parameter counts and forward FLOPs per token, per attention family and for the decoder LM.

Conventions (a multiply-add is 2 FLOPs; forward pass; training = 3 x forward):
  * projections: 2 FLOPs per weight of every matmul kernel (short-conv taps count the same);
  * token mixing, per token and head, at sequence length T (averaged over causal positions):
      softmax              4 D c, c = mean keys seen: (T+1)/2, or the window's mean when set
      moba                 4 D c, c = min((T+1)/2, top_k bs + bs/2)   (+ block scores, small)
      nsa                  4 D (T/(2 bs) + min((T+1)/2, top_k bs + bs/2) + c_window)
      linear rule (chunk C = 64)   2 C (K + V) + 4 K V
      delta rule  (chunk C = 64)   2 C (2 K + V) + 6 K V   (+ the within-chunk solve)
      hybrid                        linear rule + windowed softmax
    with K, V the state sizes after feature maps. This is the work the chunkwise kernels do,
    used for MFU; it is not a count of the minimum possible work.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

import attnlab.layers  # noqa: F401  (registers every family)
from attnlab.layers.hybrid import HybridAttention
from attnlab.layers.recurrent import RecurrentAttention
from attnlab.layers.registry import expand_pattern, make_attention
from attnlab.layers.softmax import SoftmaxAttention
from attnlab.layers.sparse import MoBAAttention, NSAAttention

CHUNK = 64


def _abstract(name: str, **kwargs: Any) -> nnx.Module:
    """The layer built with shapes only (no parameter memory)."""
    return nnx.eval_shape(lambda: make_attention(name, rngs=nnx.Rngs(0), **kwargs))


def _param_sizes(module: nnx.Module) -> tuple[int, int]:
    """(all parameters, parameters that are matmul/conv weights: rank >= 2)."""
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    total = sum(int(np.prod(p.shape)) for p in leaves)
    matmul = sum(int(np.prod(p.shape)) for p in leaves if len(p.shape) >= 2)
    return total, matmul


def _mean_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a causal query sees, over positions 0..T-1, with an optional window."""
    t = np.arange(1, seq_len + 1)
    return float(np.mean(t if window is None else np.minimum(t, window)))


def _linear_rule(k: int, v: int) -> float:
    return 2 * CHUNK * (k + v) + 4 * k * v


def _mixing_flops(layer: nnx.Module, seq_len: int) -> float:
    """Token-mixing FLOPs per token, all heads (see the module docstring)."""
    if isinstance(layer, RecurrentAttention):
        k, v = layer.state_shape
        per_head = (_linear_rule(k, v) if layer.rule == "linear"
                    else 2 * CHUNK * (2 * k + v) + 6 * k * v)
        return layer.num_heads * per_head
    h, d = layer.num_heads, layer.head_dim
    if isinstance(layer, HybridAttention):
        return h * (_linear_rule(d, d) + 4 * d * _mean_context(seq_len, layer.window))
    if isinstance(layer, (MoBAAttention, NSAAttention)):
        bs = layer.block_size
        selected = min((seq_len + 1) / 2, layer.top_k * bs + bs / 2)
        if isinstance(layer, NSAAttention):
            selected += seq_len / (2 * bs) + _mean_context(seq_len, layer.branch_window)
        return h * 4 * d * selected
    if isinstance(layer, SoftmaxAttention):
        return h * 4 * d * _mean_context(seq_len, layer.window)
    raise TypeError(f"no FLOP rule for {type(layer).__name__}; add one to attnlab.flops")


def attention_param_count(name: str, **layer_kwargs: Any) -> int:
    """Number of parameters of attention layer ``name`` built with ``layer_kwargs``
    (d_model, num_heads, ... and family options)."""
    return _param_sizes(_abstract(name, **layer_kwargs))[0]


def attention_flops_per_token(name: str, seq_len: int, **layer_kwargs: Any) -> float:
    """Forward FLOPs per token of attention layer ``name`` at sequence length ``seq_len``."""
    layer = _abstract(name, **layer_kwargs)
    return 2.0 * _param_sizes(layer)[1] + _mixing_flops(layer, seq_len)


def _layer_kwargs(c: Mapping[str, Any], name: str) -> dict[str, Any]:
    options = dict((c.get("attention_options") or {}).get(name, {}))
    return dict(d_model=c["d_model"], num_heads=c["num_heads"],
                num_kv_heads=c.get("num_kv_heads"), head_dim=c.get("head_dim"), **options)


def model_param_count(model_config: Mapping[str, Any]) -> int:
    """Parameters of the decoder LM described by ``config.model`` (attnlab.models.lm layout)."""
    c = dict(model_config)
    d, vocab = c["d_model"], c["vocab_size"]
    per_block = 3 * d * c["mlp_dim"] + 2 * d  # SwiGLU + two RMSNorm scales
    total = vocab * d + d + (0 if c.get("tie_embeddings", True) else d * vocab)
    for name in expand_pattern(c["pattern"], c["num_layers"]):
        total += per_block + attention_param_count(name, **_layer_kwargs(c, name))
    return total


def model_flops_per_token(model_config: Mapping[str, Any], seq_len: int,
                          training: bool = True) -> float:
    """FLOPs per token of the decoder LM: layers (attention + SwiGLU) and the unembedding;
    x3 for a training step (forward + backward). Embedding lookups are free."""
    c = dict(model_config)
    d = c["d_model"]
    flops = 2.0 * d * c["vocab_size"]
    for name in expand_pattern(c["pattern"], c["num_layers"]):
        flops += 2.0 * 3 * d * c["mlp_dim"]
        flops += attention_flops_per_token(name, seq_len, **_layer_kwargs(c, name))
    return 3.0 * flops if training else flops
