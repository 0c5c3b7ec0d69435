"""Gated linear recurrence: every registered implementation of the chunk op against the float64
step-by-step oracle (outputs, final state, gradients of every input), plus the recurrent op,
dispatch and input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kernel_utils import TOL_BF16, TOL_F32, assert_close, normal
from pallas_kernels.linear import (REGISTRY, chunk_gated_linear_attention,
                                   recurrent_gated_linear_attention)
from test_linear_utils import make_case, oracle, run_op

IMPLS = [n for n in REGISTRY.names() if not n.startswith("mosaic_gpu")]  # Hopper only: test_linear_mosaic_gpu*.py
GRAD_TOL = 2e-4

# A covering set: every T, K != V both ways (16/64/128), every gate kind, strong decay,
# segments, initial state, GQA. The gradient cases check outputs and final state too.
FORWARD_CASES = {
    "T37_const_gqa": dict(T=37, K=64, V=16, gate="const", H=4, Hkv=2, state=True),
    "T64_gk_K128": dict(T=64, K=128, V=64, gate="gk", state=True),
    "T100_none_seg": dict(T=100, K=16, V=64, gate="none", segments=True, B=2),
    "T300_ggk_seg_strong": dict(T=300, K=16, V=64, gate="g+gk", segments=True, state=True,
                                gk_low=-6.0),
}
GRAD_CASES = {
    "T1_gk": dict(T=1, K=16, V=64, gate="gk", state=True),
    "T37_ggk_seg_state": dict(T=37, K=16, V=128, gate="g+gk", segments=True, state=True),
    "T64_g_gqa": dict(T=64, K=64, V=16, gate="g", H=2, Hkv=1, state=True, segments=True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(FORWARD_CASES))
def test_forward_matches_float64_oracle(impl, name):
    case = make_case(1, **FORWARD_CASES[name])
    o, s = run_op(case, impl)
    o_ref, s_ref = oracle(case)
    assert o.dtype == case.q.dtype and s.dtype == jnp.float32
    assert_close(o, o_ref, TOL_F32, f"{impl} {name} output")
    assert_close(s, s_ref, TOL_F32, f"{impl} {name} final state")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_match_float64_oracle(impl, name):
    case = make_case(2, **GRAD_CASES[name])
    o, s, grads = run_op(case, impl, grads=True, chunk_size=16)
    o_ref, s_ref, grads_ref = oracle(case, grads=True)
    assert_close(o, o_ref, TOL_F32, f"{impl} {name} output")
    assert_close(s, s_ref, TOL_F32, f"{impl} {name} final state")
    assert set(grads) == set(grads_ref)
    for n in grads_ref:
        assert_close(grads[n], grads_ref[n], GRAD_TOL, f"{impl} {name} d{n}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl):
    case = make_case(3, T=45, K=64, V=16, gate="g+gk", segments=True, dtype=jnp.bfloat16)
    o, s, grads = run_op(case, impl, grads=True)
    o_ref, s_ref, grads_ref = oracle(case, grads=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, o_ref, TOL_BF16, "bf16 output")
    assert_close(s, s_ref, TOL_BF16, "bf16 state")
    for n in grads_ref:
        assert_close(grads[n], grads_ref[n], TOL_BF16, f"bf16 d{n}")


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_size_and_split_sequence(impl):
    """Any chunk size gives the same result; running two halves with the carried state equals
    one run (the decode/prefill contract)."""
    case = make_case(4, T=50, K=16, V=32, gate="gk", state=True)
    o_ref, s_ref = oracle(case)
    for C in (8, 24):
        o, s = run_op(case, impl, chunk_size=C)
        assert_close(o, o_ref, TOL_F32, f"chunk {C} output")
    first, rest = slice(0, 21), slice(21, None)
    part = lambda t, state: chunk_gated_linear_attention(
        case.q[:, t], case.k[:, t], case.v[:, t], gk=case.gk[:, t], initial_state=state,
        output_final_state=True, impl=impl)
    o1, s1 = part(first, case.initial_state)
    o2, s2 = part(rest, s1)
    assert_close(jnp.concatenate([o1, o2], 1), o_ref, TOL_F32, "split output")
    assert_close(s2, s_ref, TOL_F32, "split state")


def test_recurrent_op_matches_chunk_op():
    case = make_case(5, T=33, K=16, V=24, gate="g+gk", segments=True, state=True, H=4, Hkv=2)
    args = (case.q, case.k, case.v)
    kw = dict(g=case.g, gk=case.gk, initial_state=case.initial_state,
              segment_ids=case.segment_ids, output_final_state=True)
    o_r, s_r = recurrent_gated_linear_attention(*args, **kw)
    o_c, s_c = chunk_gated_linear_attention(*args, **kw, impl="xla")
    assert_close(o_r, o_c, TOL_F32, "recurrent vs chunk output")
    assert_close(s_r, s_c, TOL_F32, "recurrent vs chunk state")
    o_ref, s_ref = oracle(case)
    assert_close(o_r, o_ref, TOL_F32, "recurrent output")
    assert chunk_gated_linear_attention(*args, impl="xla")[1] is None


def test_input_errors_name_the_problem():
    q = normal(jax.random.key(0), (1, 8, 2, 16))
    v = normal(jax.random.key(1), (1, 8, 2, 8))
    with pytest.raises(ValueError, match="gk must have shape"):
        chunk_gated_linear_attention(q, q, v, gk=jnp.zeros((1, 8, 2, 8)))
    with pytest.raises(ValueError, match="g must have rank 3"):
        chunk_gated_linear_attention(q, q, v, g=jnp.zeros((1, 8, 2, 16)))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        chunk_gated_linear_attention(q, q, v, initial_state=jnp.zeros((1, 2, 8, 16)))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_linear_attention(q, q, v, chunk_size=0)
    with pytest.raises(ValueError, match="impl must be"):
        chunk_gated_linear_attention(q, q, v, impl="triton")
    with pytest.raises(TypeError, match="segment_ids must be an integer"):
        recurrent_gated_linear_attention(q, q, v, segment_ids=jnp.zeros((1, 8)))
