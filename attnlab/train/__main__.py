"""Entry point: python -m attnlab.train --config=configs/tiny.py --workdir=DIR [--config.x.y=v].

Multi-process runs call jax.distributed.initialize first: with --coordinator_address,
--num_processes and --process_id given explicitly, or with --distributed alone to let JAX
detect the cluster (TPU pods, SLURM, Open MPI).
"""
from __future__ import annotations

from typing import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from attnlab.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config. "
                               "An existing run in it is resumed.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "cluster auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO: warnings only
        logging.set_verbosity(logging.WARNING)
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
