"""A/B: persistent vs one-item-per-CTA launch of the sparse Hopper kernels (same process)."""
import jax, jax.numpy as jnp
from experiments import bench_common as bc
from pallas_kernels.sparse import Causal, Full, flash_attention, mosaic_gpu_fwd, mosaic_gpu_bwd

def run(B, T, H, D, mask, tag):
    ks = jax.random.split(jax.random.key(T), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks)
    f = lambda q, k, v: flash_attention(q, k, v, mask=mask, impl="mosaic_gpu")
    fb = lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)
    out = {}
    for name, ctas in (("persistent", None), ("per_item", 10**9)):
        mosaic_gpu_fwd.CTAS = ctas; mosaic_gpu_bwd.CTAS = ctas
        out[name] = (bc.time_jax(jax.jit(lambda *a: f(*a)), [(q, k, v)]),
                     bc.time_jax(jax.jit(lambda *a: fb(*a)), [(q, k, v, do)]))
    mosaic_gpu_fwd.CTAS = None; mosaic_gpu_bwd.CTAS = None
    for name, (a, b) in out.items():
        print(f"AB {tag} {name}: fwd {a:.3f} ms fwd+bwd {b:.3f} ms", flush=True)

run(8, 4096, 16, 128, Causal(), "causal4k")
run(2, 16384, 16, 128, Full(), "full16k")
