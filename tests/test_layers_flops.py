"""attnlab.flops: parameter counts match built modules; FLOP rules behave as documented."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import attnlab.layers as layers
from attnlab import flops
from attnlab.models import DecoderLM

KW = dict(d_model=32, num_heads=4, num_kv_heads=2)


def _count(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", sorted(layers.available_attention()))
def test_param_count_matches_the_built_layer(name):
    built = layers.make_attention(name, rngs=nnx.Rngs(0), **KW)
    assert flops.attention_param_count(name, **KW) == _count(built)
    assert flops.attention_flops_per_token(name, 256, **KW) > 2 * _count(built) * 0.5


def test_softmax_flops_by_hand():
    d, h, t = 32, 4, 9
    projections = 2 * 4 * d * d                       # q, k, v, o: d x d each (MHA)
    mixing = h * 4 * (d // h) * (t + 1) / 2           # mean causal context (T+1)/2
    got = flops.attention_flops_per_token("softmax", t, d_model=d, num_heads=h)
    assert got == pytest.approx(projections + mixing)
    windowed = flops.attention_flops_per_token("softmax", t, d_model=d, num_heads=h, window=3)
    assert windowed == pytest.approx(projections + h * 4 * (d // h) * np.mean([1, 2] + [3] * 7))


def test_linear_families_cost_does_not_grow_with_length_and_softmax_does():
    for name in ("linear", "gla", "gated_deltanet", "mamba2"):
        assert (flops.attention_flops_per_token(name, 128, **KW)
                == flops.attention_flops_per_token(name, 8192, **KW))
    assert (flops.attention_flops_per_token("softmax", 8192, **KW)
            > 10 * flops.attention_flops_per_token("softmax", 128, **KW) / 2)
    window_8k = flops.attention_flops_per_token("sliding_window", 8192, window=64, **KW)
    window_16k = flops.attention_flops_per_token("sliding_window", 16384, window=64, **KW)
    assert window_8k < window_16k == pytest.approx(window_8k, rel=1e-2)  # only the ramp differs


@pytest.mark.parametrize("tie", [True, False])
def test_model_param_count_matches_decoder_lm(tie):
    config = dict(vocab_size=50, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
                  mlp_dim=48, pattern="LGES", tie_embeddings=tie,
                  attention_options={"linear": {"feature_map": "relu"}})
    model = DecoderLM(**config, rngs=nnx.Rngs(0))
    assert flops.model_param_count(config) == _count(model)
    fwd = flops.model_flops_per_token(config, 64, training=False)
    assert flops.model_flops_per_token(config, 64) == pytest.approx(3 * fwd)
    assert fwd > 2 * (_count(model) - (50 * 32 if tie else 0))
