"""Issue 5 benchmark: chunkwise (gated) delta rule, attnlab against jla and fla (H100, bf16).

    S_t = exp(g_t) · S_{t-1} + β_t · k_tᵀ (v_t − exp(g_t) · k_t S_{t-1}),   o_t = scale · q_t S_t

Cases: "deltanet" (no g) and "gated" (g per head and step). Keys L2-normalised, β in (0, 1).
Shapes as the linear benchmark (B·T = 32768, H = 16, K = V = 128). Implementations: attnlab
``impl="xla"`` / ``"pallas"`` / ``"mosaic_gpu"`` (Hopper), jax-linear-attention 0.1.0 Mosaic GPU
(``deltanet``, ``gated_deltanet``), flash-linear-attention 0.6.0 Triton (``chunk_delta_rule``,
``chunk_gated_delta_rule``). FLOPs of the chunked WY algorithm with C = 64, per token and head
2·C·(3K + 2V) (scores, K·Kᵀ, the W and U products, intra outputs) + 6·K·V (three state
products); forward+backward counts 3x. Bytes as in bench_linear.

    python -m experiments.bench_delta --out experiments/results [--T 4096 16384]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from experiments.references import delta_rule_reference

H, K, V, CHUNK = 16, 128, 128, 64
CASES = ("deltanet", "gated")


def make_inputs(case: str, B: int, T: int):
    def make(seed: int, check: bool):
        b, t = (1, min(T, 512)) if check else (B, T)
        ks = jax.random.split(jax.random.key(seed), 6)
        q = jax.random.normal(ks[0], (b, t, H, K), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, t, H, K), jnp.float32)
        k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, H, V), jnp.bfloat16)
        beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, H))).astype(jnp.bfloat16)
        do = jax.random.normal(ks[4], (b, t, H, V), jnp.bfloat16)
        if case == "deltanet":
            return (q, k, v, beta, do)
        g = jax.nn.log_sigmoid(jax.random.normal(ks[5], (b, t, H)) + 4.0)
        return (q, k, v, beta, g, do)
    return make


def reference_for(case: str):
    scale = K**-0.5
    if case == "deltanet":
        return lambda q, k, v, beta: delta_rule_reference(q, k, v, beta, scale=scale)
    return lambda q, k, v, beta, g: delta_rule_reference(q, k, v, beta, g=g, scale=scale)


def attnlab_fn(case: str, impl: str):
    from pallas_kernels.delta import chunk_delta_rule as op

    scale = K**-0.5
    if case == "deltanet":
        return lambda q, k, v, beta: op(q, k, v, beta, scale=scale, impl=impl)[0]
    return lambda q, k, v, beta, g: op(q, k, v, beta, g=g, scale=scale, impl=impl)[0]


def attnlab_ws_fn(case: str):
    """The Hopper path with every forward walk as ``mosaic_gpu_ws`` (two warpgroups per V
    block, one V block per CTA), switched on while the function is traced (the switch is read
    at trace time)."""
    from pallas_kernels.delta import mosaic_gpu_kernel

    return bc.traced_with(mosaic_gpu_kernel, "WARP_SPECIALIZED", True,
                          attnlab_fn(case, "mosaic_gpu"))


def jla_fn(case: str):
    from jla.ops import linear_attention

    scale = K**-0.5
    if case == "deltanet":
        return lambda q, k, v, beta: linear_attention("deltanet", q, k, v, beta=beta, scale=scale,
                                                      impl="mosaic_gpu")[0]
    return lambda q, k, v, beta, g: linear_attention("gated_deltanet", q, k, v, g=g, beta=beta, scale=scale,
                                                     impl="mosaic_gpu")[0]


def fla_fn(case: str):
    scale = K**-0.5
    if case == "deltanet":
        from fla.ops.delta_rule import chunk_delta_rule

        return lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta, scale=scale)[0]
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]


IMPLS = {
    "attnlab xla": ("jax", lambda case: attnlab_fn(case, "xla")),
    "attnlab pallas": ("jax", lambda case: attnlab_fn(case, "pallas")),
    "attnlab mosaic_gpu": ("jax", lambda case: attnlab_fn(case, "mosaic_gpu")),
    "attnlab mosaic_gpu ws": ("jax", attnlab_ws_fn),
    "jla mosaic_gpu": ("jax", jla_fn),
    "fla triton": ("torch", fla_fn),
}
PEERS = ("fla triton", "jla mosaic_gpu")


def counts(case: str, problem: bc.Problem, B: int, T: int) -> tuple[dict, dict]:
    per_token = 2 * CHUNK * (3 * K + 2 * V) + 6 * K * V
    fwd = float(per_token * B * T * H)
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}, bc.io_bytes(problem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    bc.add_common_args(ap)
    ap.add_argument("--T", type=int, nargs="+", default=[4096])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    args = ap.parse_args()

    def problem_for(case: str, B: int, T: int) -> bc.Problem:
        names = ("q", "k", "v", "beta") + (("g",) if case == "gated" else ())
        return bc.Problem.build(names, make_inputs(case, B, T), reference_for(case))

    points = [(case, T) for T in args.T for case in args.cases]
    bc.run_sweep("bench_delta", args, points, IMPLS, problem_for, counts, PEERS)


if __name__ == "__main__":
    main()
