"""Every family: the Pallas kernel path (CPU interpret mode) equals the XLA path, forward and the
gradient of the input and of every parameter, on packed documents."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import attnlab.layers as layers
from attnlab.layers.hybrid import HybridAttention
from attnlab.layers.recurrent import RecurrentAttention
from kernel_utils import assert_close, normal
from pallas_kernels import delta, linear, sparse

PALLAS_READY = {"linear": "pallas" in linear.REGISTRY.names(),
                "delta": "pallas" in delta.implementations(),
                "sparse": "pallas" in sparse.implementations()}

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 1, 16
BATCH, T = 1, 21
# Block sizes of 8: the sparse Pallas path needs kernel blocks that are multiples of 8.
OPTIONS = {
    "sliding_window": {"window": 6},
    "hybrid": {"window": 6},
    "moba": {"block_size": 8, "top_k": 1},
    "nsa": {"block_size": 8, "top_k": 1, "window": 6},
}
NAMES = sorted(layers.available_attention())


def ops_used(layer) -> tuple[str, ...]:
    if isinstance(layer, RecurrentAttention):
        return (layer.rule,)
    return ("linear", "sparse") if isinstance(layer, HybridAttention) else ("sparse",)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_path_equals_xla_path(name):
    x = normal(jax.random.key(0), (BATCH, T, D_MODEL))
    seg = jnp.concatenate([jnp.zeros((BATCH, 8)), jnp.ones((BATCH, T - 8))], 1).astype(jnp.int32)
    w = normal(jax.random.key(1), x.shape)

    def run(impl):
        layer = layers.make_attention(name, d_model=D_MODEL, num_heads=HEADS,
                                      num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                      rngs=nnx.Rngs(0), impl=impl, **OPTIONS.get(name, {}))

        def loss(model, x):
            y = model(x, segment_ids=seg)
            return jnp.sum(y * w), y

        (_, y), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return y, g_x, nnx.state(g_params, nnx.Param)

    probe = layers.make_attention(name, d_model=D_MODEL, num_heads=HEADS, rngs=nnx.Rngs(0),
                                  **OPTIONS.get(name, {}))
    missing = [op for op in ops_used(probe) if not PALLAS_READY[op]]
    if missing:
        pytest.skip(f"no Pallas implementation of pallas_kernels.{missing[0]} registered yet")
    y_k, gx_k, gp_k = run("pallas")
    y_x, gx_x, gp_x = run("xla")
    assert_close(y_k, y_x, 1e-4, f"{name} output")
    assert_close(gx_k, gx_x, 1e-4, f"{name} input gradient")
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(gp_k),
                                 jax.tree_util.tree_leaves_with_path(gp_x)):
        assert_close(a, b, 1e-4, f"{name} gradient {jax.tree_util.keystr(path)}")
