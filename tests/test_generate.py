"""attnlab.generate on a tiny language model built from registered layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab.layers as layers
from attnlab.generate import generate, sample_token

VOCAB, D_MODEL = 37, 16


class TinyLM(nnx.Module):
    """Embedding, one attention layer (residual), RMSNorm, tied unembedding."""

    def __init__(self, attention: str, *, rngs: nnx.Rngs, **options):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.attn = layers.make_attention(attention, d_model=D_MODEL, num_heads=2, rngs=rngs,
                                          impl="xla", **options)
        self.norm = nnx.RMSNorm(D_MODEL, rngs=rngs)

    def _logits(self, x):
        return self.norm(x) @ self.embed.embedding[...].T

    def __call__(self, tokens):
        x = self.embed(tokens)
        return self._logits(x + self.attn(x))

    def init_cache(self, batch_size, max_len):
        return self.attn.init_cache(batch_size, max_len)

    def decode(self, tokens, cache):
        x = self.embed(tokens)
        y, cache = self.attn.decode(x, cache)
        return self._logits(x + y), cache


def prompt(seed=0, batch=2, length=5):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


@pytest.mark.parametrize("attention,options", [
    ("softmax", {}), ("gated_deltanet", {}), ("hybrid", {"window": 3}),
])
def test_greedy_equals_argmax_of_full_forward(attention, options):
    model = TinyLM(attention, rngs=nnx.Rngs(1), **options)
    p = prompt()
    out = generate(model, p, 6)
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(p))
    # Greedy means: each new token is the argmax of the full forward over everything before it.
    logits = model(out[:, :-1])
    np.testing.assert_array_equal(np.asarray(out[:, 5:]),
                                  np.asarray(jnp.argmax(logits[:, 4:], axis=-1)))


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = TinyLM("linear", rngs=nnx.Rngs(2))
    p = prompt(3)
    a = generate(model, p, 8, temperature=1.0, rng=jax.random.key(0))
    b = generate(model, p, 8, temperature=1.0, rng=jax.random.key(0))
    c = generate(model, p, 8, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    greedy = generate(model, p, 8)
    top1 = generate(model, p, 8, temperature=0.7, top_k=1, rng=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


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
    model = TinyLM("softmax", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        generate(model, prompt(), **kwargs)
