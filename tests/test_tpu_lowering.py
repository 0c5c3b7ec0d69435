"""The portable Pallas kernels (linear recurrence, block-sparse flash attention) lower to Mosaic
TPU: forward and backward exported for the "tpu" platform from this CPU host (Pallas -> Mosaic
TPU dialect: block shapes, ops the TPU lowering supports), at the benchmark's head size with
bf16 inputs. Mosaic's own compile passes run only on a TPU; the numerics are checked in TPU
interpret mode by the kernels' own tests. (The delta-rule kernel has its test in
test_delta_kernels.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear.pallas_op import pallas_gated_linear_attention
from pallas_kernels.sparse import masks
from pallas_kernels.sparse.pallas_op import pallas_flash_attention

spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)


def _exports_to_tpu(fn, *args) -> None:
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("gates", ["none", "g", "gk", "g+gk"])
def test_linear_kernels_lower_to_mosaic_tpu(gates):
    B, T, H, K, V = 1, 100, 1, 128, 128
    args = (spec((B, T, H, K), jnp.bfloat16), spec((B, T, H, K), jnp.bfloat16),
            spec((B, T, H, V), jnp.bfloat16), spec((B, T, H)), spec((B, T, H, K)),
            spec((B, H, K, V)), spec((B, T), jnp.int32))

    def loss(q, k, v, g, gk, s0, seg):
        o, s = pallas_gated_linear_attention(
            q, k, v, g=g if "g" in gates.split("+") else None,
            gk=gk if "gk" in gates else None, scale=K ** -0.5, initial_state=s0,
            segment_ids=seg, chunk_size=64, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    _exports_to_tpu(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), *args)


@pytest.mark.parametrize("name", ["causal", "local", "chunked&causal", "block_sparse", "dense"])
def test_sparse_kernels_lower_to_mosaic_tpu(name):
    B, T, Hq, Hkv, D = 1, 300, 4, 2, 128
    mask = {"causal": masks.Causal(), "local": masks.Local(100, 0),
            "chunked&causal": masks.ChunkedCausal(128) & masks.Causal(),
            "block_sparse": masks.BlockSparse(np.array([[0, -1], [0, 1], [2, -1]]), 128, 128),
            "dense": masks.Dense(np.tril(np.ones((T, T), bool)))}[name]
    args = (spec((B, T, Hq, D), jnp.bfloat16), spec((B, T, Hkv, D), jnp.bfloat16),
            spec((B, T, Hkv, D), jnp.bfloat16), spec((B, T), jnp.int32))

    def loss(q, k, v, seg):
        o = pallas_flash_attention(q, k, v, mask=mask, segment_ids=seg, scale=D ** -0.5,
                                   logits_soft_cap=30.0, block_sizes=None, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    _exports_to_tpu(jax.grad(loss, argnums=(0, 1, 2)), *args)
