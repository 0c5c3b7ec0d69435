"""Delta-rule test helpers (random inputs, the float64 oracle with its gradients) and a check of
the oracle itself against a plain NumPy loop."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernel_utils import assert_close, log_gate, normal, random_segments
from pallas_kernels.delta import chunk_math, delta_rule_reference

INPUT_NAMES = ("q", "k", "v", "beta", "g", "initial_state")


@dataclasses.dataclass
class Case:
    """One call: inputs (None where absent) and cotangents for o and the final state."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    beta: jax.Array
    g: jax.Array | None
    initial_state: jax.Array | None
    segment_ids: jax.Array | None
    do: jax.Array
    ds: jax.Array

    def inputs(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n) for n in INPUT_NAMES if getattr(self, n) is not None}


def make_case(seed: int, B: int, T: int, H: int, K: int, V: int, *, hkv: int | None = None,
              gated: bool = True, segments: bool = False, initial: bool = True,
              dtype=jnp.float32, key_norm: float | None = 1.0) -> Case:
    """Fresh random inputs; keys L2-normalised to ``key_norm`` (None: raw N(0, 1) keys)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    hkv = H if hkv is None else hkv
    k = normal(ks[1], (B, T, hkv, K))
    if key_norm is not None:
        k = key_norm * k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return Case(
        q=normal(ks[0], (B, T, H, K), dtype), k=k.astype(dtype),
        v=normal(ks[2], (B, T, hkv, V), dtype),
        beta=jax.nn.sigmoid(normal(ks[3], (B, T, H))).astype(dtype),
        g=log_gate(ks[4], (B, T, H), -0.7, -0.01).astype(dtype) if gated else None,
        initial_state=normal(ks[5], (B, H, K, V), scale=0.5) if initial else None,
        segment_ids=random_segments(ks[6], B, T) if segments else None,
        do=normal(ks[7], (B, T, H, V)), ds=normal(ks[8], (B, H, K, V)))


def _x64():
    return jax.enable_x64(True)


def oracle(case: Case, *, grads: bool = False):
    """float64 (o, final_state) and, with ``grads``, the dict of input gradients for the
    cotangents (case.do, case.ds)."""
    with _x64():
        f64 = {n: jnp.asarray(np.asarray(x, np.float64)) for n, x in case.inputs().items()}
        H, Hkv = case.q.shape[2], case.k.shape[2]

        def run(inputs):
            k, v = inputs["k"], inputs["v"]
            k, v = jnp.repeat(k, H // Hkv, axis=2), jnp.repeat(v, H // Hkv, axis=2)
            return delta_rule_reference(inputs["q"], k, v, inputs["beta"], inputs.get("g"),
                                        scale=case.q.shape[-1] ** -0.5,
                                        initial_state=inputs.get("initial_state"),
                                        segment_ids=case.segment_ids)

        (o, s), vjp = jax.vjp(run, f64)
        out = (np.asarray(o), np.asarray(s))
        if not grads:
            return out
        cot = (jnp.asarray(np.asarray(case.do, np.float64)),
               jnp.asarray(np.asarray(case.ds, np.float64)))
        return out, {n: np.asarray(x) for n, x in vjp(cot)[0].items()}


def op_outputs_and_grads(fn, case: Case, **kwargs):
    """(o, state) of ``fn(q, k, v, beta, g=..., initial_state=..., output_final_state=True)`` and
    the gradients of <o, do> + <state, ds> with respect to every input present."""
    def run(inputs):
        return fn(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], g=inputs.get("g"),
                  initial_state=inputs.get("initial_state"), segment_ids=case.segment_ids,
                  output_final_state=True, **kwargs)

    @jax.jit  # one compiled program: interpret-mode kernels run op by op when eager
    def outputs_and_grads(inputs, do, ds):
        (o, s), vjp = jax.vjp(run, inputs)
        return (o, s), vjp((do.astype(o.dtype), ds))[0]

    return outputs_and_grads(case.inputs(), case.do, case.ds)


def numpy_delta_rule(q, k, v, beta, g, s0, seg, scale):
    """Literal float64 loop of the recurrence (one batch row and head at a time)."""
    q, k, v, beta, g, s0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, g, s0))
    B, T, H, _ = q.shape
    o = np.zeros(v.shape)
    final = np.zeros(s0.shape)
    for b in range(B):
        for h in range(H):
            S = s0[b, h].copy()
            for t in range(T):
                a = 0.0 if t > 0 and seg[b, t] != seg[b, t - 1] else np.exp(g[b, t, h])
                S = a * S + beta[b, t, h] * np.outer(k[b, t, h], v[b, t, h] - a * k[b, t, h] @ S)
                o[b, t, h] = scale * q[b, t, h] @ S
            final[b, h] = S
    return o, final


def test_oracle_matches_numpy_loop():
    case = make_case(0, 2, 19, 2, 5, 3, segments=True)
    o, s = oracle(case)
    ref_o, ref_s = numpy_delta_rule(case.q, case.k, case.v, case.beta, case.g, case.initial_state,
                                    np.asarray(case.segment_ids), 5 ** -0.5)
    assert_close(o, ref_o, 1e-6)  # rel_err rounds to float32
    assert_close(s, ref_s, 1e-6)  # rel_err rounds to float32


@pytest.mark.parametrize("C", [64, 37, 1])
def test_inverse_is_accurate_for_correlated_keys(C):
    """(I + A)^-1 with A = strictly-lower(β K K^T) for unit keys of pairwise cosine ~0.95: the
    recursive-doubling inverse keeps float32 accuracy (the power series it replaced was off by
    a factor 1e7 here)."""
    rng = np.random.default_rng(C)
    keys = rng.normal(size=(1, 16)) + 0.3 * rng.normal(size=(C, 16))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    a = np.tril(0.9 * keys @ keys.T, -1)
    got = np.asarray(chunk_math.inverse_unit_lower(jnp.asarray(a, jnp.float32)))
    want = np.linalg.inv(np.eye(C) + a)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
