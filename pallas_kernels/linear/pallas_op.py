"""The portable Pallas implementation: layout preparation, custom_vjp over the kernels, and its
registration (``impl="pallas"``).

The custom_vjp covers only the kernels on chunk-layout arrays (q, k, v, cumulative gates b,
initial state); padding, transposes, the chunk-local cumulative sum of the log gates and
g + gk are plain jnp around it, so autodiff turns the kernel's dB into dg / dgk (the reverse
chunk-local cumsum of dB: the standard d(log gate) identity).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.linear import fwd_kernel
from pallas_kernels.linear.layout import (ChunkLayout, prepare_gates, prepare_masks,
                                          to_kernel_time)
from pallas_kernels.linear.reference import total_log_gate

DEFAULT_CHUNK = 64
SUB_CHUNK = 16


def make_layout(chunk_size: int | None, scale: float, per_channel: bool) -> ChunkLayout:
    C = DEFAULT_CHUNK if chunk_size is None else chunk_size
    return ChunkLayout(chunk=C, sub=SUB_CHUNK if C % SUB_CHUNK == 0 else 8, scale=scale,
                       per_channel=per_channel)


def pallas_gated_linear(q, k, v, *, g, gk, scale, initial_state, segment_ids, chunk_size,
                        interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """Same contract as the registry's ``run`` (heads equal); ``interpret`` overrides the
    platform default (e.g. ``pltpu.InterpretParams()`` for TPU interpret mode)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = make_layout(chunk_size, scale, gk is not None)
    Tp = cc.num_chunks(T, lay.chunk) * lay.chunk
    lg = total_log_gate(g, gk, B, T, H, jnp.float32)
    b, b_aux = prepare_gates(lay, lg, B, T, H, Tp)
    masks, run_row = prepare_masks(lay, segment_ids, B, T, Tp)
    s0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    qt, kt, vt = (to_kernel_time(x, Tp) for x in (q, k, v))
    o, final = _chunk_kernels(lay, common.interpret_params() if interpret is None else interpret,
                              qt, kt, vt, b, b_aux, masks, run_row, s0)
    return jnp.swapaxes(o, 1, 2)[:, :T], final


def _chunk_kernels(lay, interpret, q, k, v, b, b_aux, masks, run_row, s0):
    o, final, _ = fwd_kernel.forward(lay, q, k, v, b, b_aux, masks, run_row, s0,
                                     interpret=interpret)
    return o, final


def accepts(q, k, v, *, g, gk, scale, initial_state, segment_ids, chunk_size) -> str | None:
    if common.platform() == "gpu":
        return ("the portable kernel runs on TPU (Mosaic) and CPU (interpret); on GPU it would "
                "need Pallas' deprecated Triton lowering")
    if chunk_size is not None and chunk_size % 8:
        return f"chunk_size must be a multiple of 8 for the Pallas kernel, got {chunk_size}"
    return None
