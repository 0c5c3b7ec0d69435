"""The Hopper (Mosaic GPU) kernel of the scalar-gate linear recurrence, checked on CPU:

* it lowers through Mosaic GPU (Pallas -> Mosaic GPU dialect, layout inference, shared-memory
  budget) for the cuda platform — on every supported jax, no GPU needed;
* its numerics, in GPU interpret mode (``plgpu.InterpretGPUParams``, jax >= 0.12; skipped
  before), against the float64 step-by-step oracle, with race detection on and outputs that
  start as NaN in the interpreter: one and two warpgroups, initial state, the sequence split
  into pieces (made to happen at small T by lowering MIN_PIECE_CHUNKS);
* its backward (three more walks, two of them in the anti-causal ``reverse`` mode; see
  ``mosaic_gpu._backward``): it lowers for cuda (also the ``precise`` dq and dk walks at
  K = V = 128 with two warpgroups and float32 output, the tightest shared-memory budget), and
  in interpret mode dq, dk, dv, dg and the initial state's gradient match autodiff of the
  oracle; dg to ~1e-5 at T = 1000, where bf16 operands in the dq and dk walks left it 1e-2 off;
* how many pieces the sequence split makes for the benchmark shapes;
* its ``accepts`` declines what it does not support, and everything off Hopper.
"""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernel_utils import TOL_BF16, assert_close, log_gate, normal
from pallas_kernels import mosaic_gpu_common
from pallas_kernels.linear import mosaic_gpu as mg
from pallas_kernels.linear import mosaic_gpu_kernel as mk
from pallas_kernels.linear.reference import gated_linear_reference

plgpu = mosaic_gpu_common.plgpu
needs_interpreter = pytest.mark.skipif(
    plgpu is None or not hasattr(plgpu, "InterpretGPUParams"),
    reason="GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12")


def _inputs(seed, B, T, H, K, V, gated):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (normal(x, (B, T, H, K), jnp.bfloat16) for x in ks[:2])
    v = normal(ks[2], (B, T, H, V), jnp.bfloat16)
    g = log_gate(ks[3], (B, T, H), -0.5, -0.01) if gated else None
    return q, k, v, g


def _oracle(q, k, v, g, s0, scale, segment_ids=None):
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
        o, s = gated_linear_reference(f64(q), f64(k), f64(v), g=f64(g), scale=scale,
                                      initial_state=f64(s0), segment_ids=segment_ids)
        return np.asarray(o), np.asarray(s)


@pytest.mark.parametrize("K,V,gated,pieces,states_only,with_s0,reverse,out_dtype,precise", [
    (128, 128, True, 1, False, False, False, None, False),        # two warpgroups, one piece
    (128, 128, True, 2, True, False, False, None, False),         # the sequence split's state pass
    (64, 128, False, 2, False, True, True, jnp.float32, False),   # pieces from s0, reverse, f32 out
    (128, 64, True, 1, False, True, False, jnp.float32, False),   # one warpgroup, initial state
    (128, 128, True, 2, False, True, True, jnp.float32, True),    # hi + lo operands, most SMEM
    (64, 64, True, 2, True, False, False, None, True),            # hi + lo state pass
])
def test_walk_lowers_for_cuda(K, V, gated, pieces, states_only, with_s0, reverse, out_dtype,
                              precise):
    B, T, H = 2, 512, 3
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, H, T), jnp.float32) if gated else None,
            sd((B * pieces, H, K, V), jnp.float32) if with_s0 else None)
    fwd = jax.jit(lambda q, k, v, b, s0: mk.walk(
        None if states_only else q, k, v, b, s0, scale=0.1, pieces=pieces,
        states_only=states_only, reverse=reverse, out_dtype=out_dtype, precise=precise))
    text = fwd.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("B,H,T,pieces", [(8, 16, 4096, 1), (2, 16, 16384, 4), (1, 16, 65536, 8),
                                          (1, 1, 512, 1), (1, 2, 4096, 4)])
