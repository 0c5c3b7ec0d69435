"""Hybrid layer patterns build into the decoder LM and train one step."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab.models import DecoderLM

VOCAB = 29


@pytest.mark.parametrize("pattern", ["LS", "GH", "EN"])  # linear + softmax mixes, 2 layers
def test_pattern_builds_and_one_step_lowers_the_loss(pattern):
    options = {"moba": {"block_size": 4, "top_k": 1}, "nsa": {"block_size": 4, "top_k": 1,
                                                              "window": 4},
               "hybrid": {"window": 4}, "sliding_window": {"window": 4}}
    options = {k: {**v, "impl": "xla"} for k, v in options.items()}
    for name in ("linear", "gla", "mamba2", "gated_deltanet", "retnet", "lightning", "deltanet",
                 "softmax"):
        options[name] = {"impl": "xla"}
    model = DecoderLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, mlp_dim=24,
                      pattern=pattern, attention_options=options, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    assert np.isfinite(float(loss)) and float(loss_fn(model)) < float(loss)
    assert len({type(b.attn) for b in model.blocks}) == len(set(pattern))
