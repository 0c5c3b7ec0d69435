"""One benchmark harness for every op: timing, the correctness gate, FLOP/byte floors, writers.

Timing (METHOD.md): warm-up calls, then ``reps`` samples; a sample runs ``inner`` calls over
rotating input sets and synchronises once, and its time / ``inner`` is one figure; the median
of the samples is reported. JAX: host clock around ``block_until_ready``; PyTorch: CUDA events.

Correctness gate, run before a case is timed: the case's output (and, for forward+backward,
its gradients) against a float32 HIGHEST-precision reference computed on the same
bf16-rounded inputs; relative L2 error ‖out − ref‖ / ‖ref‖; NaN or inf fails. Before the
checked call, a large block of device memory is filled with NaN and freed, so that an output
the allocator places there and the kernel never writes shows up as NaN (best effort: the
allocators reuse freed blocks but do not promise to).

Floors: a case's FLOPs over the measured bf16 matmul rate and its bytes (each input read
once, each output written once) over the measured HBM copy rate; the larger is the floor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform as _platform
import statistics
import subprocess
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU

import numpy as np

TOL_BF16 = 2e-2
TOL_F32 = 5e-3  # f32 inputs on GPU (TF32 matmuls), DESIGN.md

# ----------------------------------------------------------------------------- environment


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["_"])
    except Exception:  # a missing or broken package is recorded, not fatal
        return None
    return getattr(mod, "__version__", "?")


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def environment() -> dict[str, Any]:
    """Device, package versions, date and code state of this run."""
    import jax

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(jax.devices()[0].device_kind),
        "python": _platform.python_version(),
        "git": _git_state(),
    }
    for name in ("jax", "jaxlib", "torch", "triton", "fla", "jla", "flax"):
        info[name] = _version(name)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["nvidia_smi"] = out
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


# ----------------------------------------------------------------------------- timing


def _schedule(one_call_s: float) -> tuple[int, int]:
    """(inner, reps) so a sample lasts >= ~5 ms and a case about a second."""
    inner = max(1, min(20, math.ceil(5e-3 / max(one_call_s, 1e-6))))
    reps = max(5, min(30, int(1.0 / max(inner * one_call_s, 1e-6))))
    return inner, reps


def traced_with(module: Any, name: str, value: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` marked to run with ``module.name`` set to ``value``: for a kernel switch read at
    trace time. The harness (``run_impl``, ``profile_kernels``) sets it with ``patched``
    around everything it traces, the backward included: a custom_vjp's backward is traced
    when the vjp is applied, after ``fn`` has returned, so setting it inside ``fn`` alone
    (as this did until session 12) reached the forward only."""
    def run(*args):
        return fn(*args)
    run.patches = getattr(fn, "patches", ()) + ((module, name, value),)
    return run


