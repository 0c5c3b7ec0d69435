"""Test cases for the gated linear recurrence: fresh random inputs and a float64 oracle
(the step-by-step scan under x64) with its input gradients."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernel_utils import log_gate, normal, random_segments
from pallas_kernels.linear import chunk_gated_linear_attention, gated_linear_reference

GATES = ("none", "const", "g", "gk", "g+gk")


@dataclasses.dataclass
class Case:
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    gk: jax.Array | None
    initial_state: jax.Array | None
    segment_ids: jax.Array | None
    do: jax.Array
    ds: jax.Array

    def inputs(self) -> dict[str, jax.Array]:
        """The differentiable inputs that are present."""
        names = ("q", "k", "v", "g", "gk", "initial_state")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def make_case(seed: int, *, B: int = 1, T: int, H: int = 2, Hkv: int | None = None, K: int,
              V: int, gate: str = "none", state: bool = False, segments: bool = False,
              dtype=jnp.float32, gk_low: float = -1.0) -> Case:
    ks = jax.random.split(jax.random.key(seed), 9)
    Hkv = H if Hkv is None else Hkv
    g = gk = None
    if gate == "const":
        g = jnp.broadcast_to(jnp.log(1 - 2.0 ** (-5 - jnp.arange(H, dtype=jnp.float32))), (B, T, H))
    elif gate in ("g", "g+gk"):
        g = log_gate(ks[3], (B, T, H), low=-0.5)
    if gate in ("gk", "g+gk"):
        gk = log_gate(ks[4], (B, T, H, K), low=gk_low)
    return Case(
        q=normal(ks[0], (B, T, H, K), dtype), k=normal(ks[1], (B, T, Hkv, K), dtype),
        v=normal(ks[2], (B, T, Hkv, V), dtype), g=g, gk=gk,
        initial_state=normal(ks[5], (B, H, K, V)) if state else None,
        segment_ids=random_segments(ks[6], B, T) if segments else None,
        do=normal(ks[7], (B, T, H, V)), ds=normal(ks[8], (B, H, K, V)))


def _loss_pair(fn, case: Case):
    """(o, final_state) of ``fn(inputs)`` and the gradients of <o, do> + <state, ds>."""
    def run(inputs):
        o, s = fn(inputs)
        return o, s
    (o, s), vjp = jax.vjp(run, case.inputs())
    (grads,) = vjp((case.do.astype(o.dtype), case.ds.astype(s.dtype)))
    return o, s, grads


def oracle(case: Case, *, grads: bool = False):
    """float64 (o, final_state[, grads]) of the step-by-step scan."""
    with jax.enable_x64(True):
        f64 = {n: jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
               for n, x in case.inputs().items()}
        H, Hkv, K = case.q.shape[2], case.k.shape[2], case.q.shape[3]

        def fn(inputs):
            k = jnp.repeat(inputs["k"], H // Hkv, axis=2)
            v = jnp.repeat(inputs["v"], H // Hkv, axis=2)
            return gated_linear_reference(inputs["q"], k, v, g=inputs.get("g"),
                                          gk=inputs.get("gk"), scale=K ** -0.5,
                                          initial_state=inputs.get("initial_state"),
                                          segment_ids=case.segment_ids)
        if not grads:
            o, s = fn(f64)
            return np.asarray(o), np.asarray(s)
        # the op sees do rounded to its output dtype (q's); the oracle gets the same values
        do = np.asarray(jnp.asarray(case.do.astype(case.q.dtype), jnp.float32), np.float64)
        c64 = dataclasses.replace(case, do=jnp.asarray(do),
                                  ds=jnp.asarray(np.asarray(case.ds, np.float64)), **f64)
        o, s, gr = _loss_pair(fn, c64)
        return np.asarray(o), np.asarray(s), {n: np.asarray(x) for n, x in gr.items()}


def run_op(case: Case, impl: str, *, grads: bool = False, chunk_size: int | None = None):
    """The chunk op's (o, final_state[, grads]) on the case."""
    def fn(inputs):
        return chunk_gated_linear_attention(
            inputs["q"], inputs["k"], inputs["v"], g=inputs.get("g"), gk=inputs.get("gk"),
            initial_state=inputs.get("initial_state"), output_final_state=True,
            segment_ids=case.segment_ids, chunk_size=chunk_size, impl=impl)
    if not grads:
        return fn(case.inputs())
    return _loss_pair(jax.jit(fn), case)
