"""Using attnlab's layers from another project: a standalone NNX model, and a Linen model through
``flax.nnx.bridge.ToLinen`` (the README example). Nothing here imports attnlab.models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

from attnlab.layers import GatedLinearAttention


class TinyClassifier(nnx.Module):
    """A user's own NNX model: GLA token mixer + mean pooling + linear head."""

    def __init__(self, d_model: int, num_classes: int, *, rngs: nnx.Rngs):
        self.mixer = GatedLinearAttention(d_model, num_heads=2, rngs=rngs, impl="xla")
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jnp.mean(x + self.mixer(x), axis=1))


class LinenBlock(linen.Module):
    """A user's Linen model with the NNX GLA layer inside, through the bridge."""

    d_model: int

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mixer = nnx.bridge.ToLinen(GatedLinearAttention, args=(self.d_model, 2),
                                   kwargs={"impl": "xla"})
        y = mixer(x)
        return linen.Dense(self.d_model)(x + y)


def test_standalone_nnx_model_trains_one_step():
    model = TinyClassifier(16, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 9, 16))
    labels = jnp.array([0, 1, 2, 1])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    before = float(step(model, optimizer))
    after = float(loss_fn(model))
    assert np.isfinite(before) and after < before


def test_linen_model_through_bridge():
    block = LinenBlock(16)
    x = jax.random.normal(jax.random.key(2), (2, 7, 16))
    variables = block.init(jax.random.key(0), x)
    y = block.apply(variables, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
    flat = jax.tree_util.tree_leaves_with_path(variables["params"])
    assert any("gk_up" in jax.tree_util.keystr(p) for p, _ in flat)
    grads = jax.grad(lambda v: jnp.sum(block.apply(v, x) ** 2))(variables)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    # the wrapped layer's parameters are live: changing them changes the output
    bumped = jax.tree.map(lambda a: a * 1.5, variables)
    assert not np.allclose(np.asarray(block.apply(bumped, x)), np.asarray(y))
