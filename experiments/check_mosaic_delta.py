"""GPU check of the Hopper (Mosaic GPU) delta-rule kernels: correct, then timed.

    S_t = e^{g_t} S_{t-1} + β_t k_t ⊗ (v_t - e^{g_t} S_{t-1}^T k_t),      o_t = scale · q_t S_t

For each case (bf16 q, k (L2-normalised rows), v; β in (0, 1); gate "g", "none", "g+s0" (an
initial state too) or "g+seg" (packed segments too)): the op through ``impl="mosaic_gpu"``'s
function against the float32 step-by-step oracle (HIGHEST precision, same bf16-rounded inputs;
relative L2 error, NaN/inf fails; device memory is filled with NaN and freed just before each
checked call, so an output element never written most likely shows up as NaN); then gradients
dq, dk, dv, dβ, dg (and d initial state) of sum(o * dO) against the same on float32 copies of
the inputs: autodiff of the oracle where its per-step states fit in 4 GiB, else of the chunked
XLA path (``grad_ref`` says which). Times (``bench_common.time_jax``, the method of DESIGN.md's
anchor figures): the forward of the kernel and of ``impl="xla"``; at the anchor shapes also
forward+backward, and the parts alone (prepass kernel, also as the forward under the vjp runs
it (``prepass_vjp_ms``: T and T diag(β) written too), forward walk with the states saved,
reverse walk, the chunk-gradient kernel alone (``grads_kernel_ms``) and with its XLA glue
(``chunk_grads_ms``: beta's transpose in, dβ's out, db's two parts summed)).
Each case runs on its own: a failure is printed and the next case goes on. Prints a table;
writes ``check_mosaic_delta.json`` into ``--out``.

    python -m experiments.check_mosaic_delta --out experiments/results [--quick] [--cases I ...]
        [--no-xla-timing] [--warp-specialized]

``--warp-specialized`` checks the two-warpgroup forward walk (``mosaic_gpu_ws``, off by
default until this check and ``bench_delta``'s "attnlab mosaic_gpu ws" have run on a GPU) in
every case.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from pallas_kernels import common
from pallas_kernels.delta import chunk_delta_rule, mosaic_gpu, mosaic_gpu_grads, mosaic_gpu_kernel
from pallas_kernels.delta.reference import delta_rule_reference

# (B, T, H, D, gate, time fwd+bwd and the forward's parts too)
CASES = [
    (2, 512, 4, 64, "g", False),
    (2, 512, 4, 128, "g", False),
    (2, 512, 4, 128, "none", False),
    (2, 1000, 4, 128, "g", False),          # T not a multiple of the chunk
    (2, 1000, 4, 128, "g+s0", False),       # an initial state (its gradient too)
    (2, 1000, 4, 128, "g+seg", False),      # packed segments
    (8, 4096, 16, 128, "g", True),          # the anchor shape of DESIGN.md
    (8, 4096, 16, 128, "none", True),
    (1, 8192, 2, 128, "g+s0", False),       # few CTAs: the sequence split (8 pieces)
    (1, 8192, 2, 128, "none", False),
    (1, 4096, 2, 128, "g+seg", False),      # split into 4 pieces, packed segments
]
TIME_XLA = True  # --no-xla-timing: skip timing the XLA path (saves its compiles on the GPU)
ORACLE_GRAD_BYTES = 4 << 30  # the oracle's backward keeps one float32 [B, H, D, D] state a step
NAMES = ("q", "k", "v", "beta", "g")


def make_inputs(seed: int, B: int, T: int, H: int, D: int, gate: str):
    ks = jax.random.split(jax.random.key(seed), 8)
    q, v, do = (jax.random.normal(ks[i], (B, T, H, D), jnp.bfloat16) for i in range(3))
    k = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H)) + 4.0) if gate != "none" else None
    s0 = jax.random.normal(ks[6], (B, H, D, D)) if gate == "g+s0" else None
    seg = None
    if gate == "g+seg":
        starts = jax.random.bernoulli(ks[7], 0.005, (B, T)).at[:, 0].set(False)
        seg = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    return q, k, v, beta, g, s0, seg, do


def kernel_fn(scale: float, s0=None, seg=None):
    def run(q, k, v, beta, g):
        return mosaic_gpu.mosaic_gpu_chunk_delta_rule(q, k, v, beta, g, scale=scale,
                                                      initial_state=s0, segment_ids=seg,
                                                      chunk_size=None)
    return run


def xla_fn(scale: float, s0=None, seg=None):
    def run(q, k, v, beta, g):
        return chunk_delta_rule(q, k, v, beta, g=g, scale=scale, initial_state=s0,
                                segment_ids=seg, output_final_state=True, impl="xla")
    return run


def oracle_fn(scale: float, s0=None, seg=None):
    def run(q, k, v, beta, g):
        return delta_rule_reference(q, k, v, beta, g, scale=scale, initial_state=s0,
                                    segment_ids=seg)
    return run


def fwd_bwd(fn, with_s0: bool = False):
    """Gradients of sum(o * dO) w.r.t. q, k, v, beta, g (and s0 when ``with_s0``)."""
    def run(q, k, v, beta, g, s0, do):
        def loss(q, k, v, beta, g, s0):
            o = fn(s0)(q, k, v, beta, g)[0]
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
        argnums = (0, 1, 2, 3) + ((4,) if g is not None else ()) + ((5,) if with_s0 else ())
        return jax.grad(loss, argnums)(q, k, v, beta, g, s0)
    return run


def check_case(B: int, T: int, H: int, D: int, gate: str, anchor: bool) -> dict:
    row = {"B": B, "T": T, "H": H, "D": D, "gate": gate, "status": "error"}
    q, k, v, beta, g, s0, seg, do = make_inputs(B * T + D, B, T, H, D, gate)
    scale = D ** -0.5
    reason = mosaic_gpu.mosaic_gpu_accepts(q, k, v, beta, g, initial_state=s0,
                                           segment_ids=seg, chunk_size=None)
    if reason is not None:
        row.update(status="declined", note=reason)
        return row
    kernel = jax.jit(kernel_fn(scale, s0, seg))
    bc.poison_device_memory("jax", gib=2.0)
    o, s = jax.block_until_ready(kernel(q, k, v, beta, g))
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    o_ref, s_ref = jax.jit(lambda *a: oracle_fn(scale, s0, seg)(*map(f32, a)))(q, k, v, beta, g)
    row["err_state"] = bc.rel_err(np.asarray(s), np.asarray(s_ref))
    errs = (bc.record_errors(row, [("o", o, o_ref)]) + [row["err_state"]]
            + check_gradients(row, q, k, v, beta, g, s0, seg, do, scale))
    row["status"] = "ok" if max(errs) < bc.TOL_BF16 else "wrong"
    row["auto_impl"] = _auto_choice(q, k, v, beta, g, scale)
    mk = mosaic_gpu_kernel
    row["pieces"] = mosaic_gpu.pieces_for(B * H * D // mk.V_BLOCK, -(-T // mk.CHUNK))
    args = [(q, k, v, beta, g)]
    row["mosaic_fwd_ms"] = bc.time_jax(kernel, args)
    if TIME_XLA:
        row["xla_fwd_ms"] = bc.time_jax(jax.jit(xla_fn(scale, s0, seg)), args)
    if anchor:
        time_parts(row, q, k, v, beta, g, do, scale)
        args = [(q, k, v, beta, g, s0, do)]
        row["mosaic_fwdbwd_ms"] = bc.time_jax(
            jax.jit(fwd_bwd(lambda s0: kernel_fn(scale, s0, seg))), args)
        if TIME_XLA:
            row["xla_fwdbwd_ms"] = bc.time_jax(
                jax.jit(fwd_bwd(lambda s0: xla_fn(scale, s0, seg))), args)
    return row


def time_parts(row: dict, q, k, v, beta, g, do, scale: float) -> None:
    """Times of the parts alone: forward = prepass kernel + forward walk (``walk_plain_ms``;
    ``walk_ms`` saves the per-chunk states as under the vjp); backward = reverse
    walk + the chunk-gradient kernel (``mosaic_gpu_grads.chunk_grads``; with its XLA glue:
    ``mosaic_gpu.chunk_gradients``)."""
    C = mosaic_gpu_kernel.CHUNK
    Tp = common.round_up(q.shape[1], C)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q, k, v, do, beta = pad(q), pad(k), pad(v), pad(do), pad(beta.astype(jnp.float32))
    b = None if g is None else mosaic_gpu.gate_cumsum(pad(g))
    prepare = jax.jit(mosaic_gpu._prepare)
    (T_beta,) = prepare(k, beta, b)
    row["prepass_ms"] = bc.time_jax(prepare, [(k, beta, b)])
    prepare_vjp = jax.jit(lambda *a: mosaic_gpu._prepare(*a, for_backward=True))
    _, W, T = prepare_vjp(k, beta, b)
    row["prepass_vjp_ms"] = bc.time_jax(prepare_vjp, [(k, beta, b)])
    walk = mosaic_gpu_kernel.walk
    fwd = jax.jit(lambda q, k, T_beta, v, b: walk(q, k, T_beta, v, b, None, scale=scale,
                                                  save_states=True))
    row["walk_ms"] = bc.time_jax(fwd, [(q, k, T_beta, v, b)])
    plain = jax.jit(lambda q, k, T_beta, v, b: walk(q, k, T_beta, v, b, None, scale=scale))
    row["walk_plain_ms"] = bc.time_jax(plain, [(q, k, T_beta, v, b)])
    _, _, states = fwd(q, k, T_beta, v, b)
    rev = jax.jit(lambda q, k, W, do, b: walk(q, k, W, do, b, None, scale=scale, reverse=True,
                                              save_states=True))
    row["reverse_walk_ms"] = bc.time_jax(rev, [(q, k, W, do, b)])
    _, d_states = rev(q, k, W, do, b)
    grads = jax.jit(lambda *a: mosaic_gpu.chunk_gradients(*a, scale=scale))
    row["chunk_grads_ms"] = bc.time_jax(
        grads, [(q, k, v, beta, b, (W, T, T_beta), states, do, d_states)])
    beta_t = jnp.swapaxes(beta, 1, 2)
    kernel = jax.jit(lambda *a: mosaic_gpu_grads.chunk_grads(*a, scale=scale))
    row["grads_kernel_ms"] = bc.time_jax(
        kernel, [(q, k, v, W, T, T_beta, beta_t, b, states, do, d_states)])


def check_gradients(row: dict, q, k, v, beta, g, s0, seg, do, scale: float) -> list[float]:
    """Record the relative errors of the gradients in ``row``; return them."""
    B, T, H, D = q.shape
    with_s0 = s0 is not None
    bc.poison_device_memory("jax", gib=2.0)
    got = jax.block_until_ready(jax.jit(fwd_bwd(lambda s0: kernel_fn(scale, s0, seg), with_s0))(
        q, k, v, beta, g, s0, do))
    if B * H * D * D * 4 * T <= ORACLE_GRAD_BYTES:
        row["grad_ref"], ref = "oracle", oracle_fn
    else:
        row["grad_ref"], ref = "xla", xla_fn
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):  # GPU f32 matmuls default to TF32
        want = jax.jit(fwd_bwd(lambda s0: ref(scale, s0, seg), with_s0))(
            f32(q), f32(k), f32(v), beta, g, s0, f32(do))
    names = [n for n in NAMES if n != "g" or g is not None] + (["s0"] if with_s0 else [])
    return bc.record_errors(row, [(f"d{name}", a, b) for name, a, b in zip(names, got, want)])


def _auto_choice(q, k, v, beta, g, scale) -> str:
    from pallas_kernels.delta.op import REGISTRY
    try:
        return REGISTRY.choose(None, q, k, v, beta, g, scale=scale, initial_state=None,
                               segment_ids=None, chunk_size=None).name
    except ValueError as e:
        return f"none ({e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--quick", action="store_true", help="small cases only")
    ap.add_argument("--warp-specialized", action="store_true",
                    help="every forward walk as mosaic_gpu_ws (two warpgroups per V block)")
    bc.add_check_args(ap)
    args = ap.parse_args()
    mosaic_gpu_kernel.WARP_SPECIALIZED = args.warp_specialized
    env = dict(bc.environment(), warp_specialized=args.warp_specialized)
    print(env, flush=True)
    cases = [case for case in CASES if not (args.quick and case[1] > 1000)]
    if args.cases:
        cases = [CASES[i] for i in args.cases]
    global TIME_XLA
    TIME_XLA = not args.no_xla_timing
    rows = bc.run_cases(check_case, cases, ("B", "T", "H", "D", "gate"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_mosaic_delta.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    cols = ["B", "T", "H", "D", "gate", "status", "err_o", "err_state", "nan_o", "grad_ref",
            "err_dq", "err_dk", "err_dv", "err_dbeta", "err_dg", "err_ds0",
            "mosaic_fwd_ms", "xla_fwd_ms", "prepass_ms", "prepass_vjp_ms", "walk_plain_ms",
            "walk_ms", "mosaic_fwdbwd_ms", "xla_fwdbwd_ms", "reverse_walk_ms", "chunk_grads_ms",
            "grads_kernel_ms", "auto_impl"]
    bc.print_table(rows, cols)


if __name__ == "__main__":
    main()
