"""Throwaway GPU probe (session 4): which variant of the Full+segments+T=777 sparse backward fails,
and where; plus XLA chunk-cumsum costs for the GLA prepass."""
import sys, time
import numpy as np
import jax, jax.numpy as jnp
from experiments import bench_common as bc
from experiments.check_mosaic_softmax import make_inputs, segments_of, fwd_bwd
from pallas_kernels.sparse import Full, Causal, flash_attention, attention_reference

def variant(B, T, H, mask, seg_kind, seed=0):
    q, k, v, do = make_inputs(T + 128 + seed, B, T, H, H, 128, 128)
    if seg_kind == "rand":
        seg = segments_of(B, T)
    elif seg_kind == "one":
        seg = jnp.zeros((B, T), jnp.int32)
    else:
        seg = None
    kern = lambda q, k, v: flash_attention(q, k, v, mask=mask, segment_ids=seg, impl="mosaic_gpu")
    ref = lambda q, k, v: attention_reference(q, k, v, mask=mask, segment_ids=seg)
    f32 = lambda x: x.astype(jnp.float32)
    g = jax.jit(fwd_bwd(kern))(q, k, v, do)
    gr = jax.jit(fwd_bwd(ref))(f32(q), f32(k), f32(v), f32(do))
    out = {}
    for n, a, b in zip(("dq", "dk", "dv"), g, gr):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        out[n] = bc.rel_err(a, b)
        if n == "dk" and out[n] > 0.05:
            # per (batch, key block of 64, head) error
            nb = -(-T // 64)
            per = []
            for bb in range(B):
                for hh in range(H):
                    for j in range(nb):
                        sl = slice(j * 64, min(T, j * 64 + 64))
                        per.append((bb, hh, j, round(float(bc.rel_err(a[bb, sl, hh], b[bb, sl, hh])), 3)))
            bad = [p for p in per if p[3] > 0.05]
            out["bad_blocks"] = f"{len(bad)}/{len(per)} " + str(bad[:12])
            if seg is not None:
                out["seg_cuts"] = str([np.flatnonzero(np.diff(np.asarray(seg[bb]))).tolist() for bb in range(B)])
    return out

print(jax.devices(), jax.__version__, flush=True)
for args in [(2, 777, 2, Full(), "rand"), (2, 777, 2, Full(), None), (2, 777, 2, Full(), "one"),
             (2, 768, 2, Full(), "rand"), (2, 777, 2, Causal(), "rand"), (1, 777, 1, Full(), "rand"),
             (2, 1000, 2, Full(), "rand"), (2, 777, 2, Full(), "rand", 1)]:
    try:
        r = variant(*args)
    except Exception as e:
        r = {"error": repr(e)[:300]}
    print("VARIANT", args[:3], type(args[3]).__name__, args[4:], {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)

# GLA prepass: XLA chunk cumsum alternatives on [8, 4096, 16, 128] f32
x = -jax.nn.softplus(jax.random.normal(jax.random.key(0), (8, 4096, 16, 128), jnp.float32))
def chunked(x):
    B, T, H, K = x.shape
    return x.reshape(B, T // 64, 64, H, K)
f_cumsum = jax.jit(lambda x: jnp.cumsum(chunked(x), axis=2))
f_assoc = jax.jit(lambda x: jax.lax.associative_scan(jnp.add, chunked(x), axis=2))
f_copy = jax.jit(lambda x: x * 2.0)
for name, f in [("jnp.cumsum", f_cumsum), ("associative_scan", f_assoc), ("x*2 (HBM floor)", f_copy)]:
    print("CUMSUM", name, round(bc.time_jax(f, [(x,)]), 3), "ms", flush=True)
