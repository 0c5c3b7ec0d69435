"""Portable Pallas forward kernel of the chunkwise delta rule (CPU interpret mode, Mosaic TPU).

Grid (B, H, N): batch and heads parallel, chunks sequential. The [K, V] float32 state lives in a
VMEM scratch for the whole sweep over one head's chunks. Per chunk (``chunk_math``):

    T = (I + A)^-1 (matmul-only product form),  U = T (β V),  W = T (β Γ K)
    Δ = U - W S,   o = scale (Γ Q S + (Q K^T ⊙ D) Δ),   S <- γ S + (λ K)^T Δ

With ``save_states`` it also writes the state entering every chunk ([B, H, N, K, V] float32),
which the backward kernel reads instead of re-running the recursion.

Blocks (trailing two dims full, or (C, D) with C a multiple of 8, as Mosaic TPU requires):
q/k [C, K], v/o [C, V] of head-major [B, H, Tp, D]; per-step columns (β, b) [C, 1]; b as a row
[1, C]; chunk-local run ids r [C, 1] and [1, C]; states [K, V].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.delta import chunk_math
from pallas_kernels.delta.chunking import Layout

SEMANTICS = ("parallel", "parallel", "arbitrary")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static description of one call (hashable: a custom_vjp nondiff argument)."""
    chunk: int
    scale: float
    gated: bool
    segments: bool
    has_initial: bool
    interpret: Any


def chunk_index(reverse: bool) -> Callable:
    """Chunk visited at grid step n: n, or N - 1 - n for the backward sweep."""
    return (lambda n: pl.num_programs(2) - 1 - n) if reverse else (lambda n: n)


def sequence_spec(C: int, D: int, reverse: bool) -> pl.BlockSpec:
    """[C, D] block of a head-major [B, H, Tp, D] array."""
    at = chunk_index(reverse)
    return pl.BlockSpec((None, None, C, D), lambda b, h, n: (b, h, at(n), 0))


def state_spec(K: int, V: int) -> pl.BlockSpec:
    """The [K, V] block of a [B, H, K, V] state (the same block for every chunk)."""
    return pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))


def chunk_state_spec(K: int, V: int, reverse: bool) -> pl.BlockSpec:
    """The [K, V] block of chunk n of a [B, H, N, K, V] array of per-chunk states."""
    at = chunk_index(reverse)
    return pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, at(n), 0, 0))


def row_spec(C: int, reverse: bool) -> pl.BlockSpec:
    """[1, C] block of chunk n of a per-step scalar laid out as rows [B, H, N, 1, C]."""
    at = chunk_index(reverse)
    return pl.BlockSpec((None, None, None, 1, C), lambda b, h, n: (b, h, at(n), 0, 0))


def gate_specs(spec: KernelSpec, reverse: bool) -> list[pl.BlockSpec]:
    """BlockSpecs of (beta, b, b_row, r_col, r_row), absent ones skipped (``gate_arrays`` order)."""
    C, at = spec.chunk, chunk_index(reverse)
    specs = [sequence_spec(C, 1, reverse)]
    if spec.gated:
        specs += [sequence_spec(C, 1, reverse), row_spec(C, reverse)]
    if spec.segments:
        specs += [pl.BlockSpec((None, C, 1), lambda b, h, n: (b, at(n), 0)),
                  pl.BlockSpec((None, None, 1, C), lambda b, h, n: (b, at(n), 0, 0))]
    return specs


def gate_arrays(lay: Layout) -> list[jax.Array]:
    return [x for x in (lay.beta, lay.b, lay.b_row, lay.r_col, lay.r_row) if x is not None]


def load_chunk(spec: KernelSpec, refs: list) -> tuple[jax.Array, ...]:
    """Pop (q, k, v, beta, gate refs) off the front of ``refs``; return float32 q, k, v, beta and
    the chunk's Gates."""
    take = lambda: refs.pop(0)[...]
    q, k, v, beta = (take().astype(F32) for _ in range(4))
    b = b_row = r_col = r_row = None
    if spec.gated:
        b, b_row = take(), take()
    if spec.segments:
        r_col, r_row = take(), take()
    return q, k, v, beta, chunk_math.Gates(b, b_row, r_col, r_row)


def _forward_kernel(*refs, spec: KernelSpec, save_states: bool):
    refs = list(refs)
    q, k, v, beta, gates = load_chunk(spec, refs)
    s0_ref = refs.pop(0) if spec.has_initial else None
    o_ref, final_ref = refs[:2]
    states_ref = refs[2] if save_states else None
    state_scr = refs[-1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_scr[...] = (s0_ref[...].astype(F32) if s0_ref is not None
                          else jnp.zeros(state_scr.shape, F32))

    s = state_scr[...]
    if save_states:
        states_ref[...] = s
    o, s = chunk_math.apply(chunk_math.prepare(k, v, beta, gates), q, k, s)
    o_ref[...] = (spec.scale * o).astype(o_ref.dtype)
    state_scr[...] = s

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = s


def forward(spec: KernelSpec, lay: Layout, initial_state: jax.Array | None, *,
            save_states: bool = False):
    """(o [B, H, Tp, V] in q's dtype, final state [B, H, K, V] f32, and with ``save_states`` the
    entering state of every chunk [B, H, N, K, V] f32)."""
    B, H, Tp, K = lay.q.shape
    V = lay.v.shape[-1]
    C = spec.chunk
    N = Tp // C
    in_specs = [sequence_spec(C, K, False), sequence_spec(C, K, False), sequence_spec(C, V, False)]
    in_specs += gate_specs(spec, reverse=False)
    args = [lay.q, lay.k, lay.v] + gate_arrays(lay)
    if spec.has_initial:
        in_specs.append(state_spec(K, V))
        args.append(initial_state)
    out_shape = [jax.ShapeDtypeStruct((B, H, Tp, V), lay.q.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), F32)]
    out_specs = [sequence_spec(C, V, False), state_spec(K, V)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), F32))
        out_specs.append(chunk_state_spec(K, V, False))
    return pl.pallas_call(
        lambda *r: _forward_kernel(*r, spec=spec, save_states=save_states),
        grid=(B, H, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=spec.interpret,
    )(*args)
