"""Optimizer: AdamW with linear warmup + cosine decay and global-norm gradient clipping.

    lr(s) = lr * s / warmup                                    for s <= warmup
    lr(s) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)         after, p = (s - warmup) / (steps - warmup)

for update s = 1 .. steps, with r = ``min_lr_ratio``. Weight decay applies to matrices only (ndim >= 2), not to norm
scales or biases.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(train_config: Mapping[str, Any]) -> optax.Schedule:
    """Warmup + cosine schedule from ``config.train`` (lr, warmup_steps, steps, min_lr_ratio).

    Called with optax's update count c = s - 1, so the first update already has a nonzero rate.
    """
    lr, warmup, steps = float(train_config["lr"]), int(train_config["warmup_steps"]), int(train_config["steps"])
    floor = lr * float(train_config["min_lr_ratio"])
    if not 0 <= warmup <= steps:
        raise ValueError(f"train.warmup_steps={warmup} must lie in [0, train.steps={steps}]")

    def schedule(count: jax.Array) -> jax.Array:
        s = jnp.asarray(count, jnp.float32) + 1.0
        p = jnp.clip((s - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        decayed = floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        return jnp.where(s <= warmup, lr * s / max(warmup, 1), decayed)

    return schedule


def make_optimizer(train_config: Mapping[str, Any]) -> optax.GradientTransformation:
    """clip_by_global_norm(train.clip) then AdamW(schedule, b1, b2, weight_decay)."""
    return optax.chain(
        optax.clip_by_global_norm(float(train_config["clip"])),
        optax.adamw(learning_rate_schedule(train_config), b1=float(train_config["b1"]),
                    b2=float(train_config["b2"]), weight_decay=float(train_config["weight_decay"]),
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
