"""attnlab.generate on small DecoderLMs built from the tiny config with hybrid layer patterns."""
from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab.layers  # noqa: F401  (registers the attention layers)
from attnlab.generate import generate, sample_token
from attnlab.models import DecoderLM, build_model

VOCAB, PROMPT, NEW = 37, 5, 6
_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def model_from_config(pattern: str, seed: int = 1) -> DecoderLM:
    """configs/tiny.py shrunk to 2 layers of width 16, XLA paths, small windows; untied output
    (with tied embeddings a tiny random model mostly predicts its input token again)."""
    spec = importlib.util.spec_from_file_location("configs_tiny_for_generate", _CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config().model
    c.update(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, mlp_dim=24,
             pattern=pattern, tie_embeddings=False)
    c.attention_options = {name: {"impl": "xla"} for name in attnlab.layers.available_attention()}
    c.attention_options["hybrid"]["window"] = 3
    c.attention_options["nsa"].update(block_size=4, top_k=1, window=3)
    return build_model(c, rngs=nnx.Rngs(seed))


def prompt(seed: int = 0, batch: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, PROMPT), 0, VOCAB)


@pytest.mark.parametrize("pattern", ["LS", "EN", "H"])
def test_greedy_equals_argmax_of_full_forward(pattern):
    model = model_from_config(pattern)
    p = prompt()
    out = generate(model, p, NEW)
    assert out.shape == (2, PROMPT + NEW)
    np.testing.assert_array_equal(np.asarray(out[:, :PROMPT]), np.asarray(p))
    # Greedy means: each new token is the argmax of the full forward over everything before it.
    logits = model(out[:, :-1])
    np.testing.assert_array_equal(np.asarray(out[:, PROMPT:]),
                                  np.asarray(jnp.argmax(logits[:, PROMPT - 1:], axis=-1)))


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = model_from_config("LS", seed=2)
    p = prompt(3)
    a = generate(model, p, 8, temperature=1.0, rng=jax.random.key(0))
    b = generate(model, p, 8, temperature=1.0, rng=jax.random.key(0))
    c = generate(model, p, 8, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a[:, :PROMPT]), np.asarray(p))
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    greedy = generate(model, p, 8)
    top1 = generate(model, p, 8, temperature=0.7, top_k=1, rng=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_sampled_tokens_follow_the_model_distribution():
    """Every sampled token has non-negligible probability under the full forward at its step
    (a sampler reading stale or wrong logits would often draw tokens the model rules out)."""
    model = model_from_config("EN", seed=3)
    out = generate(model, prompt(4, batch=4), NEW, temperature=0.5, top_k=4,
                   rng=jax.random.key(7))
    logits = model(out[:, :-1])[:, PROMPT - 1:]
    allowed = jax.lax.top_k(logits, 4)[1]
    drawn = np.asarray(out[:, PROMPT:])
    assert np.all(np.any(np.asarray(allowed) == drawn[..., None], axis=-1))


def test_top_k_only_draws_from_the_k_best():
    logits = jax.random.normal(jax.random.key(0), (4, VOCAB))
    best3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for seed in range(5):
        tok = np.asarray(sample_token(logits, jax.random.key(seed), 2.0, 3))
        assert all(t in row for t, row in zip(tok, best3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=3, temperature=1.0), "rng"),
    (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=3, max_len=4), "max_len"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model_from_config("LS"), prompt(), **kwargs)
