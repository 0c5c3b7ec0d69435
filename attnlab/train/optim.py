"""Optimizer: AdamW with linear warmup + cosine decay and global-norm gradient clipping.

    lr(s) = lr * s / warmup                                    for s <= warmup
    lr(s) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)         after, p = (s - warmup) / (steps - warmup)

for update s = 1 .. steps, with r = ``min_lr_ratio``. Weight decay applies to matrices only (ndim >= 2), not to norm
scales or biases.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import optax


def learning_rate_schedule(train_config: Mapping[str, Any]) -> optax.Schedule:
    """Warmup + cosine schedule from ``config.train`` (lr, warmup_steps, steps, min_lr_ratio)."""
    lr, warmup, steps = float(train_config["lr"]), int(train_config["warmup_steps"]), int(train_config["steps"])
    if not 0 <= warmup <= steps:
        raise ValueError(f"train.warmup_steps={warmup} must lie in [0, train.steps={steps}]")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, 1),
        end_value=lr * float(train_config["min_lr_ratio"]))
    return lambda count: schedule(count + 1)  # update k (count k-1) uses lr(k): never lr 0


def make_optimizer(train_config: Mapping[str, Any]) -> optax.GradientTransformation:
    """clip_by_global_norm(train.clip) then AdamW(schedule, b1, b2, weight_decay)."""
    return optax.chain(
        optax.clip_by_global_norm(float(train_config["clip"])),
        optax.adamw(learning_rate_schedule(train_config), b1=float(train_config["b1"]),
                    b2=float(train_config["b2"]), weight_decay=float(train_config["weight_decay"]),
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
