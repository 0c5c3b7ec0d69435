"""Every registered attention layer against the layer contract (one parametrised suite).

For each family: output shape, causality, a gradient reaching every parameter, decode (prefill,
single steps, a multi-token step) equal to the full forward, packed documents equal to separate
calls; the kernel path is compared with the XLA path in test_layers_kernels.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab.layers as layers
from kernel_utils import assert_close, normal

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 2, 6
BATCH, T = 2, 13
TOL = 1e-4  # relative L2 error, float32 (DESIGN.md)

# Small block/window sizes so that T = 13 exercises sparsity, windows and partial blocks.
FAMILY_OPTIONS = {
    "sliding_window": {"window": 5},
    "hybrid": {"window": 5},
    "moba": {"block_size": 4, "top_k": 1},
    "nsa": {"block_size": 4, "top_k": 1, "window": 5},
}
VARIANTS = [
    ("softmax", {"window": 6, "logits_soft_cap": 2.0}),
    ("linear", {"feature_map": "silu", "key_dim": 4, "short_conv": True, "output_gate": True}),
    ("linear", {"feature_map": "relu", "normalization": "sum"}),
    ("linear", {"feature_map": "hedgehog", "normalization": "none"}),
]
CASES = ([(name, FAMILY_OPTIONS.get(name, {})) for name in layers.available_attention()]
         + VARIANTS)
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in CASES]


def build(name: str, options: dict, seed: int = 0, **extra) -> nnx.Module:
    return layers.make_attention(name, d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS,
                                 head_dim=HEAD_DIM, rngs=nnx.Rngs(seed), impl="xla",
                                 **{**options, **extra})


def inputs(seed: int, length: int = T) -> jax.Array:
    return normal(jax.random.key(seed), (BATCH, length, D_MODEL))


def test_every_family_is_registered_with_a_code():
    codes = layers.available_attention()
    for name in ("softmax", "sliding_window", "linear", "retnet", "lightning", "gla", "mamba2",
                 "deltanet", "gated_deltanet", "hybrid", "moba", "nsa"):
        assert codes.get(name), f"{name} is not registered with a pattern code"
    assert len(set(codes.values())) == len(codes)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_shape_and_causality(name, options):
    layer = build(name, options)
    x = inputs(1)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(y)))
    assert float(jnp.linalg.norm(y)) > 0
    cut = 7
    x2 = x.at[:, cut:].set(normal(jax.random.key(2), (BATCH, T - cut, D_MODEL)))
    y2 = layer(x2)
    np.testing.assert_allclose(np.asarray(y2[:, :cut]), np.asarray(y[:, :cut]), rtol=1e-5,
                               atol=1e-6, err_msg="future tokens changed past outputs")
    assert not np.allclose(np.asarray(y2[:, cut:]), np.asarray(y[:, cut:]))


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_gradient_reaches_every_parameter(name, options):
    layer = build(name, options)
    x = inputs(3)
    w = normal(jax.random.key(4), x.shape)

    def loss(model):
        return jnp.sum(model(x) * w)

    grads = nnx.grad(loss)(layer)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert leaves
    for path, g in leaves:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"non-finite gradient at {jax.tree_util.keystr(path)}"
        assert np.linalg.norm(g) > 0, f"zero gradient at {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_decode_equals_forward(name, options):
    layer = build(name, options)
    x = inputs(5)
    full = layer(x)
    cache = layer.init_cache(BATCH, T)
    outs = []
    # Lengths 5, 1, 5 (and 8 in the next test): few distinct shapes keep compilation cheap.
    y, cache = layer.decode(x[:, :5], cache)                  # prefill
    outs.append(y)
    for t in range(5, 8):                                     # single steps
        y, cache = layer.decode(x[:, t:t + 1], cache)
        outs.append(y)
    y, cache = layer.decode(x[:, 8:], cache)                  # several new tokens at once
    outs.append(y)
    assert_close(jnp.concatenate(outs, axis=1), full, TOL, f"{name} decode vs forward")


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_packed_documents_equal_separate(name, options):
    layer = build(name, options)
    first, second = 8, T - 8  # the first document is whole blocks (sparse layers' contract)
    x = inputs(6, first + second)
    seg = jnp.concatenate([jnp.full((BATCH, first), 3), jnp.full((BATCH, second), 7)], axis=1)
    packed = layer(x, segment_ids=seg.astype(jnp.int32))
    assert_close(packed[:, :first], layer(x[:, :first]), TOL, "first document")
    assert_close(packed[:, first:], layer(x[:, first:]), TOL, "second document")


def test_moba_with_every_block_selected_is_causal_softmax():
    x = inputs(8)
    dense = build("softmax", {})
    everything = build("moba", {"block_size": 4, "top_k": 8})
    few = build("moba", {"block_size": 4, "top_k": 1})
    assert_close(everything(x), dense(x), TOL, "MoBA with all blocks")
    assert not np.allclose(np.asarray(few(x)), np.asarray(dense(x)), atol=1e-6)


def test_sliding_window_is_not_full_attention():
    x = inputs(9)
    full, windowed = build("softmax", {}), build("softmax", {"window": 3})
    np.testing.assert_allclose(np.asarray(windowed(x)[:, :3]), np.asarray(full(x)[:, :3]),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(windowed(x)[:, 3:]), np.asarray(full(x)[:, 3:]), atol=1e-6)


def test_rope_positions_follow_documents_by_default():
    layer = build("softmax", {"rope_theta": 10000.0})
    x = inputs(10)
    seg = jnp.concatenate([jnp.zeros((BATCH, 5)), jnp.ones((BATCH, T - 5))], 1).astype(jnp.int32)
    pos = jnp.concatenate([jnp.arange(5), jnp.arange(T - 5)])[None].repeat(BATCH, 0)
    assert_close(layer(x, segment_ids=seg), layer(x, segment_ids=seg, positions=pos), 1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=5), "divisible"),
    (dict(num_kv_heads=3), "multiple"),
])
def test_bad_head_configuration_is_a_clear_error(kwargs, match):
    args = {**dict(d_model=D_MODEL, num_heads=HEADS, rngs=nnx.Rngs(0)), **kwargs}
    with pytest.raises(ValueError, match=match):
        layers.make_attention("gla", **args)


@pytest.mark.parametrize("name,options,match", [
    ("linear", {"feature_map": "cosine"}, "feature_map"),
    ("linear", {"normalization": "layer"}, "normalization"),
    ("softmax", {"window": 0}, "window"),
    ("moba", {"top_k": 0}, "top_k"),
    ("lightning", {"layer_index": 3, "num_layers": 2}, "layer_index"),
    ("retnet", {"output_gate": True, "gate_activation": "tanh"}, "activation"),
])
def test_bad_options_are_clear_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        build(name, options)


@pytest.mark.parametrize("name", sorted(layers.available_attention()))
def test_bfloat16_compute_stays_close_to_float32(name):
    options = FAMILY_OPTIONS.get(name, {})
    x = inputs(11)
    y = build(name, options, dtype=jnp.bfloat16)(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert_close(y, build(name, options)(x), 5e-2, f"{name} bf16 compute vs f32")
