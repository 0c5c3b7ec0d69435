"""Hopper (Mosaic GPU) forward and backward of the scalar-gate chunkwise linear recurrence.

Per batch row and head, state S [K, V] float32, log gate g_t <= 0 per step (or none):

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,        o_t = scale · q_t S_t

Chunks of C = 64 steps are processed in order by one CTA (one warpgroup) per (V block, head,
batch). With b_i = sum_{s <= i in the chunk} g_s (the chunk-local cumulative log gate, <= 0, so
every exponent below is <= 0 and nothing overflows) and S the state entering the chunk:

    A      = (q k^T) ⊙ D,        D_ij = exp(b_i - b_j) for j <= i, else 0        [C, C]
    o      = scale · ( A v + diag(exp(b)) (q S) )                                   [C, Vb]
    S_next = exp(b_{C-1}) S + k^T (diag(exp(b_{C-1} - b)) v)                        [K, Vb]

All four products run on the tensor cores (``wgmma``, bf16 operands from shared memory, float32
accumulators in registers): q k^T and q S (a bf16 copy of S), then A v (A written to shared
memory) and k^T (decayed v) (a transposed view of the k tile). S stays in registers (float32)
across chunks. q, k, v tiles and the chunk's b arrive by TMA, double-buffered, so chunk n+1
loads while chunk n computes; o leaves by TMA.

``reverse`` runs the anti-causal recurrence instead, chunks last to first, R the state
entering a chunk from the later ones:

    o_i    = scale · ( sum_{j >= i} e^{b_j - b_i} (q_i . k_j) v_j + e^{b_{C-1} - b_i} (q_i R) )
    R_prev = e^{b_{C-1}} R + k^T (diag(exp(b)) v)

(the same code with the mask transposed and the two per-row factors swapped).

Backward (``_backward``, a ``jax.custom_vjp``): every input gradient of this recurrence is
itself a causal (dq) or anti-causal (dk, dv) gated linear attention of the same form, so it is
three more runs of this kernel on permuted inputs, dq and dk written in float32; dg follows in
XLA from the cumulative-sum identity. Saved for the backward: q, k, v, g and the
final state (nothing per chunk).

Scope: scalar gate g or none, no per-channel gate, K and V in {64, 128} (the backward runs
swap their roles), bf16 q/k/v, no segment_ids, no initial_state, default chunk;
``mosaic_gpu_accepts`` declines every other call (the op then falls back).

CPU check: ``interpret=plgpu.InterpretGPUParams()`` (jax >= 0.12) runs the kernel on CPU
(see ``pallas_kernels.mosaic_gpu_common``).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.mosaic_gpu_common import (hopper_accepts, pl, plgpu, products as _products,
                                              tiled_smem as _tiled_smem, wgmma_zeros)

CHUNK = 64          # steps per chunk (the wgmma M of one warpgroup)
V_BLOCK = 64        # value columns per CTA: the S block [K, 64] f32 is 32-64 registers a thread
STAGES = 2          # TMA buffering depth of the q, k, v, b tiles
HEAD_DIMS = (64, 128)


def _forward_kernel(num_chunks: int, scale: float, gated: bool, reverse: bool, v_block: int,
                    interpret: bool, q_ref, k_ref, v_ref, b_ref, o_ref, state_ref, q_smem, k_smem, v_smem,
                    bc_smem, br_smem, a_smem, vd_smem, s_smem, o_smem, sf_smem, loaded):
    """One CTA: V block ``vb``, head ``h``, batch row ``bi``; loops over the chunks in order
    (``reverse``: last chunk first, the anti-causal recurrence of the module docstring)."""
    vb, h, bi = (jax.lax.axis_index(n) for n in ("vblock", "heads", "batch"))
    K, C, Vb = q_smem.shape[-1], CHUNK, v_block
    v_cols = pl.ds(vb * Vb, Vb)
    wgmma_layout = plgpu.Layout.WGMMA
    zeros = wgmma_zeros

    chunk_at = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)

    def issue_loads(n, slot):
        rows = pl.ds(chunk_at(n) * C, C)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, h], q_smem.at[slot], loaded.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, h], k_smem.at[slot], loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, h, v_cols], v_smem.at[slot], loaded.at[slot])
        if gated:  # b twice: one buffer per register layout (column, row) it is read in
            for b_smem in (bc_smem, br_smem):
                plgpu.copy_gmem_to_smem(b_ref.at[bi, h, rows], b_smem.at[slot], loaded.at[slot])

    for n in range(min(STAGES, num_chunks)):
        issue_loads(n, n)
    s_smem[...] = zeros(s_smem.shape).astype(s_smem.dtype)
    plgpu.commit_smem()
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=wgmma_layout)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=wgmma_layout)
    causal = row <= col if reverse else row >= col

    def chunk_step(n, state):
        slot = jax.lax.rem(n, STAGES)
        plgpu.barrier_wait(loaded.at[slot])
        q_tile, k_tile, v_tile = q_smem.at[slot], k_smem.at[slot], v_smem.at[slot]
        scores, o = _products((zeros((C, C)), zeros((C, Vb))),
                              ((q_tile, k_tile.transpose((1, 0))), (q_tile, s_smem)), interpret)
        v_val = plgpu.layout_cast(v_tile[...], wgmma_layout).astype(jnp.float32)
        if gated:
            b_col = plgpu.layout_cast(bc_smem[slot], wgmma_layout.reduce(1))
            b_row = plgpu.layout_cast(br_smem[slot], wgmma_layout.reduce(0))
            b_last = bc_smem[slot, C - 1]
            diff = (jax.lax.broadcast_in_dim(b_col, (C, C), [0])
                    - jax.lax.broadcast_in_dim(b_row, (C, C), [1]))
            scores = scores * jnp.exp(jnp.where(causal, -diff if reverse else diff, 0.0))
            reads, writes = jnp.exp(b_col), jnp.exp(b_last - b_col)  # e^{b}, e^{beta - b}
            if reverse:
                reads, writes = writes, reads
            o = o * jax.lax.broadcast_in_dim(scale * reads, (C, Vb), [0])
            v_val = v_val * jax.lax.broadcast_in_dim(writes, (C, Vb), [0])
            state = state * jnp.exp(b_last)
        else:
            o = o * scale
        a_smem[...] = jnp.where(causal, scores * scale, 0.0).astype(a_smem.dtype)
        vd_smem[...] = v_val.astype(vd_smem.dtype)
        plgpu.commit_smem()
        o, state = _products((o, state), ((a_smem, v_tile), (k_tile.transpose((1, 0)), vd_smem)),
                             interpret)

        @pl.when(n + STAGES < num_chunks)  # every read of this slot is done: refill it
        def _():
            issue_loads(n + STAGES, slot)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous o has left o_smem
        o_smem[...] = o.astype(o_smem.dtype)
        s_smem[...] = state.astype(s_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, pl.ds(chunk_at(n) * C, C), h, v_cols])
        return state

    state = jax.lax.fori_loop(0, num_chunks, chunk_step, zeros((K, Vb)))
    sf_smem[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sf_smem, state_ref.at[bi, h, :, v_cols])
    plgpu.wait_smem_to_gmem(0)


def forward_padded(q, k, v, b, *, scale: float, v_block: int = V_BLOCK, interpret: Any = None,
                   out_dtype=None, reverse: bool = False) -> tuple[jax.Array, jax.Array]:
    """The kernel call. q, k [B, Tp, H, K], v [B, Tp, H, V] bf16 with Tp a multiple of CHUNK;
    b [B, H, Tp] float32 chunk-local cumulative log gates, or None (no gate).
    ``reverse``: the anti-causal recurrence (module docstring).
    Returns (o [B, Tp, H, V] in ``out_dtype`` (default q's), final state [B, H, K, V] float32;
    with ``reverse`` the state after the first step, decayed to before it)."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    gated = b is not None
    b = b if gated else jnp.zeros((1, 1, CHUNK), jnp.float32)  # a placeholder never read
    body = functools.partial(_forward_kernel, Tp // CHUNK, scale, gated, reverse, v_block,
                             interpret is not None)
    out_dtype = jnp.dtype(q.dtype if out_dtype is None else out_dtype)
    tile = lambda rows, cols: _tiled_smem((rows, cols), q.dtype)
    o_tile = (tile(CHUNK, v_block) if out_dtype == q.dtype
              else plgpu.SMEM((CHUNK, v_block), out_dtype))
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
                  jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)),
        scratch_types=[
            _tiled_smem((STAGES, CHUNK, K), q.dtype),        # q
            _tiled_smem((STAGES, CHUNK, K), q.dtype),        # k
            _tiled_smem((STAGES, CHUNK, v_block), q.dtype),  # v
            plgpu.SMEM((STAGES, CHUNK), jnp.float32),        # b, read as a column
            plgpu.SMEM((STAGES, CHUNK), jnp.float32),        # b, read as a row
            tile(CHUNK, CHUNK),                              # masked, decayed scores A
            tile(CHUNK, v_block),                            # decayed v
            tile(K, v_block),                                # S in bf16 (for q S)
            o_tile,                                          # o
            plgpu.SMEM((K, v_block), jnp.float32),           # final S
            plgpu.Barrier(num_arrivals=5 if gated else 3, num_barriers=STAGES),
        ],
        grid=(V // v_block, H, B),
        grid_names=("vblock", "heads", "batch"),
        **({} if interpret is None else {"interpret": interpret}),
    )(q, k, v, b)


