"""Portable Pallas kernels of the gated linear recurrence (CPU interpret mode, Mosaic TPU).

Grid (B, H, N): batch and heads parallel, chunks sequential. The [K, V] float32 state lives in a
VMEM scratch for the whole sweep over a head's chunks; HBM sees only the chunk inputs/outputs.

  * ``forward``: chunks in order. Per chunk: o = scale * chunk_output(q, k, v, S) and
    S <- decay * S + U (``chunk_math``). It can also write the state *entering* every chunk
    (``emit_states``) instead of o: the backward's recomputation pass, [B, H, N, K, V] float32
    (1/C of a [T, K, V] buffer), so the forward itself stores no per-chunk state.
  * ``backward``: chunks in reverse (the index maps read chunk N-1-n). Per chunk it loads the
    recomputed entering state, takes dS (gradient of the leaving state) from the scratch,
    writes dq, dk, dv, db, db_total and leaves dS0 in the scratch.

Blocks: q/k/v/o [C, D] of head-major [B, H, Tp, D]; per-step gate columns [C, X]; rows
[1, C]; states [K, V]: the trailing two dims of every block are either full or (C, D) with C a
multiple of 8, as Mosaic TPU requires.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear.chunk_math import ChunkTerms, apply_transition, chunk_backward, chunk_output, chunk_transition

_SEMANTICS = ("parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static description of one call (hashable: it keys the custom_vjp and jit caches)."""
    gate: str                # "none" | "scalar" | "channel"
    segments: bool
    has_initial: bool
    chunk: int
    sub: int
    scale: float
    interpret: Any


def _term_specs(spec: KernelSpec, K: int, reverse: bool) -> list[pl.BlockSpec]:
    """BlockSpecs of the gate/segment inputs in ChunkTerms order (absent ones skipped)."""
    C = spec.chunk
    X = K if spec.gate == "channel" else 1

    def at(n):  # chunk visited at grid step n
        return (pl.num_programs(2) - 1 - n) if reverse else n

    specs = []
    if spec.gate != "none":
        specs.append(pl.BlockSpec((None, None, C, X), lambda b, h, n: (b, h, at(n), 0)))
        if spec.gate == "scalar":
            specs.append(pl.BlockSpec((None, None, None, 1, C), lambda b, h, n: (b, h, at(n), 0, 0)))
        specs.append(pl.BlockSpec((None, None, None, X, 1), lambda b, h, n: (b, h, at(n), 0, 0)))
    if spec.segments:
        specs.append(pl.BlockSpec((None, C, 1), lambda b, h, n: (b, at(n), 0)))
        specs.append(pl.BlockSpec((None, None, 1, C), lambda b, h, n: (b, at(n), 0, 0)))
    return specs


def _seq_spec(C: int, D: int, reverse: bool) -> pl.BlockSpec:
    if reverse:
        return pl.BlockSpec((None, None, C, D), lambda b, h, n: (b, h, pl.num_programs(2) - 1 - n, 0))
    return pl.BlockSpec((None, None, C, D), lambda b, h, n: (b, h, n, 0))


def _state_spec(K: int, V: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))


def _chunk_state_spec(K: int, V: int, reverse: bool) -> pl.BlockSpec:
    if reverse:
        return pl.BlockSpec((None, None, None, K, V),
                            lambda b, h, n: (b, h, pl.num_programs(2) - 1 - n, 0, 0))
    return pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))


def _read_terms(spec: KernelSpec, refs: list) -> ChunkTerms:
    """Pop the gate/segment refs (ChunkTerms order) off the front of ``refs`` and load them."""
    take = lambda: refs.pop(0)[...]
    b = b_row = b_total = r_col = r_row = None
    if spec.gate != "none":
        b = take()
        b_row = take() if spec.gate == "scalar" else None
        b_total = take()
    if spec.segments:
        r_col, r_row = take(), take()
    return ChunkTerms(b, b_row, b_total, r_col, r_row)


def _term_arrays(terms: ChunkTerms) -> list[jax.Array]:
    return [x for x in terms if x is not None]