def test_pieces_fill_the_gpu(B, H, T, pieces):
    """Sequence split: B·H·P within the SM count, pieces of at least MIN_PIECE_CHUNKS chunks."""
    assert mg.pieces_for(B * H, T // mk.CHUNK) == pieces


def _segments(B, T, seed):
    """Random packed-document ids [B, T] (a few documents per row, lengths across chunks)."""
    starts = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.03, (B, T)).at[:, 0].set(False)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gated,init,segments,min_piece,groups", [
    (2, 150, 2, 128, 128, True, False, False, 16, 2),  # two warpgroups, padded last chunk
    (1, 150, 1, 64, 128, True, True, False, 1, 2),     # initial state, two pieces
    (1, 200, 1, 64, 128, False, True, True, 1, 1),     # segments, one warpgroup per CTA
    (1, 100, 1, 64, 128, False, False, False, 16, 2),  # no gate
    (1, 1, 1, 64, 64, True, True, False, 16, 2),       # T = 1
])
def test_interpret_matches_oracle(B, T, H, K, V, gated, init, segments, min_piece, groups,
                                  monkeypatch):
    monkeypatch.setattr(mg, "MIN_PIECE_CHUNKS", min_piece)
    monkeypatch.setattr(mg, "WARPGROUPS_PER_CTA", groups)
    q, k, v, g = _inputs(T, B, T, H, K, V, gated)
    s0 = normal(jax.random.PRNGKey(T + 1), (B, H, K, V)) if init else None
    seg = _segments(B, T, T) if segments else None
    scale = K ** -0.5
    o, s = mg.mosaic_gpu_gated_linear_attention(
        q, k, v, g=g, gk=None, scale=scale, initial_state=s0, segment_ids=seg,
        chunk_size=None, interpret=plgpu.InterpretGPUParams(detect_races=True))
    ro, rs = _oracle(q, k, v, g, s0, scale, seg)
    assert o.dtype == jnp.bfloat16 and o.shape == ro.shape
    assert_close(o, ro, TOL_BF16, "o")
    assert_close(s, rs, 1e-4 if not (gated or init) else TOL_BF16, "final state")


def _op(interpret=None, scale=0.125, segment_ids=None):
    return lambda q, k, v, g, s0: mg.mosaic_gpu_gated_linear_attention(
        q, k, v, g=g, gk=None, scale=scale, initial_state=s0, segment_ids=segment_ids,
        chunk_size=None, interpret=interpret)


def _loss(run, do, dstate):
    """sum(o * do) + sum(final state * dstate): exercises both cotangents."""
    def loss(q, k, v, g, s0):
        o, s = run(q, k, v, g, s0)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(do.dtype) * dstate)
    return loss


@pytest.mark.parametrize("K,V,gated", [(128, 64, True), (64, 128, False), (128, 128, True),
                                        (64, 64, True)])
def test_backward_lowers_for_cuda(K, V, gated):
    B, T, H = 1, 200, 2
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, T, H), jnp.float32) if gated else None,
            sd((B, H, K, V), jnp.float32))
    do, dstate = jnp.ones((B, T, H, V)), jnp.ones((B, H, K, V))
    grads = jax.jit(jax.grad(_loss(_op(), do, dstate), argnums=(0, 1, 2, 3, 4)))
    text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 4  # the forward and the three backward runs


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gated,init,segments,min_piece", [
    (1, 150, 2, 64, 128, True, True, False, 1),    # K != V, initial state, two pieces
    (1, 180, 1, 64, 64, True, True, True, 16),     # segments (reset gates; their dg is 0)
    (2, 70, 1, 128, 64, False, False, False, 16),  # no gate, two warpgroups in dq, dk walks
    (1, 1, 1, 64, 64, True, False, False, 16),     # T = 1 (dg is exactly 0)
])
def test_interpret_gradients_match_oracle(B, T, H, K, V, gated, init, segments, min_piece,
                                          monkeypatch):
    """dq, dk, dv, dg, d initial state of the Mosaic GPU backward (output and final-state
    cotangents) against autodiff of the float64 step-by-step oracle."""
    monkeypatch.setattr(mg, "MIN_PIECE_CHUNKS", min_piece)
    q, k, v, g = _inputs(T + 11, B, T, H, K, V, gated)
    kd, ks, k0 = jax.random.split(jax.random.PRNGKey(T), 3)
    do, dstate = normal(kd, (B, T, H, V)), normal(ks, (B, H, K, V))
    s0 = normal(k0, (B, H, K, V)) if init else None
    seg = _segments(B, T, T + 5) if segments else None
    names = [n for n, x in zip(("q", "k", "v", "g", "s0"), (q, k, v, g, s0)) if x is not None]
    argnums = tuple(("q", "k", "v", "g", "s0").index(n) for n in names)
    got = jax.grad(_loss(_op(plgpu.InterpretGPUParams(), segment_ids=seg), do, dstate),
                   argnums)(q, k, v, g, s0)
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
        ref = lambda q, k, v, g, s0: gated_linear_reference(q, k, v, g=g, scale=0.125,
                                                            initial_state=s0, segment_ids=seg)
        want = jax.grad(_loss(ref, f64(do), f64(dstate)), argnums)(
            *map(f64, (q, k, v, g, s0)))
        want = [np.asarray(w) for w in want]
    for name, a, b in zip(names, got, want):
        assert a.dtype == {"g": g, "s0": s0}.get(name, q).dtype
        assert_close(a, b, TOL_BF16, f"d{name}")


