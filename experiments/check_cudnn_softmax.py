"""On a GPU: flash_attention's automatic choice for the softmax layers' masks, checked and timed.

    python -m experiments.check_cudnn_softmax

For Causal and Local(1023, 0) at B=8, T=4096, H=16, D=128 bf16 it prints which implementation
auto picks, the relative error against the float32 blockwise reference, and the forward and
forward+backward times (median, bench_common.time_jax) of auto and of impl="xla".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import bench_common as bc
from experiments.references import softmax_reference
from pallas_kernels.sparse import Causal, Local, flash_attention, ops


def main() -> None:
    B, T, H, D = 8, 4096, 16, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in keys)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    cases = [("causal", Causal(), lambda i, j: j <= i),
             ("local 1024", Local(1023, 0), lambda i, j: (j <= i) & (j > i - 1024))]
    header = ["mask", "auto picks", "rel err", "auto fwd ms", "auto f+b ms", "xla fwd ms", "xla f+b ms"]
    print(" | ".join(header))
    for name, mask, visible in cases:
        kwargs = dict(mask=mask, segment_ids=None, scale=D ** -0.5, logits_soft_cap=None, block_sizes=None)
        chosen = ops.REGISTRY.choose(None, q, k, v, **kwargs).name
        out = flash_attention(q, k, v, mask=mask)
        ref = softmax_reference(q[:1], k[:1], v[:1], visible)
        err = bc.rel_err(out[:1], ref)
        row = [name, chosen, f"{err:.1e}"]
        for impl in (None, "xla"):
            fwd = jax.jit(lambda q, k, v, impl=impl: flash_attention(q, k, v, mask=mask, impl=impl))
            fb = jax.jit(lambda q, k, v, do, impl=impl: jax.vjp(
                lambda *a: flash_attention(*a, mask=mask, impl=impl), q, k, v)[1](do))
            row += [f"{bc.time_jax(fwd, [(q, k, v)]):.3f}", f"{bc.time_jax(fb, [(q, k, v, do)]):.3f}"]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
