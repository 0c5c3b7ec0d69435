"""The train loop end to end: loss falls, outputs are written, SIGKILL + restart reproduces the
uninterrupted losses bit for bit, SIGTERM saves a checkpoint before exiting."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attnlab.train.loop import train
from attnlab.train.metrics import read_metrics
from test_config import ROOT, tiny_config


def test_loss_falls_and_outputs_are_written(tmp_path):
    config = tiny_config(pattern="SW", steps=40, lr=1e-2, warmup_steps=4, checkpoint_every=40,
                         log_every=1, peak_tflops_per_device=1e-3)
    last = train(config, str(tmp_path), devices=jax.devices()[:1])
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 41))
    losses = np.array([r["loss"] for r in records])
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:3].mean() - 1.0, losses
    assert last["loss"] == records[-1]["loss"]
    assert records[0]["lr"] < records[4]["lr"]  # warmup
    assert "tokens_per_s" not in records[0]  # first step: compile time, no throughput
    assert all(r["tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0 and r["mfu"] > 0
               for r in records[1:])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["vocab_size"] > 0 and saved["model"]["pattern"] == "SW"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "40").is_dir()


# Runs the real entry point, slowed down (after its checkpoint save) from a given step on, so a
# signal can reach it mid-run.
SLOW_DRIVER = """
import sys, time
from absl import app
import attnlab.train.loop as loop
slow_from = int(sys.argv.pop(1))
save = loop.Checkpointer.save
def slow_save(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step >= slow_from:
        time.sleep(0.5)
    return saved
loop.Checkpointer.save = slow_save
from attnlab.train.__main__ import main
app.run(main)
"""

FLAGS = ["--config=configs/tiny.py", "--config.model.d_model=32", "--config.model.num_layers=2",
         "--config.model.num_heads=2", "--config.model.mlp_dim=48", "--config.model.pattern=SW",
         "--config.train.seq_len=32", "--config.train.batch_size=4", "--config.train.steps=12",
         "--config.train.warmup_steps=2", "--config.train.log_every=1",
         "--config.train.checkpoint_every=4", "--config.mesh.data=1"]


def launch(workdir: pathlib.Path, slow_from: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    head = ["-m", "attnlab.train"] if slow_from is None else ["-c", SLOW_DRIVER, str(slow_from)]
    return subprocess.Popen([sys.executable, *head, *FLAGS, f"--workdir={workdir}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"run ended before the condition held: {process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


def logged_steps(workdir: pathlib.Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(str(workdir))]
    except json.JSONDecodeError:  # a line being written
        return []


def test_sigkill_and_restart_reproduce_the_uninterrupted_losses(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_a = launch(reference)
    run_b = launch(interrupted, slow_from=9)
    wait_for(lambda: (interrupted / "checkpoints" / "8").is_dir() and max(logged_steps(interrupted), default=0) >= 9, run_b)
    run_b.send_signal(signal.SIGKILL)
    run_b.wait()
    assert not (interrupted / "checkpoints" / "12").exists()
    restarted = finish(launch(interrupted))
    finish(run_a)
    assert "resuming from the checkpoint at step 8" in restarted
    expected = [(r["step"], r["loss"]) for r in read_metrics(str(reference))]
    got = [(r["step"], r["loss"]) for r in read_metrics(str(interrupted))]
    assert [s for s, _ in expected] == list(range(1, 13))
    assert got == expected  # bitwise: the same float32 values, every step


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run = launch(tmp_path, slow_from=1)
    wait_for(lambda: max(logged_steps(tmp_path), default=0) >= 5, run)
    run.send_signal(signal.SIGTERM)
    out = finish(run)
    last_step = logged_steps(tmp_path)[-1]
    assert 5 <= last_step < 12
    assert (tmp_path / "checkpoints" / str(last_step)).is_dir(), out[-2000:]
    assert "stop requested" in out
