"""Orbax checkpoints of the train state together with the Grain iterator state.

One Orbax step directory holds both items (``state``: the sharded train-state pytree,
``data``: the Grain iterator position), so a restore resumes the model and the data stream
at the same step. Saves are asynchronous; ``close`` waits for them to finish.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic / forced saves into ``<workdir>/checkpoints`` and restore of the latest step."""

    def __init__(self, workdir: str, *, every: int, keep: int):
        if every < 1:
            raise ValueError(f"train.checkpoint_every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"train.keep must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True,
            create=True)
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """Newest finished checkpoint step, or None for a fresh run."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
        """Start an async save of ``state`` and the iterator position if ``step`` is due (or forced)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Train state at ``step`` laid out as ``abstract_state``; moves ``data_iterator`` in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        return self.manager.restore(step, args=args)["state"]

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (needs jax.distributed.initialize)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for pending async saves, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
