"""Issue 6 benchmark: (block-sparse) flash softmax attention against cuDNN, jla and JAX Pallas (H100).

    o_i = Σ_j softmax_j(scale · q_i·k_j over the keys j that mask(i) lets i see) v_j

Cases (bf16, B·T = 32768, H = 16, D = 128): "causal" at T in {1k, 4k, 16k, 32k}; "local1k" and
"local4k" (query i sees keys i−w < j ≤ i) and "full" (no mask) at T = 16k; "sparse10" at
T = 16k: each 128-row query block sees a random 10% of the 128-wide key blocks. FLOPs are
counted on the visited (query, key) pairs: 4·D per pair forward, 3.5x that forward+backward.
Implementations: attnlab ``flash_attention`` (``impl="mosaic_gpu"``: our Hopper kernels, every
case; ``"pallas"`` / ``"xla"``), cuDNN through
``jax.nn.dot_product_attention(implementation="cudnn")`` with ``is_causal`` /
``local_window_size`` (never an explicit mask), jax-linear-attention 0.1.0's Mosaic GPU
attention, JAX's own Pallas attention (Triton ``mha``; its Mosaic GPU ``attention_mgpu`` takes float16 only
and has no causal backward, so it is listed as unavailable), and plain XLA (``implementation="xla"``, T <= 4096 only: it materialises T×T).

    python -m experiments.bench_softmax --out experiments/results
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as bc
from experiments.references import softmax_reference

H, D, BLOCK = 16, 128, 128
WINDOWS = {"local1k": 1024, "local4k": 4096}
DENSITY = 0.10
CAUSAL_T = (1024, 4096, 16384, 32768)
OTHER_T = 16384


def sparse_table(T: int) -> np.ndarray:
    """[nq, nk] bool: which key blocks each query block visits (seeded, ~DENSITY of them)."""
    n = -(-T // BLOCK)
    per_row = max(1, round(DENSITY * n))
    rng = np.random.default_rng(T)
    table = np.zeros((n, n), bool)
    for i in range(n):
        table[i, rng.choice(n, per_row, replace=False)] = True
    return table


def visible_fn(case: str, T: int):
    """visible(i, j) for the reference, as jnp index arithmetic."""
    if case == "full":
        return lambda i, j: jnp.ones(jnp.broadcast_shapes(i.shape, j.shape), bool)
    if case == "causal":
        return lambda i, j: j <= i
    if case in WINDOWS:
        w = WINDOWS[case]
        return lambda i, j: (j <= i) & (j > i - w)
    table = jnp.asarray(sparse_table(T))
    return lambda i, j: table[jnp.minimum(i // BLOCK, table.shape[0] - 1), j // BLOCK]


def visited_pairs(case: str, T: int) -> float:
    if case == "full":
        return float(T * T)
    if case == "causal":
        return T * (T + 1) / 2
    if case in WINDOWS:
        w = WINDOWS[case]
        return float(sum(min(i + 1, w) for i in range(T)))
    return float(sparse_table(T).sum() * BLOCK * BLOCK)


def make_inputs(B: int, T: int):
    def make(seed: int, check: bool):
        b, t = (1, min(T, 1024)) if check else (B, T)
        ks = jax.random.split(jax.random.key(seed), 4)
        return tuple(jax.random.normal(kk, (b, t, H, D), jnp.bfloat16) for kk in ks)
    return make


def attnlab_fn(case: str, impl: str):
    from pallas_kernels.sparse import masks
    from pallas_kernels.sparse.ops import flash_attention

    def mask_for(T: int):
        if case == "full":
            return masks.Full()
        if case == "causal":
            return masks.Causal()
        if case in WINDOWS:
            return masks.Local(WINDOWS[case] - 1, 0)
        table = sparse_table(T)
        kv = np.full((table.shape[0], int(table.sum(1).max())), -1, np.int32)
        for i, row in enumerate(table):
            cols = np.flatnonzero(row)
            kv[i, :cols.size] = cols
        return masks.BlockSparse(kv, BLOCK, BLOCK)

    def f(q, k, v):
        if impl == "xla" and q.shape[1] > 4096:
            raise MemoryError("attnlab's XLA path materialises the T x T scores; run only for T <= 4096")
        return flash_attention(q, k, v, mask=mask_for(q.shape[1]), impl=impl)
    return f


def cudnn_fn(case: str, implementation: str = "cudnn"):
    if case == "sparse10":
        raise NotImplementedError("cuDNN has no block-sparse mask (an explicit mask is the slow path)")
    causal = case != "full"
    window = (WINDOWS[case] - 1, 0) if case in WINDOWS else None

    def f(q, k, v):
        if implementation == "xla" and q.shape[1] > 4096:
            raise MemoryError("plain XLA materialises the T x T scores; run only for T <= 4096")
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window,
                                            implementation=implementation)
    return f


def jla_fn(case: str):
    if case in ("sparse10", "full"):
        raise NotImplementedError("jla's attention is causal (optionally windowed) only")
    from jla.layers.attention import attention

    window = WINDOWS.get(case)
    return lambda q, k, v: attention(q, k, v, sliding_window=window, implementation="mosaic_gpu")


def jax_mgpu_fn(case: str):
    raise NotImplementedError("JAX's attention_mgpu (Mosaic GPU) takes float16 only (seen: bf16 rejected, "
                              "'src had type bfloat16 and dst had type float16'); this benchmark is bf16")


def jax_triton_fn(case: str):
    if case not in ("causal", "full"):
        raise NotImplementedError("JAX's Pallas Triton mha has causal / no mask only")
    from jax.experimental.pallas.ops.gpu import attention as pattn

    return lambda q, k, v: pattn.mha(q, k, v, segment_ids=None, causal=case == "causal", sm_scale=D**-0.5)


IMPLS = {
    "attnlab mosaic_gpu": ("jax", lambda case: attnlab_fn(case, "mosaic_gpu")),
    "attnlab pallas": ("jax", lambda case: attnlab_fn(case, "pallas")),
    "attnlab xla": ("jax", lambda case: attnlab_fn(case, "xla")),
    "cudnn": ("jax", cudnn_fn),
    "jla mosaic_gpu": ("jax", jla_fn),
    "jax pallas mgpu": ("jax", jax_mgpu_fn),
    "jax pallas triton": ("jax", jax_triton_fn),
    "xla": ("jax", lambda case: cudnn_fn(case, "xla")),
}
PEERS = ("cudnn", "jla mosaic_gpu")


def counts(case: str, problem: bc.Problem, B: int, T: int) -> tuple[dict, dict]:
    fwd = 4.0 * D * visited_pairs(case, T) * B * H
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}, bc.io_bytes(problem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    bc.add_common_args(ap)
    ap.add_argument("--cases", nargs="+", default=["causal", "local1k", "local4k", "full", "sparse10"])
    ap.add_argument("--T", type=int, nargs="+", default=list(CAUSAL_T), help="T values of the causal sweep")
    ap.add_argument("--other-T", type=int, default=OTHER_T, help="T of the window, full and sparse cases")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    args = ap.parse_args()

    def problem_for(case: str, B: int, T: int) -> bc.Problem:
        return bc.Problem.build(("q", "k", "v"), make_inputs(B, T),
                                lambda q, k, v: softmax_reference(q, k, v, visible_fn(case, q.shape[1])))

    points = [(c, T) for c in args.cases for T in (args.T if c == "causal" else [args.other_T])]
    bc.run_sweep("bench_softmax", args, points, IMPLS, problem_for, counts, PEERS)


if __name__ == "__main__":
    main()
