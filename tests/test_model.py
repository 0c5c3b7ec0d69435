"""DecoderLM: shapes, dtypes, causality, segment isolation and decoding for every registered
attention, and the depth each layer receives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab.layers  # noqa: F401  (registers the attention layers)
from attnlab.layers.registry import available_attention
from attnlab.models import DecoderLM
from kernel_utils import assert_close

VOCAB, D, HEADS, T = 37, 16, 2, 11
ATTENTION_NAMES = sorted(available_attention())
# XLA paths (the kernels are compared with them in test_layers_kernels.py); blocks and windows
# small enough that T = 11 exercises block selection, windows and partial blocks.
_SMALL = {"sliding_window": {"window": 5}, "hybrid": {"window": 5},
          "moba": {"block_size": 4, "top_k": 1}, "nsa": {"block_size": 4, "top_k": 1, "window": 5}}
OPTIONS = {name: {"impl": "xla", **_SMALL.get(name, {})} for name in ATTENTION_NAMES}


def tiny_model(pattern: str, *, tie: bool = True, dtype=jnp.float32, num_layers: int = 2,
               options=None) -> DecoderLM:
    """A 2-layer model; ``pattern`` is a pattern string or one registered name (both layers)."""
    if pattern in ATTENTION_NAMES:
        pattern = f"{pattern},{pattern}"
    return DecoderLM(vocab_size=VOCAB, d_model=D, num_layers=num_layers, num_heads=HEADS,
                     num_kv_heads=1, mlp_dim=24, pattern=pattern, tie_embeddings=tie,
                     attention_options=OPTIONS if options is None else options,
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


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_decode_equals_full_forward(name):
    """Prefill, single steps, then several tokens at once: the logits equal the full forward's."""
    model = tiny_model(name)
    tokens = random_tokens(7)
    full = model(tokens)
    cache = model.init_cache(2, T)
    pieces = []
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 7), (7, T)):  # lengths 4, 1, 1, 1, 4
        logits, cache = model.decode(tokens[:, start:stop], cache)
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    assert decoded.shape == full.shape and decoded.dtype == jnp.float32
    assert_close(decoded, full, 1e-4, f"{name}: decode vs full forward")


def test_decode_rejects_a_cache_of_another_model():
    with pytest.raises(ValueError, match="cache has 1 entries for 2 blocks"):
        tiny_model("linear").decode(random_tokens(0), tiny_model("L", num_layers=1)
                                    .init_cache(2, T))


def test_lightning_layers_get_their_depth_decay():
    """Layer l of L gets g_h = -2^(-8h/H) (1 - l/L + 1e-5), h = 1..H: deeper layers decay less."""
    model = tiny_model("T", num_layers=3)
    decays = [np.asarray(block.attn.log_decay) for block in model.blocks]
    h = np.arange(1, HEADS + 1)
    for index, decay in enumerate(decays):
        np.testing.assert_allclose(decay, -(2.0 ** (-8.0 * h / HEADS)) * (1 - index / 3 + 1e-5),
                                   rtol=1e-12)
    assert np.all(decays[0] < decays[1]) and np.all(decays[1] < decays[2])
    # Only depth-aware layers get the depth (RetNet's constructor would reject it).
    mixed = tiny_model("retnet,lightning")
    np.testing.assert_allclose(np.asarray(mixed.blocks[1].attn.log_decay),
                               -(2.0 ** (-8.0 * h / HEADS)) * (1 - 1 / 2 + 1e-5), rtol=1e-12)


def test_depth_options_are_the_models_to_set():
    options = {**OPTIONS, "lightning": {"impl": "xla", "layer_index": 0}}
    with pytest.raises(ValueError, match="attention_options.lightning sets.*layer_index"):
        tiny_model("lightning", options=options)
