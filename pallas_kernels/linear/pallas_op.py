"""The portable Pallas path of the gated linear recurrence: layout, gate terms, custom_vjp.

Inputs [B, T, H, D] become head-major [B, H, Tp, D] (T zero-padded to a multiple of the chunk C:
padded steps have k = 0 and gate 0, so the state passes through them unchanged). The log gate
g + gk is cumulated per chunk here (``chunk_common.gate_terms``) and the custom_vjp is taken
over the kernels' inputs (q, k, v, b, b_row, b_total, S0): XLA's autodiff then carries db back
through the chunk-local cumsum to dg / dgk. The backward recomputes the entering state of every
chunk with the forward kernel (``emit_states``) and runs the reverse kernel.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.linear.chunk_math import ChunkTerms
from pallas_kernels.linear.chunk_xla import head_major_inputs
from pallas_kernels.linear.kernels import KernelSpec, backward, forward

DEFAULT_CHUNK = 64
SUB_BLOCK = 16   # rows per sub-block of a per-channel gate (diagonal blocks are elementwise)
ALIGN = 8        # chunks are multiples of 8 rows (Mosaic TPU sublanes)


def pallas_accepts(q, k, v, *, chunk_size: int | None, **_: Any) -> str | None:
    """None when the portable kernel runs this call, else the reason."""
    if common.platform() not in ("cpu", "tpu"):
        return (f"the portable kernel runs on TPU (Mosaic) and CPU (interpret), not "
                f"{common.platform()}; a GPU kernel registers separately")
    if chunk_size is not None and chunk_size % ALIGN:
        return f"the Pallas kernel needs chunk_size a multiple of {ALIGN}, got {chunk_size}"
    return None


def kernel_chunk(T: int, chunk_size: int | None) -> int:
    """The chunk used for length T: ``chunk_size`` (default 64), or one chunk of T rounded up
    to 8 when that is shorter."""
    size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    return min(size, common.round_up(max(T, 1), ALIGN))


def pallas_gated_linear_attention(q, k, v, *, g, gk, scale: float, initial_state, segment_ids,
                                  chunk_size: int | None, interpret: Any = None
                                  ) -> tuple[jax.Array, jax.Array]:
    """The op through the Pallas kernels (arguments as the registry passes them, heads equal);
    ``interpret`` overrides the platform default (e.g. ``pltpu.InterpretParams()``).
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32)."""
    T = q.shape[1]
    C = kernel_chunk(T, chunk_size)
    (qh, kh, vh), terms = head_major_inputs(q, k, v, g, gk, segment_ids, C)
    gate = "channel" if gk is not None else ("scalar" if g is not None else "none")
    spec = KernelSpec(gate=gate, segments=segment_ids is not None, has_initial=initial_state is not None,
                      chunk=C, sub=SUB_BLOCK if C % SUB_BLOCK == 0 else ALIGN, scale=float(scale),
                      interpret=common.interpret_params() if interpret is None else interpret)
    s0 = None if initial_state is None else initial_state.astype(jnp.float32)
    o, final = _recurrence(spec, qh, kh, vh, *terms, s0)
    return jnp.swapaxes(o[:, :, :T], 1, 2), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(spec: KernelSpec, q, k, v, b, b_row, b_total, r_col, r_row, s0):
    return forward(spec, q, k, v, ChunkTerms(b, b_row, b_total, r_col, r_row), s0)


def _recurrence_fwd(spec, q, k, v, b, b_row, b_total, r_col, r_row, s0):
    out = forward(spec, q, k, v, ChunkTerms(b, b_row, b_total, r_col, r_row), s0)
    return out, (q, k, v, b, b_row, b_total, r_col, r_row, s0)


def _recurrence_bwd(spec, residuals, cotangents):
    """Gradients w.r.t. (q, k, v, b, b_row, b_total, r_col, r_row, s0). b_row is always b laid
    out as rows and b_total b's chunk-last step, so db carries b's direct uses (rows included)
    and db_total all of beta's; autodiff of the layout sums them into the gate gradients."""
    q, k, v, b, b_row, b_total, r_col, r_row, s0 = residuals
    do, dfinal = cotangents
    terms = ChunkTerms(b, b_row, b_total, r_col, r_row)
    states, _ = forward(spec, q, k, v, terms, s0, emit_states=True)
    dq, dk, dv, db, db_total, ds0 = backward(spec, q, k, v, terms, states, do, dfinal)
    zeros_row = None if b_row is None else jnp.zeros_like(b_row)
    return (dq, dk, dv, db, zeros_row, db_total, None, None, None if s0 is None else ds0)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