def _forward_kernel(*refs, spec: KernelSpec, emit_states: bool):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    del refs[:3]
    terms = _read_terms(spec, refs)
    s0_ref = refs.pop(0) if spec.has_initial else None
    out_ref, final_ref, state_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_scr[...] = (s0_ref[...].astype(jnp.float32) if s0_ref is not None
                          else jnp.zeros(state_scr.shape, jnp.float32))

    S = state_scr[...]
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    if emit_states:
        out_ref[...] = S
    else:
        out_ref[...] = (spec.scale * chunk_output(q, k, v, S, terms, spec.sub)).astype(out_ref.dtype)
    S = apply_transition(S, *chunk_transition(k, v, terms))
    state_scr[...] = S

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = S


def forward(spec: KernelSpec, q, k, v, terms: ChunkTerms, initial_state, *, emit_states: bool = False):
    """(o [B, H, Tp, V] in v's dtype, or entering states [B, H, N, K, V] f32; final state f32)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    C = spec.chunk
    N = Tp // C
    in_specs = [_seq_spec(C, K, False), _seq_spec(C, K, False), _seq_spec(C, V, False)]
    in_specs += _term_specs(spec, K, reverse=False)
    args = [q, k, v] + _term_arrays(terms)
    if spec.has_initial:
        in_specs.append(_state_spec(K, V))
        args.append(initial_state)
    if emit_states:
        first = (jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32), _chunk_state_spec(K, V, False))
    else:
        first = (jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype), _seq_spec(C, V, False))
    out_shape = (first[0], jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))
    return pl.pallas_call(
        lambda *r: _forward_kernel(*r, spec=spec, emit_states=emit_states),
        grid=(B, H, N), in_specs=in_specs, out_specs=(first[1], _state_spec(K, V)),
        out_shape=out_shape, scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=spec.interpret,
    )(*args)


def _backward_kernel(*refs, spec: KernelSpec):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    del refs[:3]
    terms = _read_terms(spec, refs)
    states_ref, do_ref, dfinal_ref = refs[:3]
    del refs[:3]
    dq_ref, dk_ref, dv_ref = refs[:3]
    del refs[:3]
    if spec.gate != "none":
        db_ref, dbt_ref = refs[:2]
        del refs[:2]
    ds0_ref, ds_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dfinal_ref[...]

    do = do_ref[...].astype(jnp.float32) * spec.scale
    dq, dk, dv, db, dbt, dS0 = chunk_backward(q_ref[...], k_ref[...], v_ref[...], do, states_ref[...],
                                              ds_scr[...], terms, spec.sub)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if spec.gate != "none":
        db_ref[...] = db
        dbt_ref[...] = dbt
    ds_scr[...] = dS0

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dS0


def backward(spec: KernelSpec, q, k, v, terms: ChunkTerms, states, do, dfinal):
    """(dq, dk, dv in the input dtypes, db [B, H, Tp, X] and db_total [B, H, N, X, 1] float32
    (None without a gate), dS0 [B, H, K, V] float32); ``states`` from ``forward(emit_states)``."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    C = spec.chunk
    N = Tp // C
    X = K if spec.gate == "channel" else 1
    in_specs = [_seq_spec(C, K, True), _seq_spec(C, K, True), _seq_spec(C, V, True)]
    in_specs += _term_specs(spec, K, reverse=True)
    in_specs += [_chunk_state_spec(K, V, True), _seq_spec(C, V, True), _state_spec(K, V)]
    args = [q, k, v] + _term_arrays(terms) + [states, do, dfinal.astype(jnp.float32)]
    out_specs = [_seq_spec(C, K, True), _seq_spec(C, K, True), _seq_spec(C, V, True)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if spec.gate != "none":
        out_specs += [_seq_spec(C, X, True), _chunk_state_spec(X, 1, True)]
        out_shape += [jax.ShapeDtypeStruct((B, H, Tp, X), jnp.float32),
                      jax.ShapeDtypeStruct((B, H, N, X, 1), jnp.float32)]
    out_specs.append(_state_spec(K, V))
    out_shape.append(jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))
    outs = pl.pallas_call(
        lambda *r: _backward_kernel(*r, spec=spec),
        grid=(B, H, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=spec.interpret,
    )(*args)
    if spec.gate == "none":
        dq, dk, dv, dS0 = outs
        return dq, dk, dv, None, None, dS0
    return tuple(outs)
