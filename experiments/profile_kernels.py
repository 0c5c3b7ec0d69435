"""Where the time goes: per-kernel GPU times of one benchmark implementation, forward and
forward+backward, from a jax.profiler trace (XLA glue included, one line per kernel name).

    python -m experiments.profile_kernels --bench linear --case gk \
        --impl "attnlab mosaic_gpu_gk" --T 4096 --out /tmp/profile

Inputs, B = tokens // T and the implementations are those of ``bench_linear`` / ``bench_delta``
(their ``make_inputs`` and ``IMPLS``); forward+backward is the same vjp as ``bench_common``'s.
Times are GPU busy time per iteration (sum of kernel durations; gaps between kernels are not
counted), so the lines add up to less than the benchmark's wall-clock median. With
``MOSAIC_GPU_DUMP_PTXAS=1`` in the environment, jaxlib also prints ptxas' report for every Mosaic
GPU kernel it compiles (registers per thread, spill stores and loads, shared memory).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib
import json
import os

import jax

from experiments.bench_common import patched

ITERS = 10


def kernel_times(fn, args: tuple, trace_dir: str) -> collections.Counter:
    """Milliseconds per iteration of every GPU kernel name ``fn(*args)`` launches."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(ITERS):
            out = fn(*args)
        jax.block_until_ready(out)
    path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    times = collections.Counter()
    for e in events:
        process = processes.get(e.get("pid"), "").lower()
        on_device = ("gpu" in process or "device" in process) and "host" not in process
        if e.get("ph") == "X" and on_device:
            times[e["name"]] += e["dur"] / ITERS / 1000
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bench", choices=("linear", "delta"), default="linear")
    ap.add_argument("--case", default="gk", help="the bench's gate kind / case")
    ap.add_argument("--impl", default="attnlab mosaic_gpu_gk")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out", default="/tmp/profile_kernels")
    args = ap.parse_args()
    bench = importlib.import_module(f"experiments.bench_{args.bench}")
    f = bench.IMPLS[args.impl][1](args.case)
    inputs = bench.make_inputs(args.case, max(1, args.tokens // args.T), args.T)(0, False)

    def fwd_bwd(*xs):
        o, vjp = jax.vjp(f, *xs[:-1])
        return o, vjp(xs[-1].astype(o.dtype))

    for name, fn, xs in (("fwd", jax.jit(f), inputs[:-1]), ("fwd+bwd", jax.jit(fwd_bwd), inputs)):
        with patched(f):   # a variant's kernel switches, for the backward's tracing too
            times = kernel_times(fn, xs, os.path.join(args.out, name.replace("+", "_")))
        print(f"== {args.bench} {args.case} T={args.T} {args.impl} {name}: "
              f"{sum(times.values()):.3f} ms GPU busy per iteration")
        for kernel, ms in times.most_common(25):
            print(f"  {ms:8.4f} ms  {kernel[:100]}")


if __name__ == "__main__":
    main()
