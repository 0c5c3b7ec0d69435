"""Markdown tables of every measured row in experiments/results/*/bench_*.json (one row per
bench, case, T, implementation; where several runs measured a case, each figure is listed with
its run folder's suffix, so nothing measured is hidden or averaged).

    python -m experiments.results_table [results_dir]
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


if __name__ == "__main__":
    print(markdown(sys.argv[1] if len(sys.argv) > 1 else "experiments/results"))