@needs_interpreter
@pytest.mark.parametrize("K,V", [(128, 64), (64, 128)])
def test_interpret_gate_gradient_is_float32_accurate(K, V, monkeypatch):
    """dg at T = 1000 against the float64 oracle. dg_s = sum_{t >= s} (q_t . dq_t - k_t . dk_t)
    cancels nearly equal terms over the whole sequence, so bf16 rounding of the dq and dk
    walks' operands (S, A, decayed v) left it 5.6e-3 off here (1.9e-2 at T = 2000); with their
    hi + lo parts (``precise``) it is ~1e-5. Gates log_sigmoid(N(0, 1) + 4) as in the H100
    check, initial state and final-state cotangent, the sequence split into pieces (so the
    precise ``states_only`` pass runs too), two warpgroups in the walks whose V is 128; races
    checked."""
    monkeypatch.setattr(mg, "MIN_PIECE_CHUNKS", 1)
    B, T, H = 1, 1000, 1
    q, k, v, _ = _inputs(T, B, T, H, K, V, False)
    kg, kd, ks, k0 = jax.random.split(jax.random.PRNGKey(T + 3), 4)
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H)) + 4.0)
    do = normal(kd, (B, T, H, V), jnp.bfloat16).astype(jnp.float32)  # exact: o is bf16
    dstate, s0 = normal(ks, (B, H, K, V)), normal(k0, (B, H, K, V))
    interpret = plgpu.InterpretGPUParams(detect_races=True)
    dg = jax.grad(_loss(_op(interpret, K ** -0.5), do, dstate), 3)(q, k, v, g, s0)
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
        ref = lambda q, k, v, g, s0: gated_linear_reference(q, k, v, g=g, scale=K ** -0.5,
                                                            initial_state=s0)
        want = jax.grad(_loss(ref, f64(do), f64(dstate)), 3)(*map(f64, (q, k, v, g, s0)))
    assert_close(dg, np.asarray(want), 1e-4, "dg")


def test_accepts_declines_unsupported_calls():
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    kw = dict(g=None, gk=None, initial_state=None, segment_ids=None, chunk_size=None)
    reason = mg.mosaic_gpu_accepts(q, q, q, **kw)
    assert reason is not None and "Hopper" in reason  # this machine has no Hopper GPU
    hopper = pytest.MonkeyPatch.context()
    with hopper as mp:
        mp.setattr(mosaic_gpu_common, "is_hopper", lambda: True)
        assert mg.mosaic_gpu_accepts(q, q, q, **kw) is None
        assert "gk" in mg.mosaic_gpu_accepts(q, q, q, **{**kw, "gk": jnp.zeros((1, 64, 1, 128))})
        assert mg.mosaic_gpu_accepts(
            q, q, q, **{**kw, "segment_ids": jnp.zeros((1, 64), jnp.int32)}) is None
        assert mg.mosaic_gpu_accepts(
            q, q, q, **{**kw, "initial_state": jnp.zeros((1, 1, 128, 128))}) is None
        assert "chunk_size" in mg.mosaic_gpu_accepts(q, q, q, **{**kw, "chunk_size": 32})
        assert "bfloat16" in mg.mosaic_gpu_accepts(q.astype(jnp.float32), q, q, **kw)
        assert "key dim" in mg.mosaic_gpu_accepts(q[..., :32], q[..., :32], q, **kw)
        assert "value dim" in mg.mosaic_gpu_accepts(q, q, q[..., :96], **kw)
