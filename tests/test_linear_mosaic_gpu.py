"""The Hopper (Mosaic GPU) forward kernel of the scalar-gate linear recurrence, checked on CPU:

* it lowers through Mosaic GPU (Pallas -> Mosaic GPU dialect, layout inference, shared-memory
  budget) for the cuda platform — on every supported jax, no GPU needed;
* its numerics, in GPU interpret mode (``plgpu.InterpretGPUParams``, jax >= 0.12; skipped
  before), against the float64 step-by-step oracle, with race detection on and outputs that
  start as NaN in the interpreter;
* its backward (three more runs of the forward kernel, two of them in its anti-causal
  ``reverse`` mode; see ``mosaic_gpu._backward``): it
  lowers for cuda, and in interpret mode dq, dk, dv, dg match autodiff of the oracle;
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
from pallas_kernels.linear.reference import gated_linear_reference

plgpu = mg.plgpu
needs_interpreter = pytest.mark.skipif(
    plgpu is None or not hasattr(plgpu, "InterpretGPUParams"),
    reason="GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12")


def _inputs(seed, B, T, H, K, V, gated):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (normal(x, (B, T, H, K), jnp.bfloat16) for x in ks[:2])
    v = normal(ks[2], (B, T, H, V), jnp.bfloat16)
    g = log_gate(ks[3], (B, T, H), -0.5, -0.01) if gated else None
    return q, k, v, g


def _oracle(q, k, v, g, scale):
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
        o, s = gated_linear_reference(f64(q), f64(k), f64(v), g=f64(g), scale=scale)
        return np.asarray(o), np.asarray(s)


@pytest.mark.parametrize("K,V,gated,v_block", [(128, 128, True, 64), (64, 64, False, 64)])
def test_lowers_for_cuda(K, V, gated, v_block):
    B, T, H = 2, 256, 3
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, H, T), jnp.float32) if gated else None)
    fwd = jax.jit(lambda q, k, v, b: mg.forward_padded(q, k, v, b, scale=0.1, v_block=v_block))
    text = fwd.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gated", [
    (2, 150, 2, 128, 128, True),   # two V blocks, a padded last chunk, three chunks
    (1, 100, 1, 64, 128, False),   # no gate
    (1, 1, 1, 64, 64, True),       # T = 1
])
def test_interpret_matches_oracle(B, T, H, K, V, gated):
    q, k, v, g = _inputs(T, B, T, H, K, V, gated)
    scale = K ** -0.5
    o, s = mg.mosaic_gpu_gated_linear_attention(
        q, k, v, g=g, gk=None, scale=scale, initial_state=None, segment_ids=None,
        chunk_size=None, interpret=plgpu.InterpretGPUParams(detect_races=True))
    ro, rs = _oracle(q, k, v, g, scale)
    assert o.dtype == jnp.bfloat16 and o.shape == ro.shape
    assert_close(o, ro, TOL_BF16, "o")
    assert_close(s, rs, 1e-4 if not gated else TOL_BF16, "final state")


def _op(interpret=None, scale=0.125):
    return lambda q, k, v, g: mg.mosaic_gpu_gated_linear_attention(
        q, k, v, g=g, gk=None, scale=scale, initial_state=None, segment_ids=None,
        chunk_size=None, interpret=interpret)


def _loss(run, do, dstate):
    """sum(o * do) + sum(final state * dstate): exercises both cotangents."""
    def loss(q, k, v, g):
        o, s = run(q, k, v, g)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(do.dtype) * dstate)
    return loss


@pytest.mark.parametrize("K,V,gated", [(128, 64, True), (64, 128, False)])
def test_backward_lowers_for_cuda(K, V, gated):
    B, T, H = 1, 200, 2
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, T, H), jnp.float32) if gated else None)
    do, dstate = jnp.ones((B, T, H, V)), jnp.ones((B, H, K, V))
    grads = jax.jit(jax.grad(_loss(_op(), do, dstate), argnums=(0, 1, 2, 3)))
    text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 4  # the forward and the three backward runs


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gated", [
    (1, 150, 2, 64, 128, True),    # K != V, a padded last chunk, three chunks
    (2, 70, 1, 128, 64, False),    # no gate, two V blocks in the dq and dk runs
    (1, 1, 1, 64, 64, True),       # T = 1 (dg is exactly 0)
])
def test_interpret_gradients_match_oracle(B, T, H, K, V, gated):
    """dq, dk, dv, dg of the Mosaic GPU backward (output and final-state cotangents) against
    autodiff of the float64 step-by-step oracle."""
    q, k, v, g = _inputs(T + 11, B, T, H, K, V, gated)
    kd, ks = jax.random.split(jax.random.PRNGKey(T))
    do, dstate = normal(kd, (B, T, H, V)), normal(ks, (B, H, K, V))
    argnums = (0, 1, 2, 3) if gated else (0, 1, 2)
    got = jax.grad(_loss(_op(plgpu.InterpretGPUParams()), do, dstate), argnums)(q, k, v, g)
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
        ref = lambda q, k, v, g: gated_linear_reference(q, k, v, g=g, scale=0.125)
        want = jax.grad(_loss(ref, f64(do), f64(dstate)), argnums)(*map(f64, (q, k, v, g)))
        want = [np.asarray(w) for w in want]
    for name, a, b in zip("qkvg", got, want):
        assert a.dtype == (jnp.bfloat16 if name != "g" else g.dtype)
        assert_close(a, b, TOL_BF16, f"d{name}")


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
        assert "segment_ids" in mg.mosaic_gpu_accepts(
            q, q, q, **{**kw, "segment_ids": jnp.zeros((1, 64), jnp.int32)})
        assert "initial_state" in mg.mosaic_gpu_accepts(
            q, q, q, **{**kw, "initial_state": jnp.zeros((1, 1, 128, 128))})
        assert "chunk_size" in mg.mosaic_gpu_accepts(q, q, q, **{**kw, "chunk_size": 32})
        assert "bfloat16" in mg.mosaic_gpu_accepts(q.astype(jnp.float32), q, q, **kw)
        assert "key dim" in mg.mosaic_gpu_accepts(q[..., :32], q[..., :32], q, **kw)
        assert "value dim" in mg.mosaic_gpu_accepts(q, q, q[..., :96], **kw)
