"""Train state, loss and the jitted train step.

The train state is a plain pytree ``{"step", "params", "opt_state"}`` (params as a nested
dict of arrays, the NNX module's ``nnx.Param`` leaves), so Orbax saves it and the FSDP rule
shards it without knowing about Flax. Non-parameter variables of the model (constants such
as RoPE tables, if a layer keeps any) are rebuilt from the seed and passed separately.

Loss: masked mean next-token cross entropy,
    loss = sum_{b,t} m[b,t] * CE(logits[b,t], targets[b,t]) / max(sum m, 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnlab.models import build_model
from attnlab.train.optim import learning_rate_schedule, make_optimizer
from attnlab.train.sharding import batch_sharding, state_shardings

State = dict[str, Any]
Batch = Mapping[str, jax.Array]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean CE over positions with mask > 0, number of such positions), in float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    count = mask.sum()
    return (ce * mask).sum() / jnp.maximum(count, 1.0), count


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything a run needs besides data: model structure, optimizer, mesh and shardings."""

    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    init_fn: Callable[[], tuple[State, Any]]
    state_sharding: Any
    rest_sharding: Any

    def init(self) -> tuple[State, Any]:
        """Fresh (train state, non-parameter model variables), created already sharded."""
        return jax.jit(self.init_fn, out_shardings=(self.state_sharding, self.rest_sharding))()

    def abstract_state(self) -> State:
        """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
        shapes, _ = jax.eval_shape(self.init_fn)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_sharding)

    def loss(self, params: Any, rest: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """(masked mean CE, number of loss tokens) of the model with ``params`` on ``batch``."""
        model = nnx.merge(self.graphdef, params, rest)
        logits = model(batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"])
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])

    def step(self, state: State, rest: Any, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        """One AdamW step; returns the new state and metrics of the step taken."""
        (loss, count), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], rest, batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": self.schedule(state["step"]), "loss_tokens": count}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def jit_step(self) -> Callable[[State, Any, Batch], tuple[State, dict[str, jax.Array]]]:
        """``step`` jitted with the state donated and its shardings pinned."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(self.step, donate_argnums=0,
                       in_shardings=(self.state_sharding, self.rest_sharding, batch_sharding(self.mesh)),
                       out_shardings=(self.state_sharding, replicated))


def make_trainer(config: Any, mesh: Mesh) -> Trainer:
    """Trainer for ``config`` (``config.model`` with vocab_size set, ``config.train``) on ``mesh``."""
    tx = make_optimizer(config.train)
    seed = int(config.train.seed)

    def init_fn() -> tuple[State, Any]:
        model = build_model(config.model, rngs=nnx.Rngs(seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        return state, rest

    abstract_model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(seed)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    state_shapes, rest_shapes = jax.eval_shape(init_fn)
    replicated = NamedSharding(mesh, PartitionSpec())
    return Trainer(graphdef=graphdef, tx=tx, schedule=learning_rate_schedule(config.train),
                   mesh=mesh, init_fn=init_fn,
                   state_sharding=state_shardings(state_shapes, mesh),
                   rest_sharding=jax.tree.map(lambda _: replicated, rest_shapes))
