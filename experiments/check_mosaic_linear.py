"""GPU check of the Hopper (Mosaic GPU) linear-recurrence kernels: correct, then timed.

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,      o_t = scale · q_t S_t      (g scalar per head / step)
    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t                          (gk per key channel: GLA)

For each case (bf16 inputs, gate "g", "gk" or "none"; "gk" cases run the GLA kernel
``mosaic_gpu_gk``, whose gate gradient is reported as err_dg): the kernel's output and final
state against the float32 step-by-step oracle (HIGHEST precision, same bf16-rounded inputs;
relative L2 error, NaN/inf fails; device memory is filled with NaN and freed just before the
checked call, so an output element the kernel never writes most likely shows up as NaN), then
the forward time of the kernel and of ``impl="xla"`` (``bench_common.time_jax``: median of
repeated samples after warm-up, the method of the anchor figures in DESIGN.md). Gradients dq,
dk, dv, dg of sum(o * dO) from the Mosaic GPU backward (three more runs of the forward kernel
plus XLA for dg) against the same on float32 copies of the inputs: autodiff of the step-by-step
oracle where its saved per-step states fit in 4 GiB, else of the chunked XLA path (``grad_ref``
says which); then forward+backward times at the anchor shapes. Each case runs on its own: a
failure is printed and the next case goes on. Prints a table; writes
``check_mosaic_linear.json`` into ``--out``.

At the GLA fwd+bwd shapes ``gk_prepass_ms`` and ``gk_pullback_ms`` time the forward's prepass
kernel and the backward's pullback kernel alone.

    python -m experiments.check_mosaic_linear --out experiments/results [--quick] [--interpret]
        [--cases I ...] [--no-xla-timing]
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from pallas_kernels.linear import chunk_gated_linear_attention, mosaic_gpu, mosaic_gpu_gk
from pallas_kernels.linear.mosaic_gpu_gk_prepass import gk_prepass
from pallas_kernels.linear.mosaic_gpu_gk_pullback import gk_pullback
from pallas_kernels.linear.reference import gated_linear_reference

# (B, T, H, D, gate, time fwd+bwd too)
CASES = [
    (2, 512, 4, 64, "g", False),
    (2, 512, 4, 128, "g", False),
    (2, 512, 4, 128, "none", False),
    (2, 1000, 4, 128, "g", False),          # T not a multiple of the chunk
    (2, 1000, 4, 128, "g+s0", False),       # an initial state (its gradient too)
    (2, 2048, 4, 128, "none+seg", False),   # packed documents (reset gates)
    (2, 16384, 16, 128, "g", False),        # the sequence split: 4 pieces
    (1, 65536, 16, 128, "none", False),     # 8 pieces
    (8, 4096, 16, 128, "g", True),          # the anchor shape of DESIGN.md
    (8, 4096, 16, 128, "none", True),
    (2, 1000, 4, 128, "gk", False),         # per-channel gates (GLA kernel), padded last chunk
    (2, 1000, 4, 64, "gk+s0", False),
    (2, 2048, 4, 128, "gk+seg", False),
    (8, 4096, 16, 128, "gk", True),         # the GLA anchor (jla gla, fla chunk_gla)
]
TIME_XLA = True  # --no-xla-timing: skip timing the XLA path (saves its compiles on the GPU)
ORACLE_GRAD_BYTES = 4 << 30  # the oracle's backward keeps one float32 [B, H, D, D] state a step


def make_inputs(seed: int, B: int, T: int, H: int, D: int, gate: str):
    """gate: "none", "g" (scalar log gate) or "gk" (per channel, returned in g's place),
    optionally "+s0" (a random initial state) or "+seg" (random packed documents, mean
    length 300)."""
    ks = jax.random.split(jax.random.key(seed), 7)
    q, k, v, do = (jax.random.normal(ks[i], (B, T, H, D), jnp.bfloat16) for i in range(4))
    gate_shape = (B, T, H, D) if _per_channel(gate) else (B, T, H)
    g = (jax.nn.log_sigmoid(jax.random.normal(ks[4], gate_shape) + 4.0) if gate.startswith("g")
         else None)
    s0 = jax.random.normal(ks[5], (B, H, D, D)) if gate.endswith("+s0") else None
    seg = (jnp.cumsum(jax.random.bernoulli(ks[6], 1 / 300, (B, T)), axis=1, dtype=jnp.int32)
           if gate.endswith("+seg") else None)
    return q, k, v, g, s0, seg, do


INTERPRET = None  # --interpret: plgpu.InterpretGPUParams(), to dry-run this script on a CPU


def _per_channel(gate: str) -> bool:
    return gate.startswith("gk")


def _gates(g, per_channel: bool) -> dict:
    """The case's gate (4th argument) as the op's g or gk keyword."""
    return {"g": None, "gk": g} if per_channel else {"g": g, "gk": None}


def _module(per_channel: bool):
    """(run, accepts) of the Hopper kernel for the gate kind."""
    if per_channel:
        return (mosaic_gpu_gk.mosaic_gpu_gk_gated_linear_attention,
                mosaic_gpu_gk.mosaic_gpu_gk_accepts)
    return mosaic_gpu.mosaic_gpu_gated_linear_attention, mosaic_gpu.mosaic_gpu_accepts


def kernel_fn(scale: float, s0=None, seg=None, per_channel: bool = False):
    def run(q, k, v, g):
        return _module(per_channel)[0](
            q, k, v, **_gates(g, per_channel), scale=scale, initial_state=s0, segment_ids=seg,
            chunk_size=None, interpret=INTERPRET)
    return run


def xla_fn(scale: float, s0=None, seg=None, per_channel: bool = False):
    def run(q, k, v, g):
        return chunk_gated_linear_attention(q, k, v, **_gates(g, per_channel), scale=scale,
                                            initial_state=s0, segment_ids=seg,
                                            output_final_state=True, impl="xla")
    return run


def fwd_bwd(fn):
    def run(q, k, v, g, do):
        o, vjp = jax.vjp(lambda q, k, v, g: fn(q, k, v, g)[0], q, k, v, g)
        return vjp(do)
    return run


def check_case(B: int, T: int, H: int, D: int, gate: str, with_bwd: bool) -> dict:
    row = {"B": B, "T": T, "H": H, "D": D, "gate": gate, "status": "error"}
    q, k, v, g, s0, seg, do = make_inputs(B * T + D, B, T, H, D, gate)
    scale = D ** -0.5
    pc = _per_channel(gate)
    reason = _module(pc)[1](q, k, v, **_gates(g, pc), initial_state=s0, segment_ids=seg,
                            chunk_size=None)
    if reason is not None and INTERPRET is None:
        row.update(status="declined", note=reason)
        return row
    kernel = jax.jit(kernel_fn(scale, s0, seg, pc))
    if INTERPRET is None:
        bc.poison_device_memory("jax", gib=2.0)
    o, s = jax.block_until_ready(kernel(q, k, v, g))
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    o_ref, s_ref = jax.jit(lambda q, k, v, g: gated_linear_reference(
        f32(q), f32(k), f32(v), **_gates(g, pc), scale=scale, initial_state=s0,
        segment_ids=seg))(q, k, v, g)
    row["err_state"] = bc.rel_err(np.asarray(s), np.asarray(s_ref))
    errs = (bc.record_errors(row, [("o", o, o_ref)]) + [row["err_state"]]
            + check_gradients(row, q, k, v, g, s0, seg, do, scale, pc))
    row["status"] = "ok" if max(errs) < bc.TOL_BF16 else "wrong"
    row["auto_impl"] = _auto_choice(q, k, v, g, s0, seg, scale, pc)
    if INTERPRET is not None:  # CPU dry run: timings would mean nothing
        return row
    args = [(q, k, v, g)]
    row["mosaic_fwd_ms"] = bc.time_jax(kernel, args)
    if TIME_XLA:
        row["xla_fwd_ms"] = bc.time_jax(jax.jit(xla_fn(scale, s0, seg, pc)), args)
    if with_bwd:
        args = [(q, k, v, g, do)]
        row["mosaic_fwdbwd_ms"] = bc.time_jax(
            jax.jit(fwd_bwd(kernel_fn(scale, s0, seg, pc))), args)
        if TIME_XLA:
            row["xla_fwdbwd_ms"] = bc.time_jax(jax.jit(fwd_bwd(xla_fn(scale, s0, seg, pc))),
                                               args)
        if pc:  # the GLA forward's prepass kernel alone, to split its forward time
            row["gk_prepass_ms"] = bc.time_jax(
                jax.jit(functools.partial(gk_prepass, scale=scale)), [(q, k, g)])
        if pc and T % mosaic_gpu_gk.CHUNK == 0:
            # the backward's pullback kernel alone (dq~, dk^, dA: any values of their shapes)
            da = jnp.ones((B, H, T, mosaic_gpu_gk.CHUNK), jnp.float32)
            row["gk_pullback_ms"] = bc.time_jax(
                jax.jit(functools.partial(gk_pullback, scale=scale)),
                [(q, k, g, f32(q), f32(k), da)])
    return row


def check_gradients(row: dict, q, k, v, g, s0, seg, do, scale: float,
                    per_channel: bool = False) -> list[float]:
    """Record the relative errors of dq, dk, dv (and dg: of g or gk) in ``row``; return them."""
    B, T, H, D = q.shape
    if INTERPRET is None:
        bc.poison_device_memory("jax", gib=2.0)
    got = jax.block_until_ready(
        jax.jit(fwd_bwd(kernel_fn(scale, s0, seg, per_channel)))(q, k, v, g, do))
    if B * H * D * D * 4 * T <= ORACLE_GRAD_BYTES:
        row["grad_ref"] = "oracle"
        ref = lambda q, k, v, g: gated_linear_reference(q, k, v, **_gates(g, per_channel),
                                                        scale=scale, initial_state=s0,
                                                        segment_ids=seg)
    else:
        row["grad_ref"] = "xla"
        ref = xla_fn(scale, s0, seg, per_channel)
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):  # GPU f32 matmuls default to TF32
        want = jax.jit(fwd_bwd(ref))(f32(q), f32(k), f32(v), g, f32(do))
    return bc.record_errors(row, [(f"d{name}", a, b) for name, a, b in zip("qkvg", got, want)
                                  if a is not None])


def _auto_choice(q, k, v, g, s0, seg, scale, per_channel: bool = False) -> str:
    from pallas_kernels.linear import REGISTRY
    try:
        return REGISTRY.choose(None, q, k, v, **_gates(g, per_channel), scale=scale,
                               initial_state=s0, segment_ids=seg, chunk_size=None).name
    except ValueError as e:
        return f"none ({e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--quick", action="store_true", help="small cases only")
    ap.add_argument("--interpret", action="store_true",
                    help="dry run on CPU in GPU interpret mode (jax >= 0.12; small shapes)")
    bc.add_check_args(ap)
    args = ap.parse_args()
    if args.interpret:
        global INTERPRET
        from pallas_kernels.mosaic_gpu_common import plgpu
        INTERPRET = plgpu.InterpretGPUParams()
    env = bc.environment()
    print(env, flush=True)
    cases = CASES
    if args.interpret:  # every gate kind once, at a size the CPU interpreter gets through
        cases = [(1, 200, 1) + case[3:5] + (False,) for case in CASES if case[1] <= 2048]
    elif args.quick:
        cases = [case for case in CASES if case[1] <= 1000]
    if args.cases:
        cases = [CASES[i] for i in args.cases]
    global TIME_XLA
    TIME_XLA = not args.no_xla_timing
    rows = bc.run_cases(check_case, cases, ("B", "T", "H", "D", "gate"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_mosaic_linear.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    cols = ["B", "T", "H", "D", "gate", "status", "err_o", "err_state", "nan_o", "grad_ref",
            "err_dq", "err_dk", "err_dv", "err_dg",
            "mosaic_fwd_ms", "xla_fwd_ms", "mosaic_fwdbwd_ms", "xla_fwdbwd_ms", "gk_prepass_ms",
            "gk_pullback_ms", "auto_impl"]
    bc.print_table(rows, cols)


if __name__ == "__main__":
    main()
