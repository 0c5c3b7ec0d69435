"""Delta-rule ops (chunk_delta_rule, recurrent_delta_rule) against the float64 step-by-step oracle:
T in {1, 37, 64, 300}, K != V, with/without g, segments, initial/final state, GQA, bf16,
gradients of every input, finiteness with non-normalised keys, input errors."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernel_utils import TOL_BF16, TOL_F32, assert_close
from test_delta_utils import make_case, op_outputs_and_grads, oracle
from pallas_kernels.delta import chunk_delta_rule, implementations, recurrent_delta_rule

CHUNK_IMPLS = [i for i in implementations() if i in ("xla", "pallas")]

# (seed, B, T, H, K, V, options, chunk_size)
FORWARD_CASES = {
    "t1_gated_init": (1, 2, 1, 2, 8, 12, dict(), 16),
    "t37_delta_segments": (2, 2, 37, 3, 8, 12, dict(gated=False, segments=True), 16),
    "t64_gated_segments_gqa": (3, 1, 64, 4, 16, 8, dict(hkv=2, segments=True, initial=False), 16),
    "t300_gated_init": (4, 1, 300, 2, 16, 24, dict(), None),
}


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("name", sorted(FORWARD_CASES))
def test_chunk_forward_matches_oracle(impl, name):
    seed, B, T, H, K, V, opts, chunk = FORWARD_CASES[name]
    case = make_case(seed, B, T, H, K, V, **opts)
    run = jax.jit(lambda q, k, v, beta, g, s0, seg: chunk_delta_rule(
        q, k, v, beta, g=g, initial_state=s0, segment_ids=seg, output_final_state=True,
        chunk_size=chunk, impl=impl))
    o, s = run(case.q, case.k, case.v, case.beta, case.g, case.initial_state, case.segment_ids)
    ref_o, ref_s = oracle(case)
    assert o.dtype == case.q.dtype and s.dtype == jnp.float32
    assert_close(o, ref_o, TOL_F32, "o")
    assert_close(s, ref_s, TOL_F32, "final state")


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
@pytest.mark.parametrize("gated", [True, False])
def test_chunk_gradients_match_oracle(impl, gated):
    case = make_case(5 + gated, 2, 37, 2, 8, 12, gated=gated, segments=True)
    (o, s), grads = op_outputs_and_grads(chunk_delta_rule, case, chunk_size=16, impl=impl)
    (ref_o, ref_s), ref_grads = oracle(case, grads=True)
    assert_close(o, ref_o, TOL_F32, "o")
    assert_close(s, ref_s, TOL_F32, "final state")
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, TOL_F32, f"d{name}")


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_bf16_inputs(impl):
    case = make_case(7, 1, 45, 2, 16, 16, segments=True, dtype=jnp.bfloat16)
    (o, s), grads = op_outputs_and_grads(chunk_delta_rule, case, chunk_size=16, impl=impl)
    (ref_o, ref_s), ref_grads = oracle(case, grads=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, ref_o, TOL_BF16, "o")
    assert_close(s, ref_s, TOL_BF16, "final state")
    for name, ref in ref_grads.items():
        assert grads[name].dtype == case.inputs()[name].dtype
        assert_close(grads[name], ref, TOL_BF16, f"d{name}")


@pytest.mark.parametrize("impl", CHUNK_IMPLS)
def test_chunk_finite_with_unnormalised_keys(impl):
    """Raw keys of norm ~1.3 (beta ||k||^2 up to ~1.7: not normalised, still a stable rule) and
    keys of norm ~4 over a short horizon: outputs, state and gradients stay finite and match."""
    for seed, key_norm, T in ((8, 1.3, 70), (9, 4.0, 6)):
        case = make_case(seed, 1, T, 2, 8, 8, key_norm=None, initial=False)
        case.k = case.k * (key_norm / np.sqrt(8))
        (o, s), grads = op_outputs_and_grads(chunk_delta_rule, case, chunk_size=32, impl=impl)
        (ref_o, ref_s), ref_grads = oracle(case, grads=True)
        for name, x in [("o", o), ("state", s), *grads.items()]:
            assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        assert_close(o, ref_o, 1e-3, "o")
        assert_close(grads["k"], ref_grads["k"], 1e-3, "dk")


def test_recurrent_matches_oracle_and_chunk_decode_split():
    """Step-by-step op equals the oracle; chunk prefill + one-token steps equal one long call."""
    case = make_case(10, 2, 21, 2, 8, 6, gated=True)
    o, s = recurrent_delta_rule(case.q, case.k, case.v, case.beta, g=case.g,
                                initial_state=case.initial_state, output_final_state=True)
    ref_o, ref_s = oracle(case)
    assert_close(o, ref_o, TOL_F32)
    assert_close(s, ref_s, TOL_F32)
    cut = lambda x, a, b: x[:, a:b]
    o1, state = chunk_delta_rule(*(cut(x, 0, 19) for x in (case.q, case.k, case.v, case.beta)),
                                 g=cut(case.g, 0, 19), initial_state=case.initial_state,
                                 output_final_state=True, chunk_size=8)
    outs = [o1]
    for t in (19, 20):
        o_t, state = recurrent_delta_rule(*(cut(x, t, t + 1) for x in (case.q, case.k, case.v,
                                                                        case.beta)),
                                          g=cut(case.g, t, t + 1), initial_state=state,
                                          output_final_state=True)
        outs.append(o_t)
    assert_close(jnp.concatenate(outs, axis=1), ref_o, TOL_F32)
    assert_close(state, ref_s, TOL_F32)
    _, none_state = chunk_delta_rule(case.q, case.k, case.v, case.beta)
    assert none_state is None


def test_input_errors_name_the_problem():
    case = make_case(11, 1, 5, 2, 4, 4)
    args = (case.q, case.k, case.v)
    with pytest.raises(ValueError, match="beta"):
        chunk_delta_rule(*args, case.beta[:, :, :1])
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_delta_rule(*args, case.beta, g=case.g[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_delta_rule(*args, case.beta, initial_state=case.initial_state[..., :2])
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(*args, case.beta, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        chunk_delta_rule(*args, case.beta, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        recurrent_delta_rule(*args, case.beta, impl="triton")
    with pytest.raises(TypeError, match="segment_ids"):
        chunk_delta_rule(*args, case.beta, segment_ids=jnp.zeros((1, 5), jnp.float32))
