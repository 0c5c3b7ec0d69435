"""Rebuild a benchmark's JSON from its log, for a run whose JSON did not come back from the
device (the log is what ``bench_common.Bench`` printed: the env and ceilings lines, then one line
per timed row). Each ``ok``/``wrong`` row keeps what the log shows: ms, x floor and the max
relative error (as ``err = {"max": ...}``); TFLOP/s, GB/s, flops and bytes are not in the log
and stay empty. The payload says ``"rebuilt_from": <log>``.

    python -m experiments.json_from_log LOG B_TIMES_T H K V OUT.json
"""
from __future__ import annotations

import ast
import json
import re
import sys

ROW = re.compile(r"^(\S+)\s+T=(\d+)\s+(fwd\+bwd|fwd)\s+(.{28,}?) (ok|wrong)\s+([\d.]+) ms "
                 r"\(\s*([\d.]+)x floor\) \[([\d.e+-]+)\]\s*(.*?)\s*@\d+s$")


def rebuild(log_path: str, tokens: int, H: int, K: int, V: int) -> dict:
    """The JSON payload of ``log_path`` (rows with B = max(1, tokens // T))."""
    env = ceilings = name = None
    rows = []
    with open(log_path) as f:
        for line in f:
            head = re.match(r"^\[(\w+)\] (ceilings )?(\{.*\})$", line.strip())
            if head:
                name = head.group(1)
                if head.group(2):
                    ceilings = ast.literal_eval(head.group(3))
                else:
                    env = ast.literal_eval(head.group(3))
                continue
            m = ROW.match(line.rstrip("\n"))
            if m:
                case, T, direction, impl, status, ms, x_floor, err, note = m.groups()
                rows.append(dict(bench=name, case=case, impl=impl.strip(), direction=direction,
                                 B=max(1, tokens // int(T)), T=int(T), H=H, K=K, V=V,
                                 status=status, ms=float(ms), tflops=None, gbps=None,
                                 x_floor=float(x_floor), err={"max": float(err)}, flops=0.0,
                                 bytes=0.0, note=note))
    if env is None or ceilings is None or not rows:
        raise ValueError(f"{log_path}: no env/ceilings header or no timed rows")
    return {"bench": name, "env": env, "ceilings": ceilings, "rows": rows,
            "rebuilt_from": log_path}


if __name__ == "__main__":
    log, tokens, h, k, v, out = sys.argv[1:7]
    with open(out, "w") as f:
        json.dump(rebuild(log, int(tokens), int(h), int(k), int(v)), f, indent=1)
