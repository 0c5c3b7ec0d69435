"""Per-kernel GPU times of the delta op's forward+backward at the anchor (B=8, T=4096, H=16,
D=128 bf16), gated and not, from a jax.profiler perfetto trace: where the time goes, glue
included."""
import glob, gzip, json, collections, sys, os
import jax, jax.numpy as jnp
from pallas_kernels.delta import chunk_delta_rule

B, T, H, D = 8, 4096, 16, 128
ITERS = 10

def inputs(gated):
    ks = jax.random.split(jax.random.key(0), 7)
    q, v, do = (jax.random.normal(ks[i], (B, T, H, D), jnp.bfloat16) for i in range(3))
    k = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H)) + 4.0) if gated else None
    return q, k, v, beta, g, do

def fwd_bwd(gated):
    def loss(q, k, v, beta, g, do):
        o, _ = chunk_delta_rule(q, k, v, beta, g=g, scale=D ** -0.5, impl="mosaic_gpu")
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
    return jax.jit(jax.grad(loss, argnums=argnums))

def fwd():
    return jax.jit(lambda q, k, v, beta, g, do: chunk_delta_rule(
        q, k, v, beta, g=g, scale=D ** -0.5, impl="mosaic_gpu")[0])

def profile(name, fn, args, out):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    d = os.path.join(out, name)
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(ITERS):
            r = fn(*args)
        jax.block_until_ready(r)
    path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    ev = json.load(gzip.open(path))
    events = ev["traceEvents"] if isinstance(ev, dict) else ev
    pnames = {e["pid"]: e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    tnames = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    tot = collections.Counter(); cnt = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        p = pnames.get(e.get("pid"), "")
        if "GPU" not in p and "gpu" not in p and "device" not in p.lower():
            continue
        if "host" in p.lower():
            continue
        key = tnames.get((e["pid"], e.get("tid")), "?")[:18] + " | " + e["name"]
        tot[key] += e["dur"]; cnt[key] += 1
    by_thread = collections.Counter()
    for k, v in tot.items():
        by_thread[k.split(" | ")[0]] += v / ITERS / 1000
    print(f"== {name}: ms per iteration by trace line {dict(by_thread)}")
    for k, v in tot.most_common(30):
        print(f"  {v/ITERS/1000:8.4f} ms  x{cnt[k]/ITERS:4.1f}  {k[:110]}")

if __name__ == "__main__":
    out = sys.argv[1]
    for gated in (True, False):
        args = inputs(gated)
        profile(f"fwdbwd_{'g' if gated else 'none'}", fwd_bwd(gated), args, out)
    profile("fwd_g", fwd(), inputs(True), out)
