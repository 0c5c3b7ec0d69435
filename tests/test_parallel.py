"""LASP-2 / LASP-2H on 8 fake CPU devices: the sharded ops equal the unsharded ones."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnlab.parallel import lasp2_gated_linear_attention, lasp2h_causal_attention
from pallas_kernels.linear import chunk_gated_linear_attention
from kernel_utils import TOL_F32, assert_close, log_gate, normal

N_DEV = 8
L = 5                      # local steps per device (odd, not a multiple of the chunk)
B, T, H, HKV, K, V = 2, N_DEV * L, 4, 2, 8, 6
CHUNK = 4


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices (tests/conftest.py sets fake CPU devices)")
    return jax.make_mesh((N_DEV,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))


def _segments() -> jnp.ndarray:
    """Row 0: starts exactly at a shard boundary (t=10), inside a shard (t=13), then one segment
    over five shards; row 1: a start at t=4 (last step of shard 0), then one segment to the end."""
    row0 = np.zeros(T, np.int32)
    row0[10:], row0[13:], row0[37:] = 1, 2, 3
    row1 = np.zeros(T, np.int32)
    row1[4:] = 5
    return jnp.asarray(np.stack([row0, row1]))


def _inputs(seed: int, gate: str, segments: bool, initial: bool) -> dict:
    ks = jax.random.split(jax.random.key(seed), 6)
    x = dict(q=normal(ks[0], (B, T, H, K)), k=normal(ks[1], (B, T, HKV, K)),
             v=normal(ks[2], (B, T, HKV, V)), g=None, gk=None, initial_state=None,
             segment_ids=None)
    if gate in ("g", "g+gk"):
        x["g"] = log_gate(ks[3], (B, T, H), -0.3, -0.01)
    if gate in ("gk", "g+gk"):
        x["gk"] = log_gate(ks[4], (B, T, H, K), -0.3, -0.01)
    if initial:
        x["initial_state"] = normal(ks[5], (B, H, K, V))
    if segments:
        x["segment_ids"] = _segments()
    return x


def _sharded_linear(mesh, check_vma: bool = True, impl: str = "xla", chunk_size: int = CHUNK):
    """f(q, k, v, g, gk, initial_state, segment_ids) -> (o, final) with time over 'seq'.

    The final state is equal on every device but typed varying over 'seq': with check_vma=False
    it leaves with out_specs P(); with check_vma=True every device's copy is returned stacked
    [P, B, H, K, V] (out_specs P('seq'))."""
    time = P(None, "seq")

    def local(q, k, v, g, gk, initial_state, segment_ids):
        o, final = lasp2_gated_linear_attention(
            q, k, v, axis_name="seq", g=g, gk=gk, initial_state=initial_state,
            output_final_state=True, segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)
        return (o, final[None]) if check_vma else (o, final)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(time,) * 5 + (P(), time),
                                 out_specs=(time, P("seq") if check_vma else P()),
                                 check_vma=check_vma))


def _unsharded_linear(q, k, v, g, gk, initial_state, segment_ids):
    return chunk_gated_linear_attention(q, k, v, g=g, gk=gk, initial_state=initial_state,
                                        output_final_state=True, segment_ids=segment_ids,
                                        chunk_size=CHUNK, impl="xla")


_ORDER = ("q", "k", "v", "g", "gk", "initial_state", "segment_ids")


@pytest.mark.parametrize("gate,segments,initial", [
    ("none", False, False), ("g", False, True), ("gk", True, False), ("g+gk", True, True)])
def test_lasp2_forward_equals_unsharded(mesh, gate, segments, initial):
    x = _inputs(1, gate, segments, initial)
    args = [x[n] for n in _ORDER]
    o, finals = _sharded_linear(mesh)(*args)
    o_ref, final_ref = _unsharded_linear(*args)
    assert_close(o, o_ref, TOL_F32, "o")
    for device, final in enumerate(finals):
        assert_close(final, final_ref, TOL_F32, f"final state on device {device}")


def test_lasp2_without_final_state_and_bad_initial_state(mesh):
    x = _inputs(2, "none", False, False)
    time = P(None, "seq")
    f = jax.shard_map(functools.partial(lasp2_gated_linear_attention, axis_name="seq",
                                        impl="xla"),
                      mesh=mesh, in_specs=(time,) * 3, out_specs=(time, None))
    o, final = jax.jit(lambda q, k, v: f(q, k, v))(x["q"], x["k"], x["v"])
    assert final is None
    assert_close(o, _unsharded_linear(*[x[n] for n in _ORDER])[0], TOL_F32, "o")
    bad = jnp.ones((B, H, K, V + 1))
    g = jax.shard_map(functools.partial(lasp2_gated_linear_attention, axis_name="seq",
                                        impl="xla", initial_state=bad),
                      mesh=mesh, in_specs=(time,) * 3, out_specs=(time, None))
    with pytest.raises(ValueError, match="initial_state"):
        g(x["q"], x["k"], x["v"])


@pytest.mark.parametrize("check_vma", [True, False])
def test_lasp2_gradients_equal_unsharded(mesh, check_vma):
    x = _inputs(3, "g+gk", True, True)
    ks = jax.random.split(jax.random.key(4), 2)
    w_o, w_s = normal(ks[0], (B, T, H, V)), normal(ks[1], (B, H, K, V))
    diff = ("q", "k", "v", "g", "gk", "initial_state")

    def loss(fn, *args, stacked=False):
        o, final = fn(*args, x["segment_ids"])
        return jnp.sum(o * w_o) + jnp.sum((final[-1] if stacked else final) * w_s)

    args = [x[n] for n in diff]
    grads = jax.grad(functools.partial(loss, _sharded_linear(mesh, check_vma), stacked=check_vma),
                     argnums=tuple(range(6)))(*args)
    grads_ref = jax.grad(functools.partial(loss, _unsharded_linear), argnums=tuple(range(6)))(*args)
    for name, gr, gr_ref in zip(diff, grads, grads_ref):
        assert_close(gr, gr_ref, TOL_F32, f"d{name} (check_vma={check_vma})")


def test_lasp2_pallas_impl_in_shard_map(mesh):
    """The interpreted Pallas op inside shard_map (check_vma=False) gives the same result."""
    x = _inputs(5, "g", True, True)
    args = [x[n] for n in _ORDER]
    o, final = _sharded_linear(mesh, check_vma=False, impl="pallas", chunk_size=8)(*args)
    o_ref, final_ref = _unsharded_linear(*args)
    assert_close(o, o_ref, TOL_F32, "o")
    assert_close(final, final_ref, TOL_F32, "final state")


def _causal_attention_reference(q, k, v, segment_ids):
    """Unsharded causal softmax attention (GQA, segments) in float32 at highest precision."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    hp = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bthk,bshk->bhts", q, k, precision=hp) / np.sqrt(q.shape[-1])
    t = jnp.arange(q.shape[1])
    mask = (t[:, None] >= t[None, :])[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    w = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshv->bthv", w, v, precision=hp)


@pytest.mark.parametrize("segments", [False, True])
def test_lasp2h_equals_unsharded_causal_attention(mesh, segments):
    x = _inputs(6, "none", segments, False)
    time = P(None, "seq")
    ids = x["segment_ids"]
    extra = (ids,) if segments else ()
    f = jax.jit(jax.shard_map(
        lambda q, k, v, *s: lasp2h_causal_attention(q, k, v, axis_name="seq",
                                                    segment_ids=s[0] if s else None),
        mesh=mesh, in_specs=(time,) * (3 + len(extra)), out_specs=time))
    qkv = (x["q"], x["k"], x["v"])
    assert_close(f(*qkv, *extra), _causal_attention_reference(*qkv, ids), TOL_F32, "o")

    if segments:  # gradients through the gather (reduce-scatter of dK/dV)
        w = normal(jax.random.key(7), (B, T, H, V))
        sharded = lambda q, k, v: jnp.sum(w * f(q, k, v, ids))
        dense = lambda q, k, v: jnp.sum(w * _causal_attention_reference(q, k, v, ids))
        grads = jax.grad(sharded, argnums=(0, 1, 2))(*qkv)
        grads_ref = jax.grad(dense, argnums=(0, 1, 2))(*qkv)
        for name, gr, gr_ref in zip("qkv", grads, grads_ref):
            assert_close(gr, gr_ref, TOL_F32, f"d{name}")


@pytest.mark.parametrize("op", ["linear chunk", "linear recurrent", "delta chunk", "delta recurrent"])
def test_xla_paths_run_batch_sharded_under_check_vma(mesh, op):
    # The scans' zero initial carry must be typed varying like the sharded inputs.
    from pallas_kernels import delta, linear
    fn = {"linear chunk": linear.chunk_gated_linear_attention,
          "linear recurrent": linear.recurrent_gated_linear_attention,
          "delta chunk": delta.chunk_delta_rule, "delta recurrent": delta.recurrent_delta_rule}[op]
    ks = jax.random.split(jax.random.key(5), 5)
    B, T, H, D = N_DEV, 24, 2, 8
    q, k, v = (normal(kk, (B, T, H, D)) for kk in ks[:3])
    g = log_gate(ks[3], (B, T, H))
    extra = (jax.nn.sigmoid(normal(ks[4], (B, T, H))),) if op.startswith("delta") else ()
    if op.startswith("delta"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    run = lambda *a: fn(*a[:-1], g=a[-1], impl="xla", output_final_state=True)
    args = (q, k, v, *extra, g)
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(P("seq"),) * len(args),
                            out_specs=(P("seq"), P("seq")), check_vma=True)
    for got, want in zip(jax.jit(sharded)(*args), run(*args)):
        assert_close(got, want, TOL_F32)
