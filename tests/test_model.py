"""DecoderLM: shapes, dtypes, causality and segment isolation for every registered attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab.layers  # noqa: F401  (registers the attention layers)
from attnlab.layers.registry import available_attention
from attnlab.models import DecoderLM

VOCAB, D, HEADS, T = 37, 16, 2, 11
ATTENTION_NAMES = sorted(available_attention())


def tiny_model(pattern: str, *, tie: bool = True, dtype=jnp.float32, num_layers: int = 2) -> DecoderLM:
    """A 2-layer model; ``pattern`` is a pattern string or one registered name (both layers)."""
    if pattern in ATTENTION_NAMES:
        pattern = f"{pattern},{pattern}"
    return DecoderLM(vocab_size=VOCAB, d_model=D, num_layers=num_layers, num_heads=HEADS,
                     num_kv_heads=1, mlp_dim=24, pattern=pattern, tie_embeddings=tie,
                     dtype=dtype, rngs=nnx.Rngs(0))


def random_tokens(seed: int, batch: int = 2, length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def test_some_attention_is_registered():
    assert ATTENTION_NAMES, "attnlab.layers registered no attention layer"


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_shapes_causality_and_packed_documents(name):
    """float32 logits of the right shape; changing the token at t changes no logit before t
    (and does change logits from t on); with segment ids and per-document positions, the second
    packed document's logits equal those of running it alone."""
    model = tiny_model(name)
    assert model.layer_names == (name, name)
    tokens = random_tokens(2)
    t = 6
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    a, b = model(tokens), model(changed)
    assert a.shape == (2, T, VOCAB) and a.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(np.asarray(a[:, :t]), np.asarray(b[:, :t]), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4

    split = 4
    segment_ids = jnp.array([[1] * split + [2] * (T - split)] * 2)
    positions = jnp.array([list(range(split)) + list(range(T - split))] * 2)
    packed = model(tokens, segment_ids=segment_ids, positions=positions)
    alone = model(tokens[:, split:])
    np.testing.assert_allclose(np.asarray(packed[:, split:]), np.asarray(alone), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_untied_output_and_bfloat16_compute_keep_float32_params(dtype):
    tied, untied = tiny_model("softmax"), tiny_model("softmax", tie=False, dtype=dtype)
    assert "unembed" not in nnx.to_pure_dict(nnx.state(tied, nnx.Param))
    params = nnx.state(untied, nnx.Param)
    assert nnx.to_pure_dict(params)["unembed"].shape == (D, VOCAB)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = untied(random_tokens(4))
    assert logits.dtype == jnp.float32 and logits.shape == (2, T, VOCAB)
    if dtype == jnp.bfloat16:  # same weights in float32 compute give nearly the same logits
        reference = tiny_model("softmax", tie=False)
        high = reference(random_tokens(4))
        rel = float(jnp.linalg.norm(logits - high) / jnp.linalg.norm(high))
        assert 0 < rel < 5e-2, rel


def test_bad_pattern_names_the_fields():
    with pytest.raises(ValueError, match="model.pattern.*model.num_layers=2"):
        tiny_model("a,b,c")
    with pytest.raises(ValueError, match="unknown attention 'no_such_attention'"):
        tiny_model("no_such_attention,no_such_attention")


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="model.d_model=16 is not divisible by model.num_heads=3"):
        DecoderLM(vocab_size=VOCAB, d_model=D, num_layers=1, num_heads=3, mlp_dim=8,
                  pattern=ATTENTION_NAMES[0], rngs=nnx.Rngs(0))
