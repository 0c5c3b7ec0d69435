"""The pretraining loop: data -> jitted step -> metrics -> periodic checkpoints, resumable.

Step k (1-based) consumes the k-th batch of the Grain iterator; a checkpoint at step s holds
the state after s updates and the iterator after s batches, so a run restarted from it
repeats the uninterrupted run's steps s+1, s+2, ... exactly.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np

import attnlab.layers  # noqa: F401  (registers the attention layers)
from attnlab.data import build_train_iterator, vocab_size
from attnlab.flops import model_flops_per_token
from attnlab.train.checkpoint import Checkpointer
from attnlab.train.metrics import MetricsWriter, Progress, save_config
from attnlab.train.sharding import batch_sharding, check_batch_size, global_batch, make_mesh
from attnlab.train.step import make_trainer


def resolve_config(config: Any) -> Any:
    """Fill derived fields (model.vocab_size from the data) and check the ones the loop uses."""
    config = config.copy_and_resolve_references()
    if config.model.get("vocab_size") is None:
        config.model.vocab_size = int(vocab_size(config.data))
    for field in ("steps", "batch_size", "seq_len", "log_every"):
        if int(config.train[field]) < 1:
            raise ValueError(f"train.{field} must be >= 1, got {config.train[field]}")
    return config


def _record(step: int, window: list[dict[str, Any]], writer: MetricsWriter | None,
            progress: Progress, **extra: float | None) -> dict[str, float]:
    """Log the mean loss of the steps in ``window`` (host metrics), the last lr and grad norm."""
    record = {"loss": float(np.mean([m["loss"] for m in window])), "lr": float(window[-1]["lr"]),
              "grad_norm": float(window[-1]["grad_norm"])}
    record.update({k: float(v) for k, v in extra.items() if v is not None})
    if writer is not None:
        writer.write(step, record)
    line = f"step {step}/{progress.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
    if "tokens_per_s" in record:
        line += f"  tok/s {record['tokens_per_s']:.0f}"
    if "mfu" in record:
        line += f"  mfu {record['mfu']:.1%}"
    if "first_step_s" in record:
        line += f"  (first step, compile included: {record['first_step_s']:.1f}s)"
    progress.log(line + f"  left {progress.time_left(step)}")
    return record


def _utilization(tokens_per_s: float | None, flops_per_token: float, peak_flops: float) -> dict[str, float]:
    """Model TFLOP/s (training FLOPs of attnlab.flops) and MFU = achieved / peak when known."""
    if tokens_per_s is None:
        return {}
    achieved = tokens_per_s * flops_per_token
    return {"model_tflops_per_s": achieved / 1e12, **({"mfu": achieved / peak_flops} if peak_flops > 0 else {})}


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An Event set by SIGTERM while inside the block (handler installed from the main thread only)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config: Any, workdir: str, devices: list[jax.Device] | None = None) -> dict[str, float]:
    """Train (or resume) the run in ``workdir``; returns the last logged metrics.

    SIGTERM (or a preemption notice on a multi-process run) makes the loop save a checkpoint
    at the current step and return early.
    """
    config = resolve_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tc = config.train
    mesh = make_mesh(config.mesh, devices)
    process_index, process_count = jax.process_index(), jax.process_count()
    local_batch = check_batch_size(int(tc.batch_size), mesh, process_count)
    trainer = make_trainer(config, mesh)
    try:
        data_iterator = build_train_iterator(
            config.data, seq_len=int(tc.seq_len), batch_size=local_batch, seed=int(tc.seed),
            workdir=workdir, process_index=process_index, process_count=process_count)
    except ValueError as err:
        raise ValueError(f"config.data cannot feed train.seq_len={tc.seq_len}: {err}") from err
    checkpointer = Checkpointer(workdir, every=int(tc.checkpoint_every), keep=int(tc.keep))
    is_writer = process_index == 0
    last: dict[str, float] = {}
    with jax.set_mesh(mesh), _sigterm_flag() as sigterm:
        state, rest = trainer.init()
        start = checkpointer.latest_step() or 0
        progress = Progress(int(tc.steps), start)
        if start:
            progress.log(f"resuming from the checkpoint at step {start} in {checkpointer.directory}")
            state = checkpointer.restore(start, trainer.abstract_state(), data_iterator)
        if is_writer:
            save_config(workdir, config.to_json_best_effort(indent=2))
        writer = MetricsWriter(workdir, start) if is_writer else None
        step_fn = trainer.jit_step()
        sharding = batch_sharding(mesh)
        tokens_per_step = int(tc.batch_size) * int(tc.seq_len)
        flops_per_token = model_flops_per_token(config.model, int(tc.seq_len))
        peak_flops = float(tc.get("peak_tflops_per_device", 0.0)) * 1e12 * mesh.size
        pending: list[dict[str, Any]] = []
        window_start, window_step = time.perf_counter(), start
        step = start
        try:
            while step < int(tc.steps):
                state, metrics = step_fn(state, rest, global_batch(next(data_iterator), sharding))
                step += 1
                pending.append(metrics)
                stop = sigterm.is_set() or (process_count > 1 and checkpointer.reached_preemption(step))
                log_now = step % int(tc.log_every) == 0 or step == int(tc.steps) or stop
                if step == start + 1:  # compiled: start the clocks; show the first loss at once
                    pending = jax.device_get(pending)
                    first_step_s = time.perf_counter() - window_start
                    progress.mark_first_step_done(step)
                    window_start, window_step = time.perf_counter(), step
                    if not log_now:
                        last = _record(step, pending, writer, progress, first_step_s=first_step_s)
                if log_now:
                    window = jax.device_get(pending)  # waits for the steps to finish
                    now = time.perf_counter()
                    rate = tokens_per_step * (step - window_step) / (now - window_start) if step > window_step else None
                    last = _record(step, window, writer, progress, tokens_per_s=rate,
                                   **_utilization(rate, flops_per_token, peak_flops))
                    pending = []
                    window_start, window_step = now, step
                else:
                    progress.bar(step, last.get("loss"))
                checkpointer.save(step, state, data_iterator, force=stop or step == int(tc.steps))
                if stop:
                    progress.log(f"stop requested: saved the checkpoint of step {step}, exiting")
                    break
        finally:
            checkpointer.close()
            if writer is not None:
                writer.close()
    return last
