"""Markdown tables of every measured row in experiments/results/*/bench_*.json (one row per
bench, case, T, implementation; where several runs measured a case, each figure is listed with
its run folder's suffix, so nothing measured is hidden or averaged).

    python -m experiments.results_table [results_dir]
    python -m experiments.results_table --plot bench_linear OUT.png RUN [RUN ...] [--impls I ...]
"""
from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict


def load(results_dir: str) -> tuple[dict, list[dict]]:
    runs, rows = {}, []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "bench_*.json"))):
        run = os.path.basename(os.path.dirname(path)).split("_", 2)[-1]  # after device_date_
        with open(path) as f:
            data = json.load(f)
        runs[run] = (data["env"], data["ceilings"])
        for r in data["rows"]:
            if r["status"] != "skipped" and r["direction"]:
                rows.append(dict(r, run=run))
    return runs, rows


def _cell(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["ms"] is not None and r["status"] == "ok":
            parts.append(f"{r['ms']:.3f} ({r['x_floor']:.1f}x) {r['run']}")
        else:
            parts.append(f"{r['status']}: {r['note'][:70]} {r['run']}")
    return "<br>".join(parts) if parts else ""


def markdown(results_dir: str) -> str:
    runs, rows = load(results_dir)
    out = ["| run | device | date | jax | torch | triton | fla | jla | matmul TFLOP/s | HBM TB/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for run, (env, ceil) in sorted(runs.items()):
        out.append(f"| {run} | {env['device']} | {env['date_utc']} | {env['jax']} | {env['torch']} | {env['triton']} "
                   f"| {env['fla']} | {env['jla']} | {ceil['matmul_bf16_tflops']:.0f} | {ceil['hbm_tbps']:.2f} |")
    grouped: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        grouped[(r["bench"], r["case"], r["T"], r["B"], r["impl"])][r["direction"]].append(r)
    bench = None
    for key in sorted(grouped, key=lambda k: (k[0], k[1], k[2], k[4])):
        if key[0] != bench:
            bench = key[0]
            out += ["", f"### {bench}: ms (x floor) run", "",
                    "| case | T | B | impl | fwd | fwd+bwd | max rel err |", "|---|---|---|---|---|---|---|"]
        d = grouped[key]
        errs = [max(r["err"].values()) for rs in d.values() for r in rs if r["err"]]
        err = f"{max(errs):.1e}" if errs else ""
        out.append(f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | {_cell(d.get('fwd', []))} "
                   f"| {_cell(d.get('fwd+bwd', []))} | {err} |")
    return "\n".join(out)


def select_rows(bench: str, runs: list[str], impls: list[str] | None = None,
                results_dir: str = "experiments/results") -> tuple[list[dict], dict]:
    """``bench``'s rows from ``runs`` (only ``impls`` where given): one row per (case, direction,
    impl, T), the one of the run listed last in ``runs``; also the last run's env."""
    env_of, rows = load(results_dir)
    missing = [run for run in runs if run not in env_of]
    if missing:
        raise ValueError(f"no results folder for run(s) {missing} in {results_dir}")
    picked = [r for r in rows if r["bench"] == bench and r["run"] in runs
              and (impls is None or r["impl"] in impls)]
    chosen = {}
    for r in sorted(picked, key=lambda r: runs.index(r["run"])):  # a later run's row wins
        chosen[(r["case"], r["direction"], r["impl"], r["T"])] = r
    return list(chosen.values()), env_of[runs[-1]][0]


def plot_runs(bench: str, path: str, runs: list[str], impls: list[str] | None = None,
              results_dir: str = "experiments/results") -> None:
    """One plot (``bench_common.plot``) of ``bench``'s rows from several runs (e.g. the T = 4096
    points of one call and the other T of the next); see ``select_rows``."""
    from types import SimpleNamespace

    from experiments.bench_common import plot

    rows, env = select_rows(bench, runs, impls, results_dir)
    plot(SimpleNamespace(name=bench, rows=[SimpleNamespace(**r) for r in rows], env=env), path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:
        import argparse

        ap = argparse.ArgumentParser(prog="results_table --plot")
        ap.add_argument("bench")
        ap.add_argument("out")
        ap.add_argument("runs", nargs="+", help="run names, oldest first (a later run's point wins)")
        ap.add_argument("--impls", nargs="+", help="only these implementations")
        args = ap.parse_args(sys.argv[2:])
        plot_runs(args.bench, args.out, args.runs, args.impls)
    else:
        print(markdown(sys.argv[1] if len(sys.argv) > 1 else "experiments/results"))
