"""Throwaway GPU probe (session 4, call 3): sparse forward loop variants timed; cuDNN alongside."""
import jax
from experiments import bench_common as bc
from experiments.check_mosaic_softmax import make_inputs, fwd_bwd
from pallas_kernels.sparse import Causal, Full, flash_attention, mosaic_gpu_fwd
for mask, B, T in [(Causal(), 8, 4096), (Full(), 2, 16384)]:
    q, k, v, do = make_inputs(T, B, T, 16, 16, 128, 128)
    cud = jax.jit(lambda q, k, v, c=isinstance(mask, Causal): jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn"))
    print(type(mask).__name__, T, "cudnn fwd", round(bc.time_jax(cud, [(q, k, v)]), 3), flush=True)
    for overlap, pp in ((False, True), (True, True), (False, False)):
        mosaic_gpu_fwd.OVERLAP, mosaic_gpu_fwd.PINGPONG = overlap, pp
        f = jax.jit(lambda q, k, v, mask=mask: flash_attention(q, k, v, mask=mask, impl="mosaic_gpu"))
        try:
            print(type(mask).__name__, T, "OVERLAP", overlap, "PINGPONG", pp, round(bc.time_jax(f, [(q, k, v)]), 3), "ms", flush=True)
        except Exception as e:
            print("ERR", overlap, pp, repr(e)[:400], flush=True)
    mosaic_gpu_fwd.OVERLAP, mosaic_gpu_fwd.PINGPONG = False, True
    if T == 4096:
        f = jax.jit(fwd_bwd(lambda q, k, v: flash_attention(q, k, v, mask=mask, impl="mosaic_gpu")))
        print("causal fwd+bwd", round(bc.time_jax(f, [(q, k, v, do)]), 3), flush=True)