def _forward(q, k, v, g, scale: float, interpret: Any, out_dtype=None, reverse: bool = False):
    """[B, T, H, *] inputs -> (o [B, T, H, V], final state); pads T to whole chunks (padded
    steps have k = 0 and gate 0, so the state passes through them unchanged; with ``reverse``
    they come first and add nothing)."""
    T = q.shape[1]
    Tp = common.round_up(T, CHUNK)
    pad = lambda x: cc.pad_time(x, Tp)
    b = None
    if g is not None:
        b = cc.chunk_cumsum(jnp.swapaxes(pad(g.astype(jnp.float32)), 1, 2), CHUNK, axis=2)
    o, state = forward_padded(pad(q), pad(k), pad(v), b, scale=scale, interpret=interpret,
                              out_dtype=out_dtype, reverse=reverse)
    return o[:, :T], state


def _backward(q, k, v, g, final_state, do, dstate, scale: float, interpret: Any):
    """dq, dk, dv, dg as three runs of the forward kernel. With G_t = sum_{u <= t} g_u and
    o_t = scale sum_{s <= t} e^{G_t - G_s} (q_t . k_s) v_s, each gradient is itself a causal
    (dq) or anti-causal (dk, dv: the kernel's ``reverse`` mode) gated linear attention:

        dq_t = scale sum_{s <= t} e^{G_t - G_s} (dO_t . v_s) k_s       = F(dO, v, k)
        dk_s = scale sum_{t >= s} e^{G_t - G_s} (dO_t . v_s) q_t       = F_reverse(v, dO, q)
        dv_s = scale sum_{t >= s} e^{G_t - G_s} (q_t . k_s) dO_t       = F_reverse(k, q, dO)

    plus, for a final-state cotangent dS_T, w_s (v_s dS_T^T) on dk and w_s (k_s dS_T) on dv
    with w_s = e^{G_{T-1} - G_s}. dq and dk leave the kernel in float32. The gate gradient uses
    the cumulative-sum identity (XLA, float32): dL/dG_t = q_t . dq_t - k_t . dk_t
    (+ sum(dS_T * S_T) at t = T-1), and dg_s = sum_{t >= s} dL/dG_t for s >= 1; dg_0 = 0
    exactly (g_0 decays only the zero initial state; the sum would leave rounding noise).
    """
    f32 = jnp.float32
    run = lambda a, b, c, dtype, reverse: _forward(a, b, c, g, scale, interpret, dtype,
                                                   reverse)[0]
    with_state = not isinstance(dstate, SymbolicZero)
    dq = run(do, v, k, f32, False)
    dk = run(v, do, q, f32, True)
    dv = run(k, q, do, f32 if with_state else v.dtype, True)
    if with_state:
        w = jnp.ones(q.shape[:3], f32) if g is None else jnp.exp(
            jnp.flip(jnp.cumsum(jnp.flip(g.astype(f32), 1), axis=1), 1) - g.astype(f32))
        hp = jax.lax.Precision.HIGHEST
        dk = dk + w[..., None] * jnp.einsum("bthv,bhkv->bthk", v.astype(f32), dstate, precision=hp)
        dv = dv + w[..., None] * jnp.einsum("bthk,bhkv->bthv", k.astype(f32), dstate, precision=hp)
    dg = None
    if g is not None:
        dG = (jnp.sum(q.astype(f32) * dq, axis=-1) - jnp.sum(k.astype(f32) * dk, axis=-1))
        if with_state:
            dG = dG.at[:, -1].add(jnp.sum(dstate * final_state, axis=(-2, -1)))
        dg = jnp.flip(jnp.cumsum(jnp.flip(dG, 1), axis=1), 1)
        dg = dg.at[:, 0].set(0.0).astype(g.dtype)  # g_0 only decays the zero initial state
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _recurrence(q, k, v, g, scale, interpret):
    return _forward(q, k, v, g, scale, interpret)