@contextlib.contextmanager
def patched(fn: Callable[..., Any]) -> Iterator[None]:
    """The module attributes ``traced_with`` marked ``fn`` with, set while the block runs and
    restored after."""
    patches = getattr(fn, "patches", ())
    saved = [getattr(module, name) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for (module, name, _), value in zip(patches, saved):
            setattr(module, name, value)


def time_jax(fn: Callable[..., Any], arg_sets: Sequence[tuple], warmup: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` (jitted) over rotating ``arg_sets``."""
    import jax

    n = len(arg_sets)
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % n]))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    inner, reps = _schedule(time.perf_counter() - t0)
    samples = []
    for r in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(*arg_sets[(r * inner + i) % n])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples) * 1e3


def time_torch(fn: Callable[..., Any], arg_sets: Sequence[tuple], warmup: int = 3) -> float:
    """Median milliseconds of one call of ``fn`` over rotating ``arg_sets``, timed with CUDA events."""
    import torch

    n = len(arg_sets)
    for i in range(warmup):
        fn(*arg_sets[i % n])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*arg_sets[0])
    torch.cuda.synchronize()
    inner, reps = _schedule(time.perf_counter() - t0)
    samples = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            fn(*arg_sets[(r * inner + i) % n])
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


# ----------------------------------------------------------------------------- correctness


def rel_err(out: Any, ref: Any) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when ``out`` holds NaN/inf or the shapes differ."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {out.shape} vs reference {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def record_errors(row: dict, named: Iterable[tuple[str, Any, Any]]) -> list[float]:
    """For each (name, out, ref): row["err_<name>"] = ``rel_err`` (inf where out holds NaN/inf)
    and row["nan_<name>"] = out's NaN count. Returns the errors in order."""
    errs = []
    for name, out, ref in named:
        out = to_numpy(out)
        row[f"err_{name}"] = rel_err(out, to_numpy(ref))
        row[f"nan_{name}"] = int(np.isnan(out).sum())
        errs.append(row[f"err_{name}"])
    return errs


def to_numpy(x: Any) -> np.ndarray:
    """A jax array or torch tensor as a float32 NumPy array."""
    if hasattr(x, "detach"):  # torch
        return x.detach().float().cpu().numpy()
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(x, jnp.float32))


def poison_device_memory(framework: str, gib: float = 4.0) -> None:
    """Fill ``gib`` GiB of fresh device memory with NaN and free it (see module docstring)."""
    n = int(gib * 2**30 // 4)
    if framework == "torch":
        import torch

        block = torch.full((n,), float("nan"), device="cuda", dtype=torch.float32)
        torch.cuda.synchronize()
        del block
    else:
        import jax
        import jax.numpy as jnp

        block = jnp.full((n,), jnp.nan, jnp.float32)
        jax.block_until_ready(block)
        del block


def torch_from_jax(x: Any, requires_grad: bool = False) -> Any:
    """Copy a jax GPU array into a fresh torch CUDA tensor (dlpack, then a clone)."""
    import torch

    t = torch.from_dlpack(x).clone().contiguous()
    return t.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- floors


DIRECTIONS = ("fwd", "fwd+bwd")
ASSUMED_CEILINGS = {"matmul_bf16_tflops": 710.0, "hbm_tbps": 2.7, "assumed_from_DESIGN_md": 1.0}


def add_check_args(ap: Any) -> None:
    """Flags of the linear and delta check scripts: ``--cases`` picks cases by index, and
    ``--no-xla-timing`` leaves out timing the XLA path (each compile of it costs device time;
    the XLA path still serves as the gradient reference where it is one)."""
    ap.add_argument("--cases", type=int, nargs="+", help="indices into CASES (default: all)")
    ap.add_argument("--no-xla-timing", action="store_true", help="do not time the XLA path")


def add_common_args(ap: Any) -> None:
    """Command-line flags every benchmark script takes."""
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--tokens", type=int, default=32768, help="B*T per point (B = max(1, tokens // T))")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip cases that would start after this")
    ap.add_argument("--assume-ceilings", action="store_true", help="use DESIGN.md's floors instead of measuring")
    ap.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS,
                    help="which passes to check and time (each costs its own compile)")


def measure_ceilings() -> dict[str, float]:
    """bf16 matmul TFLOP/s (8192³, random data) and HBM TB/s (read + write of 2 GiB) via JAX."""
    import jax
    import jax.numpy as jnp

    ka, kb, kc = jax.random.split(jax.random.key(1), 3)
    sets = [(jax.random.normal(k1, (8192, 8192), jnp.bfloat16), jax.random.normal(k2, (8192, 8192), jnp.bfloat16))
            for k1, k2 in (jax.random.split(ka), jax.random.split(kb))]
    ms = time_jax(jax.jit(lambda a, b: a @ b), sets)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del sets
    x = [(jax.random.normal(kc, (1 << 30,), jnp.bfloat16),)]
    ms = time_jax(jax.jit(lambda x: x * 1.0001), x)
    tbps = 2 * x[0][0].nbytes / (ms * 1e-3) / 1e12
    return {"matmul_bf16_tflops": tflops, "hbm_tbps": tbps}


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Row:
    bench: str
    case: str
    impl: str
    direction: str  # "fwd" or "fwd+bwd"
    B: int
    T: int
    H: int
    K: int
    V: int
    status: str = "not run"  # ok | wrong | error | skipped
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    x_floor: float | None = None
    err: dict[str, float] = dataclasses.field(default_factory=dict)
    flops: float = 0.0
    bytes: float = 0.0
    note: str = ""


class Bench:
    """Collects rows for one script; writes JSON/CSV after every case (partial runs survive)."""

    def __init__(self, name: str, out_dir: str, ceilings: dict[str, float] | None = None):
        self.name = name
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.env = environment()
        self.ceilings = ceilings if ceilings is not None else measure_ceilings()
        self.rows: list[Row] = []
        self.start = time.time()
        print(f"[{name}] {self.env}\n[{name}] ceilings {self.ceilings}", flush=True)

    def run(self, row: Row, check: Callable[[], dict[str, float]] | None, timed: Callable[[], float],
            tol: float = TOL_BF16) -> Row:
        """Check (errors by output name), then time; record failures as they happened."""
        self.rows.append(row)
        try:
            if check is not None:
                row.err = {k: float(v) for k, v in check().items()}
                bad = {k: v for k, v in row.err.items() if not v < tol}
                row.status = "wrong" if bad else "ok"
                if bad:
                    row.note = (row.note + f" check failed (tol {tol:g}): " +
                                ", ".join(f"{k}={v:.2e}" for k, v in bad.items())).strip()
            row.ms = timed()
            if row.status == "not run":
                row.status = "ok"
            secs = row.ms * 1e-3
            row.tflops = row.flops / secs / 1e12 if row.flops else None
            row.gbps = row.bytes / secs / 1e9 if row.bytes else None
            floor_ms = 1e3 * max(row.flops / (self.ceilings["matmul_bf16_tflops"] * 1e12),
                                 row.bytes / (self.ceilings["hbm_tbps"] * 1e12))
            row.x_floor = row.ms / floor_ms if floor_ms else None
        except Exception as e:  # record the failure honestly and go on
            row.status = "error" if row.status == "not run" else row.status + "+error"
            row.note = (row.note + " " + _short_error(e)).strip()
            traceback.print_exc()
        print(f"{_format_row(row)} @{time.time() - self.start:.0f}s", flush=True)
        self.write()
        return row

    def skip(self, row: Row, why: str) -> None:
        row.status, row.note = "skipped", why
        self.rows.append(row)
        print(_format_row(row), flush=True)
        self.write()

    def write(self) -> None:
        payload = {"bench": self.name, "env": self.env, "ceilings": self.ceilings,
                   "rows": [dataclasses.asdict(r) for r in self.rows]}
        with open(os.path.join(self.out_dir, f"{self.name}.json"), "w") as f:
            json.dump(payload, f, indent=1)
        with open(os.path.join(self.out_dir, f"{self.name}.csv"), "w") as f:
            cols = ["case", "impl", "direction", "B", "T", "H", "K", "V", "status", "ms", "tflops", "gbps",
                    "x_floor", "err", "note"]
            f.write(",".join(cols) + "\n")
            for r in self.rows:
                d = dataclasses.asdict(r)
                d["err"] = max(r.err.values()) if r.err else ""
                f.write(",".join(_csv_cell(d[c]) for c in cols) + "\n")

    def summary(self, peers: Sequence[str] = ()) -> str:
        """Table of ms per (case, T, direction) with ratios of every impl to each named peer."""
        lines = [f"== {self.name}: ms (x floor) [max rel err]; device {self.env['device']}, {self.env['date_utc']}"]
        keys = sorted({(r.case, r.T, r.direction) for r in self.rows}, key=lambda k: (k[0], k[1], k[2]))
        for case, T, direction in keys:
            rows = [r for r in self.rows if (r.case, r.T, r.direction) == (case, T, direction)]
            peer_ms = {r.impl: r.ms for r in rows if r.impl in peers and r.status == "ok"}
            lines.append(f"-- {case} T={T} {direction}")
            for r in rows:
                ratio = " ".join(f"{r.ms / v:.2f}x{p}" for p, v in peer_ms.items() if r.ms and p != r.impl)
                lines.append(f"   {_format_row(r, short=True)} {ratio}")
        text = "\n".join(lines)
        with open(os.path.join(self.out_dir, f"{self.name}_summary.txt"), "w") as f:
            f.write(text + "\n")
        return text


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg[:300]


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.5g}"
    s = str(v)
    return '"' + s.replace('"', "'") + '"' if ("," in s or '"' in s) else s


def _format_row(r: Row, short: bool = False) -> str:
    ms = f"{r.ms:8.3f} ms" if r.ms is not None else "      -   "
    xf = f"({r.x_floor:5.1f}x floor)" if r.x_floor else ""
    err = f"[{max(r.err.values()):.1e}]" if r.err else ""
    head = "" if short else f"{r.case:12s} T={r.T:<6d} {r.direction:7s} "
    return f"{head}{r.impl:28s} {r.status:6s} {ms} {xf} {err} {r.note[:160]}"


# ----------------------------------------------------------------------------- problems and impls


@dataclasses.dataclass
class Problem:
    """One shape: rotating full-size input sets, a smaller gradient-check set, reference answers.

    Every tuple is ``(*inputs, do)`` of jax arrays; gradients are taken for every input.
    The forward gate compares batches ``batch_idx`` of the first full set with ``ref_full``;
    the backward gate compares output and gradients at the check size with ``ref_check``.
    """

    names: tuple[str, ...]
    full: list[tuple]
    check: tuple
    batch_idx: list[int]
    ref_full: np.ndarray
    ref_check: tuple
    _torch: dict = dataclasses.field(default_factory=dict)

    @staticmethod
    def build(names: Sequence[str], make: Callable[[int, bool], tuple], reference: Callable[..., Any],
              rotations: int = 3) -> "Problem":
        """``make(seed, check)`` draws one input set; ``reference(*inputs)`` is the oracle."""
        import jax

        full = [make(seed, False) for seed in range(rotations)]
        B = full[0][0].shape[0]
        idx = sorted({0, B - 1})
        ref_full = to_numpy(reference(*(x[np.array(idx)] for x in full[0][:-1])))
        check = make(100, True)
        o, vjp = jax.vjp(reference, *check[:-1])
        grads = vjp(check[-1].astype(o.dtype))
        ref_check = tuple(to_numpy(x) for x in (o, *grads))
        return Problem(tuple(names), full, check, idx, ref_full, ref_check)

    def torch_sets(self) -> tuple[list[tuple], tuple]:
        """The same inputs as torch tensors (inputs require grad), made once."""
        if not self._torch:
            conv = lambda s: tuple(torch_from_jax(x, requires_grad=i < len(s) - 1) for i, x in enumerate(s))
            self._torch["full"] = [conv(s) for s in self.full]
            self._torch["check"] = conv(self.check)
        return self._torch["full"], self._torch["check"]


def run_impl(bench: Bench, problem: Problem, f: Callable[..., Any], framework: str, template: Row,
             flops: dict[str, float], nbytes: dict[str, float], directions: Sequence[str] = DIRECTIONS,
             tol: float = TOL_BF16) -> None:
    """Check then time ``f(*inputs) -> o`` forward and forward+backward (gradients of every input)."""
    if framework == "jax":
        import jax

        fwd = jax.jit(f)

        def fb(*args):
            o, vjp = jax.vjp(f, *args[:-1])
            return o, vjp(args[-1].astype(o.dtype))

        fb = jax.jit(fb)
        full, check = problem.full, problem.check
        timer = time_jax
    else:
        import torch

        def fwd(*args):
            with torch.no_grad():
                return f(*args)

        def fb(*args):
            o = f(*args[:-1])
            return o, torch.autograd.grad(o, args[:-1], args[-1])

        full, check = problem.torch_sets()
        timer = time_torch
    idx = problem.batch_idx

    def check_fwd() -> dict[str, float]:
        poison_device_memory(framework)
        out = to_numpy(fwd(*full[0][:-1]))
        return {"o": rel_err(out[idx], problem.ref_full)}

    def check_fb() -> dict[str, float]:
        poison_device_memory(framework)
        o, grads = fb(*check)
        got = (o, *grads)
        return {("o" if i == 0 else "d" + problem.names[i - 1]): rel_err(to_numpy(x), r)
                for i, (x, r) in enumerate(zip(got, problem.ref_check))}

    for direction in directions:
        row = dataclasses.replace(template, direction=direction, flops=flops[direction], bytes=nbytes[direction],
                                  err={})
        fn, chk = (fwd, check_fwd) if direction == "fwd" else (fb, check_fb)
        sets = [s[:-1] if fn is fwd else s for s in full]
        with patched(f):
            bench.run(row, chk, lambda fn=fn, sets=sets: timer(fn, sets), tol=tol)


def nbytes_of(arrays: Sequence[Any]) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in arrays))


def io_bytes(problem: Problem) -> dict[str, float]:
    """Fewest HBM bytes: forward reads the inputs and writes o (shaped like do); forward+backward
    adds the backward's reads of the inputs and do and its writes of every gradient."""
    inputs = nbytes_of(problem.full[0][:-1])
    out = nbytes_of(problem.full[0][-1:])
    return {"fwd": float(inputs + out), "fwd+bwd": float((inputs + out) + (2 * inputs + out))}


def _tagged(impl: str, tag: str) -> str:
    """An implementation's name in the rows of a run tagged ``tag`` (``run_sweep``)."""
    return f"{impl} ({tag})" if tag else impl


def run_sweep(name: str, args: Any, points: Sequence[tuple[str, int]], impls: dict[str, tuple[str, Callable]],
              problem_for: Callable[[str, int, int], Problem], counts_for: Callable[..., tuple[dict, dict]],
              peers: Sequence[str], tag: str = "") -> Bench:
    """For each (case, T): build the problem (B = tokens // T), then check and time every impl.

    ``impls`` maps a name to (framework, builder); ``builder(case)`` returns ``f(*inputs) -> o``
    or raises when the implementation is missing (recorded as unavailable). ``tag`` names inputs
    that differ from the bench's defaults: every row's impl reads "<impl> (<tag>)", so rows of
    such runs never pass for default ones when results are merged into one table.
    """
    start = time.time()
    bench = Bench(name, args.out, ASSUMED_CEILINGS if args.assume_ceilings else None)
    for case, T in points:
        B = max(1, args.tokens // T)
        if time.time() - start > args.deadline_s:
            bench.skip(Row(name, case, "all", "", B, T, 0, 0, 0), "skipped: deadline")
            continue
        t0 = time.time()
        problem = problem_for(case, B, T)
        print(f"[{name}] {case} T={T}: inputs and reference built in {time.time() - t0:.1f} s", flush=True)
        flops, nbytes = counts_for(case, problem, B, T)
        _, _, H, K = problem.full[0][0].shape
        V = problem.full[0][-1].shape[-1]
        for impl in args.impls:
            framework, build = impls[impl]
            template = Row(name, case, _tagged(impl, tag), "", B, T, H, K, V)
            if time.time() - start > args.deadline_s:
                bench.skip(template, "skipped: deadline")
                continue
            try:
                f = build(case)
            except Exception as e:  # not installed, not landed yet, or refused by the library
                bench.skip(template, f"unavailable: {type(e).__name__}: {e}"[:200])
                continue
            run_impl(bench, problem, f, framework, template, flops, nbytes, args.directions)
        del problem
    print(bench.summary([_tagged(p, tag) for p in peers]), flush=True)
    plot(bench, os.path.join(args.out, f"{name}.png"))
    return bench


# ----------------------------------------------------------------------------- plot


def plot(bench: Bench, path: str) -> None:
    """ms against T (log-log lines) per case and direction, or bars where one T was run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print("plot skipped:", e)
        return
    ok = [r for r in bench.rows if r.ms is not None and r.status == "ok"]
    panels = sorted({(r.case, r.direction) for r in ok})
    if not panels:
        return
    every_impl = sorted({r.impl for r in ok})  # one colour per implementation in every panel
    colour = {impl: f"C{i % 10}" for i, impl in enumerate(every_impl)}
    cols = 2
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.6 * rows_n), squeeze=False)
    for ax, (case, direction) in zip(axes.flat, panels):
        sel = [r for r in ok if (r.case, r.direction) == (case, direction)]
        impls = sorted({r.impl for r in sel})
        Ts = sorted({r.T for r in sel})
        if len(Ts) > 1:
            for impl in impls:
                pts = sorted((r.T, r.ms) for r in sel if r.impl == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                        color=colour[impl])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (B*T fixed)")
        else:
            vals = [next(r.ms for r in sel if r.impl == i) for i in impls]
            ax.barh(impls, vals, color=[colour[i] for i in impls])
            ax.set_xlabel(f"ms (T={Ts[0]})")
        ax.set_title(f"{bench.name}: {case} {direction}")
        ax.set_ylabel("ms") if len(Ts) > 1 else None
        if len(Ts) > 1:
            ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{bench.env['device']} | jax {bench.env['jax']} torch {bench.env['torch']} | {bench.env['date_utc']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cases(fn: Callable[..., dict], cases: Sequence[tuple], keys: Sequence[str]) -> list[dict]:
    """``fn(*case)`` for each case, printing each row; a case that raises becomes a row with
    status "error" (its ``keys`` named from the case, the exception as the note) and the next
    case goes on. Used by the check scripts."""
    rows = []
    for case in cases:
        try:
            row = fn(*case)
        except Exception as e:  # noqa: BLE001 - recorded and reported, the next case goes on
            row = {**dict(zip(keys, case)), "status": "error",
                   "note": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
        print(row, flush=True)
        rows.append(row)
    return rows


def print_table(rows: Sequence[dict], cols: Sequence[str]) -> None:
    """The rows as a ' | '-separated table of ``cols`` (floats to 3 significant digits, '-'
    where missing), each row's note (first line) under it."""
    fmt = lambda x: "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c)) for c in cols))
        if r.get("note"):
            print("    note:", r["note"].splitlines()[0][:300])
