"""Portable Pallas backward kernel of the chunkwise delta rule (CPU interpret mode, Mosaic TPU).

Grid (B, H, N) with the chunks visited in reverse (index maps read chunk N - 1 - n). The
gradient dS of the state leaving the current chunk lives in a [K, V] float32 VMEM scratch,
started from the cotangent of the final state. Per chunk it reads the entering state S0 saved by
the forward, recomputes T, U, W, Δ and applies ``chunk_math.backward``:

    dΔ = (Q K^T ⊙ D)^T dO' + (λ K) dS        (dO' = scale dO)
    dS <- (Γ Q)^T dO' + γ dS - W^T dΔ
    dq, dk, dv, dβ, and db as a column part [C, 1] plus a row part [1, C] (gated calls only)

After chunk 0 the scratch holds the gradient of the initial state.
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.delta import chunk_math
from pallas_kernels.delta.chunking import Layout
from pallas_kernels.delta.fwd_kernel import (F32, SEMANTICS, KernelSpec, chunk_state_spec,
                                             gate_arrays, gate_specs, load_chunk, row_spec,
                                             sequence_spec, state_spec)


def _backward_kernel(*refs, spec: KernelSpec):
    refs = list(refs)
    q, k, v, beta, gates = load_chunk(spec, refs)
    s0_ref, do_ref, ds_final_ref = refs[:3]
    dq_ref, dk_ref, dv_ref, dbeta_ref = refs[3:7]
    db_refs = refs[7:9] if spec.gated else None
    ds0_ref, ds_scr = refs[-2:]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = ds_final_ref[...]

    do = spec.scale * do_ref[...].astype(F32)
    dq, dk, dv, dbeta, db_col, db_row, ds0 = chunk_math.backward(
        q, k, v, beta, gates, s0_ref[...], do, ds_scr[...])
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dbeta_ref[...] = dbeta
    if db_refs is not None:
        db_refs[0][...] = db_col
        db_refs[1][...] = db_row
    ds_scr[...] = ds0

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds0


def backward(spec: KernelSpec, lay: Layout, states: jax.Array, do: jax.Array,
             ds_final: jax.Array):
    """Gradients in kernel layout: (dq, dk, dv [B, H, Tp, *] in q/k/v dtypes, dbeta [B, H, Tp, 1],
    db [B, H, Tp, 1] and db_row [B, H, N, 1, C] (None, None when ungated), ds0 [B, H, K, V]),
    all gate and state gradients float32."""
    B, H, Tp, K = lay.q.shape
    V = lay.v.shape[-1]
    C = spec.chunk
    N = Tp // C
    seq = lambda D: sequence_spec(C, D, True)
    in_specs = [seq(K), seq(K), seq(V)] + gate_specs(spec, reverse=True)
    in_specs += [chunk_state_spec(K, V, True), seq(V), state_spec(K, V)]
    args = [lay.q, lay.k, lay.v] + gate_arrays(lay) + [states, do, ds_final.astype(F32)]
    out_shape = [jax.ShapeDtypeStruct(lay.q.shape, lay.q.dtype),
                 jax.ShapeDtypeStruct(lay.k.shape, lay.k.dtype),
                 jax.ShapeDtypeStruct(lay.v.shape, lay.v.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp, 1), F32)]
    out_specs = [seq(K), seq(K), seq(V), seq(1)]
    if spec.gated:
        out_shape += [jax.ShapeDtypeStruct((B, H, Tp, 1), F32),
                      jax.ShapeDtypeStruct((B, H, N, 1, C), F32)]
        out_specs += [seq(1), row_spec(C, True)]
    out_shape.append(jax.ShapeDtypeStruct((B, H, K, V), F32))
    out_specs.append(state_spec(K, V))
    outs = pl.pallas_call(
        lambda *r: _backward_kernel(*r, spec=spec),
        grid=(B, H, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=spec.interpret,
    )(*args)
    dq, dk, dv, dbeta = outs[:4]
    db, db_row = outs[4:6] if spec.gated else (None, None)
    return dq, dk, dv, dbeta, db, db_row, outs[-1]
