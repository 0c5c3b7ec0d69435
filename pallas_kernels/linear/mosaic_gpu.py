"""The scalar-gate linear recurrence on Hopper: forward, sequence split and backward around the
Mosaic GPU walk kernel (``mosaic_gpu_kernel.walk``, whose docstring has the per-chunk math).

    S_t = exp(g_t) S_{t-1} + k_t^T v_t   (S_{-1} = initial state),   o_t = scale · q_t S_t

Sequence split. One CTA walks its chunks in order, so B · H CTAs would leave most of an H100's
132 SMs idle at long T and small B. The sequence is cut into P pieces (``pieces_for``: enough CTAs
to fill the SMs, each piece at least MIN_PIECE_CHUNKS chunks); with Γ_p the total log gate of
piece p and L_p its final state from zero (a ``states_only`` pass: reads k, v, g only),

    S_in(0) = initial state,      S_in(p + 1) = e^{Γ_p} S_in(p) + L_p        (XLA, P ≤ 8 steps)

and a second pass walks every piece from S_in(p) and writes o; its last piece's final state is
the op's. The anti-causal (``reverse``) runs combine the same way from the last piece down.

Backward (``_backward``, a ``jax.custom_vjp``): with G_t = sum_{u <= t} g_u every input
gradient is itself a causal (dq) or anti-causal (dk, dv) gated linear attention of the same
form, so it is three more walks on permuted inputs:

    dq_t = scale sum_{s <= t} e^{G_t - G_s} (dO_t . v_s) k_s + scale e^{G_t} dO_t S0^T
         = F(dO, v, k; initial state S0^T)
    dk_s = scale sum_{t >= s} e^{G_t - G_s} (dO_t . v_s) q_t + e^{G_{T-1} - G_s} v_s dS_T^T
         = F_reverse(v, dO, q; carry dS_T^T / scale)
    dv_s = F_reverse(k, q, dO; carry dS_T / scale),   whose "final" state R gives
    dS0  = scale · R = scale sum_t e^{G_t} q_t^T dO_t + e^{G_{T-1}} dS_T.

dq and dk leave the kernel in float32. The gate gradient follows in XLA from the cumulative-sum
identity: dL/dG_t = q_t . dq_t - k_t . dk_t (+ sum(dS_T ⊙ S_T) at t = T-1), and
dg_s = sum_{t >= s} dL/dG_t; without an initial state dg_0 = 0 exactly (g_0 then decays only
zeros; the sum would leave rounding noise). Saved for the backward: q, k, v, g and the initial
state (nothing per chunk).

Accuracy of the gate gradient. The identity cancels nearly equal terms and sums them over the
whole sequence, so dq and dk must be close to float32-exact. The walks' inputs are exact bf16
(k, q, dO, v), but three float32 values go to the tensor cores rounded to bf16: the carried
state S (in x S), the decayed scores A (in A z) and the decayed z (in the state update). With
the dq and dk walks in plain bf16, dg was off by 5.6e-3 (T = 1000) to 1.9e-2 (T = 2000)
relative to the float64 oracle in interpret mode, growing with T (3.2e-2 at T = 16384 on the
H100); splitting only S and the decayed z still left 1.2e-3 (T = 2000). So when the caller
gives a gate, these two walks run ``precise`` (``mosaic_gpu_kernel``): each of the three
operands as bf16 hi + lo parts (hi + lo = x to ~2^-16), three more wgmmas per chunk (7
instead of 4) in two of the three backward walks. dg then matches the oracle to ~1e-5 (dq,
dk, dv ~2e-3: the bf16 rounding of the outputs). S_T in the dL/dG_{T-1} term is the dq walk's
final state (its S^T, accumulated precisely), not the forward's. The forward and the dv walk
stay plain bf16, and so do all walks without a caller's gate (no dg wanted; segment resets
alone are gates whose gradient nobody reads).

Segment resets (packed documents) are gates of -80 at segment starts
(``mosaic_gpu_gated_linear_attention``).

Scope: scalar gate g or none, no per-channel gate, K and V in {64, 128} (the backward runs
swap their roles), bf16 q/k/v, default chunk; ``mosaic_gpu_accepts`` declines
every other call (the op then falls back).

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
from pallas_kernels.linear.mosaic_gpu_kernel import CHUNK, HEAD_DIMS, V_BLOCK, walk
from pallas_kernels.mosaic_gpu_common import hopper_accepts, num_sms, piece_starts

MIN_PIECE_CHUNKS = 16   # a piece shorter than this costs more in its extra state pass than it wins
MAX_PIECES = 8
WARPGROUPS_PER_CTA = 2  # V blocks of 64 sharing one CTA's q/k tiles (1: one CTA per V block)
RESET_LOG_GATE = -80.0  # the log gate standing for a segment start: e^-80 ~ 2e-35


def _groups(value_dim: int) -> int:
    return min(WARPGROUPS_PER_CTA, value_dim // V_BLOCK)


def pieces_for(ctas: int, num_chunks: int) -> int:
    """Pieces per sequence: doubled while ``ctas`` (per piece) · P stays within the SM count
    and each piece keeps at least MIN_PIECE_CHUNKS chunks (1 for the B·T = 32k, H = 16,
    T <= 4k benchmark)."""
    pieces, sms = 1, num_sms()
    while (pieces < MAX_PIECES and ctas * 2 * pieces <= sms
           and num_chunks // (2 * pieces) >= MIN_PIECE_CHUNKS):
        pieces *= 2
    return pieces


def _forward(q, k, v, g, s0, scale: float, interpret: Any, out_dtype=None,
             reverse: bool = False, precise: bool = False, pieces: int | None = None):
    """[B, T, H, *] inputs -> (o [B, T, H, V], final state [B, H, K, V] float32). ``s0``: the
    initial state (``reverse``: the carry from beyond the last step) or None. Pads T to whole
    pieces of chunks (padded steps have k = 0 and gate 0, so states pass through them
    unchanged; with ``reverse`` they come first and add nothing)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    groups = _groups(V)
    P = pieces or pieces_for(B * H * V // (V_BLOCK * groups), -(-T // CHUNK))
    Tp = common.round_up(T, CHUNK * P)
    pad = lambda x: cc.pad_time(x, Tp)
    q, k, v = pad(q), pad(k), pad(v)
    b = gamma = None
    if g is not None:
        gp = pad(g.astype(jnp.float32))
        b = cc.chunk_cumsum(jnp.swapaxes(gp, 1, 2), CHUNK, axis=2)
        gamma = jnp.sum(gp.reshape(B, P, Tp // P, H), axis=2)
    run = functools.partial(walk, scale=scale, pieces=P, reverse=reverse, precise=precise,
                            groups=groups, interpret=interpret)
    if P > 1:
        _, local = run(None, k, v, b, None, states_only=True)
        gamma = jnp.zeros((B, P, H), jnp.float32) if gamma is None else gamma
        decay = jnp.exp(gamma)[..., None, None]
        starts = piece_starts(local.reshape(B, P, H, K, V), s0, reverse,
                              lambda p, carry: decay[:, p] * carry)
        s_in = starts.reshape(B * P, H, K, V)
    else:
        s_in = None if s0 is None else s0.astype(jnp.float32)
    o, finals = run(q, k, v, b, s_in, out_dtype=out_dtype)
    final = finals.reshape(B, P, H, K, V)[:, 0 if reverse else P - 1]
    return o[:, :T], final


def _backward(q, k, v, g, s0, do, dstate, scale: float, interpret: Any, gate_grad: bool):
    """dq, dk, dv, dg, ds0 as three walks (module docstring); ``gate_grad``: g is the caller's
    gate (not only segment resets), so dg is wanted and the dq and dk walks run precise."""
    f32 = jnp.float32
    swap = lambda s: jnp.swapaxes(s, -1, -2)
    run = lambda a, b, c, carry, dtype, reverse, precise: _forward(
        a, b, c, g, carry, scale, interpret, dtype, reverse, precise)
    with_state = not isinstance(dstate, SymbolicZero)
    carry = dstate.astype(f32) / scale if with_state else None
    precise = gate_grad and g is not None  # only dg needs the dq and dk walks float32-exact
    dq, final_t = run(do, v, k, None if s0 is None else swap(s0), f32, False, precise)
    dk, _ = run(v, do, q, None if carry is None else swap(carry), f32, True, precise)
    dv, r = run(k, q, do, carry, f32 if with_state else v.dtype, True, False)
    ds0 = None if s0 is None else (scale * r).astype(s0.dtype)
    dg = None
    if g is not None:
        dG = jnp.sum(q.astype(f32) * dq, axis=-1) - jnp.sum(k.astype(f32) * dk, axis=-1)
        if with_state:
            dG = dG.at[:, -1].add(jnp.sum(dstate * swap(final_t), axis=(-2, -1)))
        dg = jnp.flip(jnp.cumsum(jnp.flip(dG, 1), axis=1), 1)
        if s0 is None:
            dg = dg.at[:, 0].set(0.0)  # g_0 only decays the zero initial state
        dg = dg.astype(g.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _recurrence(q, k, v, g, s0, scale, interpret, gate_grad):
    return _forward(q, k, v, g, s0, scale, interpret)


def _recurrence_fwd(q, k, v, g, s0, scale, interpret, gate_grad):
    q, k, v, g, s0 = jax.tree.map(lambda p: p.value, (q, k, v, g, s0))  # symbolic_zeros wrappers
    return _forward(q, k, v, g, s0, scale, interpret), (q, k, v, g, s0)


def _recurrence_bwd(scale, interpret, gate_grad, residuals, cotangents):
    """The Mosaic GPU backward (``_backward``); a cotangent that is a symbolic zero costs
    nothing (the usual case for the final state)."""
    q, k, v, g, s0 = residuals
    do, dstate = cotangents
    do = jnp.zeros(q.shape[:3] + v.shape[-1:], q.dtype) if isinstance(do, SymbolicZero) else do
    return _backward(q, k, v, g, s0, do.astype(q.dtype), dstate, scale, interpret, gate_grad)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd, symbolic_zeros=True)


def mosaic_gpu_gated_linear_attention(q, k, v, *, g, gk, scale: float, initial_state,
                                      segment_ids, chunk_size: int | None,
                                      interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """The op through the Hopper kernel (registry contract; call only where
    ``mosaic_gpu_accepts`` returned None). ``interpret``: e.g. ``plgpu.InterpretGPUParams()``
    to run on CPU. Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32).

    Segment resets become log gates: the gate of a step that starts a segment is replaced by
    RESET_LOG_GATE, so everything before it decays by e^-80 (below float32 resolution of
    any sum it joins) and the chunk-local cumulative gates stay finite; the gradient of the
    replaced gates is exactly zero (they never reach the output)."""
    del gk, chunk_size  # declined by mosaic_gpu_accepts
    gate_grad = g is not None  # else g below holds only resets, whose gradient nobody reads
    if segment_ids is not None:
        B, T, H = q.shape[:3]
        starts = cc.segment_starts(segment_ids, B, T)[..., None]
        g = jnp.where(starts, RESET_LOG_GATE, jnp.zeros((B, T, H), jnp.float32) if g is None
                      else g)
    return _recurrence(q, k, v, g, initial_state, float(scale), interpret, gate_grad)


def mosaic_gpu_accepts(q, k, v, *, g, gk, initial_state, segment_ids, chunk_size,
                       **_: Any) -> str | None:
    """None when the Hopper kernel runs this call, else the reason it declines."""
    if (reason := hopper_accepts()) is not None:
        return reason
    reasons = [
        (gk is not None, "per-channel gates gk are not supported"),
        (chunk_size not in (None, CHUNK), f"chunk_size must be None or {CHUNK}"),
        (any(x.dtype != jnp.bfloat16 for x in (q, k, v)), "q, k, v must be bfloat16"),
        (q.shape[-1] not in HEAD_DIMS, f"key dim must be one of {HEAD_DIMS}"),
        (v.shape[-1] not in HEAD_DIMS, f"value dim must be one of {HEAD_DIMS}"),
    ]
    return next((reason for failed, reason in reasons if failed), None)
