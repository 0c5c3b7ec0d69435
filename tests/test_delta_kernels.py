"""Portable Pallas delta-rule kernels: TPU interpret mode (Mosaic-legal blocks, unwritten memory
NaN), strong decay, dispatch (auto picks the kernel, declines an illegal chunk), the chunk math's
hand-written backward against autodiff of its forward."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernel_utils import TOL_F32, assert_close, log_gate
from test_delta_utils import make_case, oracle
from pallas_kernels.delta import chunk_delta_rule, chunk_math, implementations
from pallas_kernels.delta.pallas_op import pallas_chunk_delta_rule


def _kernel_outputs_and_grads(case, chunk, interpret=None):
    def run(inputs):
        return pallas_chunk_delta_rule(
            inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs.get("g"),
            scale=case.q.shape[-1] ** -0.5, initial_state=inputs.get("initial_state"),
            segment_ids=case.segment_ids, chunk_size=chunk, interpret=interpret)
    @jax.jit
    def outputs_and_grads(inputs, do, ds):
        (o, s), vjp = jax.vjp(run, inputs)
        return (o, s), vjp((do, ds))[0]

    return outputs_and_grads(case.inputs(), case.do, case.ds)


def _check_against_oracle(case, chunk, interpret=None, tol=TOL_F32):
    (o, s), grads = _kernel_outputs_and_grads(case, chunk, interpret)
    (ref_o, ref_s), ref_grads = oracle(case, grads=True)
    assert_close(o, ref_o, tol, "o")
    assert_close(s, ref_s, tol, "final state")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, tol, f"d{name}")


def test_tpu_interpret_mode():
    """(C, K) = (32, 32) / (32, 64) tiles, [1, C] rows, [K, V] states under Mosaic TPU
    interpret mode, whose uninitialised memory is NaN: every output block must be written."""
    case = make_case(20, 1, 50, 1, 32, 64, segments=True)
    _check_against_oracle(case, 32, pltpu.InterpretParams(uninitialized_memory="nan"))


def test_strong_decay_stays_exact():
    """Gates down to -30 per step: every decay factor is formed as exp of a difference <= 0."""
    case = make_case(21, 1, 50, 2, 16, 16, initial=True)
    case.g = log_gate(jax.random.PRNGKey(22), case.g.shape, -30.0, -5.0)
    _check_against_oracle(case, 16)


def test_auto_dispatch_and_declined_chunk():
    assert implementations() == ["mosaic_gpu", "pallas", "xla"]  # mosaic_gpu declines off Hopper
    case = make_case(23, 1, 40, 2, 8, 8, initial=False)
    args = (case.q, case.k, case.v, case.beta)
    auto, _ = chunk_delta_rule(*args, g=case.g, chunk_size=16)
    kernel, _ = chunk_delta_rule(*args, g=case.g, chunk_size=16, impl="pallas")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(kernel))
    with pytest.raises(ValueError, match="multiple of 8"):
        chunk_delta_rule(*args, g=case.g, chunk_size=20, impl="pallas")
    fallback, _ = chunk_delta_rule(*args, g=case.g, chunk_size=20)  # auto: the XLA path
    assert_close(fallback, oracle(case)[0], TOL_F32)


@pytest.mark.parametrize("gated,segments", [(True, True), (False, False)])
def test_chunk_math_backward_matches_autodiff(gated, segments):
    C, K, V = 16, 8, 12
    ks = jax.random.split(jax.random.PRNGKey(24 + gated), 9)
    q, k = jax.random.normal(ks[0], (C, K)), jax.random.normal(ks[1], (C, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (C, V))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (C, 1)))
    b = jnp.cumsum(log_gate(ks[4], (C, 1), -0.7, -0.01), axis=0)
    s0, do, ds1 = (jax.random.normal(kk, shape) for kk, shape in
                   zip(ks[5:8], ((K, V), (C, V), (K, V))))
    r = jnp.cumsum(jax.random.uniform(ks[8], (C, 1)) < 0.2, axis=0).astype(jnp.int32)

    def gates(b):
        return chunk_math.Gates(b if gated else None, b.T if gated else None,
                                r if segments else None, r.T if segments else None)

    def forward(q, k, v, beta, b, s0):
        return chunk_math.apply(chunk_math.prepare(k, v, beta, gates(b)), q, k, s0)

    _, vjp = jax.vjp(forward, q, k, v, beta, b, s0)
    ref = vjp((do, ds1))
    dq, dk, dv, dbeta, db_col, db_row, ds0 = chunk_math.backward(q, k, v, beta, gates(b), s0,
                                                                 do, ds1)
    got = (dq, dk, dv, dbeta, db_col + db_row.T, ds0)
    for name, x, y in zip(("dq", "dk", "dv", "dbeta", "db", "ds0"), got, ref):
        if name == "db" and not gated:
            assert float(jnp.abs(x).max()) == 0.0
            continue
        assert_close(x, y, 1e-5, name)


def test_kernels_lower_for_tpu():
    """Forward and backward kernels trace and lower to Mosaic TPU (jax.export, no TPU needed) at
    the benchmark's head size with bf16 inputs; Mosaic's own compile passes run only on a TPU."""
    B, T, H, K = 1, 100, 1, 128
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    args = (spec((B, T, H, K), jnp.bfloat16), spec((B, T, H, K), jnp.bfloat16),
            spec((B, T, H, K), jnp.bfloat16), spec((B, T, H)), spec((B, T, H)),
            spec((B, H, K, K)), spec((B, T), jnp.int32))

    def loss(q, k, v, beta, g, s0, seg):
        o, s = pallas_chunk_delta_rule(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0,
                                       segment_ids=seg, chunk_size=64, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    exported = jax.export.export(jax.jit(grad), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()