def _recurrence_fwd(q, k, v, g, scale, interpret):
    q, k, v, g = jax.tree.map(lambda p: p.value, (q, k, v, g))  # symbolic_zeros wrappers
    o, state = _forward(q, k, v, g, scale, interpret)
    return (o, state), (q, k, v, g, state)


def _recurrence_bwd(scale, interpret, residuals, cotangents):
    """The Mosaic GPU backward (``_backward``); a cotangent that is a symbolic zero costs
    nothing (the usual case for the final state)."""
    q, k, v, g, state = residuals
    do, dstate = cotangents
    do = jnp.zeros(q.shape[:3] + v.shape[-1:], q.dtype) if isinstance(do, SymbolicZero) else do
    return _backward(q, k, v, g, state, do.astype(q.dtype), dstate, scale, interpret)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd, symbolic_zeros=True)


def mosaic_gpu_gated_linear_attention(q, k, v, *, g, gk, scale: float, initial_state,
                                      segment_ids, chunk_size: int | None,
                                      interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """The op through the Hopper kernel (registry contract; call only where
    ``mosaic_gpu_accepts`` returned None). ``interpret``: e.g. ``plgpu.InterpretGPUParams()``
    to run on CPU. Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32)."""
    del gk, initial_state, segment_ids, chunk_size  # declined by mosaic_gpu_accepts
    return _recurrence(q, k, v, g, float(scale), interpret)


def mosaic_gpu_accepts(q, k, v, *, g, gk, initial_state, segment_ids, chunk_size,
                       **_: Any) -> str | None:
    """None when the Hopper kernel runs this call, else the reason it declines."""
    if (reason := hopper_accepts()) is not None:
        return reason
    reasons = [
        (gk is not None, "per-channel gates gk are not supported"),
        (segment_ids is not None, "segment_ids are not supported"),
        (initial_state is not None, "initial_state is not supported"),
        (chunk_size not in (None, CHUNK), f"chunk_size must be None or {CHUNK}"),
        (any(x.dtype != jnp.bfloat16 for x in (q, k, v)), "q, k, v must be bfloat16"),
        (q.shape[-1] not in HEAD_DIMS, f"key dim must be one of {HEAD_DIMS}"),
        (v.shape[-1] not in HEAD_DIMS, f"value dim must be one of {HEAD_DIMS}"),
    ]
    return next((reason for failed, reason in reasons if failed), None)
