"""Diagnostic: two-warpgroup vs one-warpgroup delta chunk-gradient kernel on the same random inputs."""
import sys
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.delta import mosaic_gpu_grads as mg

def inputs(B, T, H, K=128, V=128, C=64, seed=0):
    ks = iter(jax.random.split(jax.random.key(seed), 16))
    n = lambda s, sc=1.0: (sc * jax.random.normal(next(ks), s)).astype(jnp.bfloat16)
    N = T // C
    b = jnp.cumsum(jax.nn.log_sigmoid(jax.random.normal(next(ks), (B, H, N, C)) + 4.0), -1).reshape(B, H, T)
    beta = jax.nn.sigmoid(jax.random.normal(next(ks), (B, H, T)))
    return (n((B, T, H, K)), n((B, T, H, K), 0.1), n((B, T, H, V)), n((B, T, H, K), 0.1), n((B, T, H, C), 0.2),
            n((B, T, H, C), 0.2), beta, b, n((B, N, H, K, V)), n((B, T, H, V)), n((B, N, H, K, V)))

names = ("dq", "dk", "dv", "dbeta", "db_col", "db_row")
for (B, T, H) in ((2, 512, 4), (8, 4096, 16)):
    args = inputs(B, T, H)
    f = lambda g: jax.jit(lambda *a: mg.chunk_grads(*a, scale=128 ** -0.5, groups=g))
    one = [np.asarray(x, np.float32) for x in f(1)(*args)]
    two_a = [np.asarray(x, np.float32) for x in f(2)(*args)]
    two_b = [np.asarray(x, np.float32) for x in f(2)(*args)]
    for name, x1, x2, x3 in zip(names, one, two_a, two_b):
        d = np.abs(x2 - x1); rel = np.linalg.norm(x2 - x1) / np.linalg.norm(x1)
        line = f"B={B} T={T} {name}: rel {rel:.2e} max {d.max():.3e} rerun-equal {np.array_equal(x2, x3)}"
        if name.startswith("db") or name == "dbeta":
            per_i = d.reshape(-1, 64).max(0)  # by position in the chunk
            bad = np.argsort(per_i)[-4:]
            frac = np.mean(d.reshape(-1, 64).max(1) > 1e-3 * np.abs(x1).max())
            line += f" worst positions {bad.tolist()} ({per_i[bad].round(4).tolist()}), chunks off {frac:.4f}"
        print(line, flush=True)
