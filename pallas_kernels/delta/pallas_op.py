"""Portable Pallas path of the delta rule: layout, the custom_vjp over the two kernels.

The layout (head-major transpose, time padding, chunk-local cumulative log gate and its row
copy, run ids) is plain jnp outside the custom_vjp, so autodiff carries the kernels' gradients
of (q, k, v, beta, b, b_row) back to the inputs (b's two parts add up and the chunk cumsum's
adjoint turns them into dg). The forward kernel saves the state entering every chunk; the
backward kernel sweeps the chunks in reverse from them.
"""
from __future__ import annotations

import functools
from typing import Any

import jax

from pallas_kernels import common
from pallas_kernels.delta.bwd_kernel import backward
from pallas_kernels.delta.chunking import Layout, chunk_for, from_head_major, to_layout
from pallas_kernels.delta.fwd_kernel import KernelSpec, forward


def pallas_accepts(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: Any, *,
                   chunk_size: int | None, **_: Any) -> str | None:
    """None when the portable kernel can run this call, else the reason."""
    if common.platform() not in ("cpu", "tpu"):
        return (f"the portable kernel runs on TPU (Mosaic) and CPU (interpret), not "
                f"{common.platform()}; a GPU kernel registers separately")
    C = chunk_for(q.shape[1], chunk_size)
    if C % 8:
        return f"the kernel's chunk must be a multiple of 8, got {C}"
    return None


def pallas_chunk_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                            g: jax.Array | None, *, scale: float,
                            initial_state: jax.Array | None, segment_ids: jax.Array | None,
                            chunk_size: int | None, interpret: Any = None
                            ) -> tuple[jax.Array, jax.Array]:
    """The delta rule through the portable kernels (arguments as in ``op.chunk_delta_rule``, heads
    equal); ``interpret`` overrides the platform default (e.g. ``pltpu.InterpretParams()``)."""
    T = q.shape[1]
    C = chunk_for(T, chunk_size)
    spec = KernelSpec(chunk=C, scale=float(scale), gated=g is not None,
                      segments=segment_ids is not None, has_initial=initial_state is not None,
                      interpret=common.interpret_params() if interpret is None else interpret)
    lay = to_layout(q, k, v, beta, g, segment_ids, C)
    o, final = _delta(spec, lay, initial_state)
    return from_head_major(o, T), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(spec: KernelSpec, lay: Layout, initial_state):
    return tuple(forward(spec, lay, initial_state))


def _delta_fwd(spec, lay, initial_state):
    o, final, states = forward(spec, lay, initial_state, save_states=True)
    return (o, final), (lay, initial_state, states)


def _delta_bwd(spec, residuals, cotangents):
    lay, initial_state, states = residuals
    do, ds_final = cotangents
    dq, dk, dv, dbeta, db, db_row, ds0 = backward(spec, lay, states, do, ds_final)
    d_lay = Layout(dq, dk, dv, dbeta, db, db_row, None, None)
    return d_lay, None if initial_state is None else ds0.astype(initial_state.dtype)


_delta.defvjp(_delta_fwd, _delta_bwd)
