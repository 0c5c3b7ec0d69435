"""Run outputs: JSONL metrics, TensorBoard events, the saved config, console progress."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping, TextIO

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` (empty list if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends one JSON record per logged step and mirrors scalars to TensorBoard.

    On resume from ``start_step`` the records of later steps (written by the interrupted run
    after its last checkpoint) are dropped, so the file reads like one uninterrupted run.
    """

    def __init__(self, workdir: str, start_step: int):
        from tensorboardX import SummaryWriter  # only the writing process needs it

        self.path = os.path.join(workdir, METRICS_FILE)
        kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def save_config(workdir: str, config_json: str) -> None:
    """Write the final (resolved) config beside the metrics."""
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config_json)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:d}:{rem % 60:02d}"


class Progress:
    """Console progress: a log line every ``log_every`` steps, a live bar when on a terminal.

    Time left is the mean step time since the first timed step (compile excluded) times the
    steps that remain.
    """

    def __init__(self, total_steps: int, start_step: int, stream: TextIO = sys.stdout):
        self.total, self.start = total_steps, start_step
        self.stream = stream
        self.tty = stream.isatty()
        self.t0: float | None = None
        self.timed_from = start_step

    def mark_first_step_done(self, step: int) -> None:
        """Start the clock after the first (compiling) step."""
        self.t0, self.timed_from = time.perf_counter(), step

    def seconds_per_step(self, step: int) -> float | None:
        if self.t0 is None or step <= self.timed_from:
            return None
        return (time.perf_counter() - self.t0) / (step - self.timed_from)

    def time_left(self, step: int) -> str:
        per_step = self.seconds_per_step(step)
        return "?" if per_step is None else format_seconds(per_step * (self.total - step))

    def log(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()

    def bar(self, step: int, loss: float | None) -> None:
        """Redraw the one-line bar (terminal only)."""
        if not self.tty:
            return
        width = 30
        done = int(width * step / max(self.total, 1))
        loss_text = "" if loss is None else f" loss {loss:.4f}"
        self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total}"
                          f"{loss_text} eta {self.time_left(step)}")
        self.stream.flush()
