"""The per-channel-gate (GLA) linear recurrence on Hopper: forward and backward around the Mosaic
GPU walk kernel (``mosaic_gpu_gk_kernel.gk_walk``), the chunk-parallel prepass kernel of the
forward (``mosaic_gpu_gk_prepass``) and its pullback kernel in the backward
(``mosaic_gpu_gk_pullback``); the prepass's docstring states the per-chunk math.

    S_t = diag(e^{lg_t}) S_{t-1} + k_t^T v_t,   o_t = scale · q_t S_t,   lg = gk (+ g per head)

Forward: a chunk-parallel Mosaic GPU kernel (``mosaic_gpu_gk_prepass``, one CTA per chunk and
head) makes, from the raw log gates lg, q~ = scale q e^{b}, k^ = k e^{b_last - b} and the
intra-chunk scores A in bf16 and the state decays d = e^{b_last} in float32 (b, the chunk-local
cumulative sums of lg, never leave the kernel: every exponent is an interval sum of lg on the
tensor cores); one walk gives o_n = q~_n S_n + A_n v_n and S_{n+1} = d_n ⊙_rows S_n + k^_n^T v_n.
The prepass (and the backward's pullback) runs in one of three forms for the whole call
(``gate_bounds``, one XLA pass over lg): with one anchor per 32-row block where every block's
gates sum to >= -60 ("bounded"), by the bisection ("exact"), or checking per chunk
("per_chunk"); the prepass's docstring has the forms and their measured costs.

Why a prepass (design option 1) rather than the gating fused into the walk (option 2): the
numerically safe intra-chunk scores need an anchor per bisection level (log2(C) = 6 more
exponentials per element of q and k and more small products per chunk;
``mosaic_gpu_gk_prepass``), which would sit on the walk's sequential critical path, while the
prepass is chunk-parallel. Its cost is HBM traffic; per token and head (K = V = 128): the
prepass reads q, k (512 B) and lg (512 B) and writes q~, k^ (512 B) and A (128 B); the walk
reads q~, k^, v, A (896 B) and writes o (256 B): about 2.8 KB, 1.5 GB at the B=8, T=4096, H=16
anchor, ~0.55 ms at 2.7 TB/s (gk itself arrives as float32; with g or segments XLA first writes
lg = gk + g, 1 KB more).

Backward (``_backward``, a ``jax.custom_vjp``). With S_n the state entering chunk n and dS_n
the cotangent of that state (dS_N = the final state's cotangent):

    dS_n  = d_n ⊙_rows dS_{n+1} + q~_n^T dO_n
    dq~_n = dO_n S_n^T                     walk: x = dO, y = v, z = k^, d on S^T's columns
    dk^_n = v_n dS_{n+1}^T                 reverse walk: x = v, y = dO, z = q~, d on columns
    dv_n  = A_n^T dO_n + k^_n dS_{n+1}     reverse walk: x = k^, y = q~, z = dO, A^T, d on rows
    dA_n  = dO_n v_n^T (its upper triangle unused)         in the pullback kernel

and the initial state's cotangent is the dv walk's final state dS_0. dq and dk then come from
the pullback of the prepass at the cotangents (dq~, dk^, dA), with the gates held fixed: a
chunk-parallel Mosaic GPU kernel (``mosaic_gpu_gk_pullback``, the same bisection levels as the
prepass, hi + lo operands; its docstring counts the work), in the prepass's form for the call
(``gate_bounds``). The walks take q~ and k^ as bf16
hi + lo parts from the prepass's first two exponent tiles (``gk_decays``, a Mosaic GPU kernel:
in h200_2026-12-06_s10_call1's profile at the anchor below, XLA's chunk-local cumsum took
0.46 ms and the fusions that look like the exponentials and split 0.39), and the dv walk the
forward prepass kernel's A, saved as a residual (bf16 [B, H, Tp, 64]: 128 B per step and head,
half of q's size at K = 128; rerunning the prepass instead would cost ~0.73 ms at the anchor).
The pullback used to be ``jax.vjp`` of the prepass's float32 XLA form (now the tests'
reference): on the H100 at the B=8, T=4096, H=16, K=V=128 anchor the kernel took the op's
forward+backward from 12.85 to 8.67 ms (h100_2026-12-06_s9_call1, same run, jla 4.18).

The gate gradient uses the cumulative-sum identity per channel, with
G_t = sum_{u <= t} lg_u:

    dL/dG_t = q_t ⊙ dq_t - k_t ⊙ dk_t  (+ rowsum(dS_T ⊙ S_T) at t = T - 1),
    dlg_s   = sum_{t >= s} dL/dG_t,    dlg_0 = 0 exactly without an initial state,

the sums within each chunk in the pullback kernel (L, from float32 dq and dk), the suffix of
later chunks' totals in XLA (``_gate_gradient``), and dgk = dlg, dg = sum_K dlg through XLA's
autodiff of lg = gk + g.

Accuracy of the gate gradient. The identity subtracts nearly equal terms and sums them over the
whole sequence, so dq and dk (in float32 until the end) must be close to float32-exact. With the
dq and dk walks in plain bf16 (q~ / k^ and the state rounded for the tensor cores), dgk was off
by 1.5e-2 (T = 100) to 2.9e-2 (T = 1000) relative to the float64 oracle, dg by 1.8e-2 (emulated
in float32 outside the kernel); so these two walks get the rounded operand as hi + lo bf16 parts
(``z_lo``, from ``gk_decays``) and read their state as hi + lo
(``split_state``): two more wgmmas per chunk. S_T in the dL/dG_{T-1} term is the dq walk's final
state (accumulated from hi + lo k^), not the forward's. Then dg and dgk match the oracle to
3e-5..1.6e-4 in the tests (the most with strong gates and resets; dq, dk, dv ~2e-3, the bf16
rounding of the outputs). Saved between forward
and backward: q, k, v, lg, the initial state, the forward's scores A (bf16) and its form (a
scalar); fla 0.6.0's
chunk_gla saves q, k, v, its gates and, in float32, their chunk-local cumulative sums [B, T, H,
K] and A [B, T, H, 64] (``ctx.save_for_backward``): more than here.

Sequence split. One CTA walks its chunks in order, so B · H CTAs would leave most of an
H100's 132 SMs idle at long T and small B; as in the scalar-gate kernel (``mosaic_gpu.pieces_for``
chooses P), every walk is cut into P pieces of whole chunks: a ``states_only`` pass gives each
piece's final state L_p from zero (reads y, z only), XLA carries
S_in(p + 1) = Γ_p ⊙ S_in(p) + L_p with Γ_p the product of the piece's decays d (per channel,
on the same axis as d), and the walk runs every piece from its S_in (reverse walks from the
last piece down). Costs one extra read of y and z per walk; buys P times the CTAs.

Segment resets (packed documents) are log gates of -80 on every channel at segment starts, as
in the scalar-gate kernel (``mosaic_gpu.RESET_LOG_GATE``).

Scope: gk given (with or without g), bf16 q/k/v, K and V in {64, 128} (the backward walks swap
their roles), default chunk; ``mosaic_gpu_gk_accepts`` declines every other call (the op then
falls back.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.linear.mosaic_gpu import RESET_LOG_GATE, pieces_for
from pallas_kernels.linear.mosaic_gpu_gk_kernel import CHUNK, HEAD_DIMS, gk_walk
from pallas_kernels.linear.mosaic_gpu_gk_prepass import gk_decays, gk_prepass
from pallas_kernels.linear import mosaic_gpu_gk_prepass as prepass
from pallas_kernels.linear.mosaic_gpu_gk_pullback import gk_pullback
from pallas_kernels.mosaic_gpu_common import (hopper_accepts, piece_starts,
                                              transposes_swizzled_tiles)

F32 = jnp.float32
# the share of bounded (chunk, head) pairs from which the per-chunk prepass beats the static
# bisection: break-even 0.41 .. 0.61 from the anchor's forward times (s13_call3 / call4: per-chunk
# 0.695 / 0.686 ms all bounded, 1.091 / 1.313 none; static bisection 0.930)
BOUNDED_SHARE = 0.5
# None: each call's form from ``gate_bounds``; "per_chunk" or "exact" (both valid for any
# gates): that form always, with no choice in XLA (read at trace time; the benchmark's variants)
FIXED_FORM: str | None = None


def _num_pieces(q: jax.Array) -> int:
    """Pieces of the sequence split for q [B, T, H, K] (``mosaic_gpu.pieces_for``: B · H CTAs
    per piece, whatever the walk's V blocks)."""
    B, T, H, _ = q.shape
    return pieces_for(B * H, -(-T // CHUNK))


def _pad(T: int, pieces: int, *xs):
    Tp = common.round_up(T, CHUNK * pieces)
    return [None if x is None else cc.pad_time(x, Tp) for x in xs]


def _walk_pieces(x, y, z, a, d, s0, *, pieces: int, reverse: bool = False, decay_axis: int = 0,
          z_lo=None, interpret: Any, **options) -> tuple[jax.Array, jax.Array]:
    """``gk_walk`` over the whole sequence with the split into ``pieces`` (module docstring):
    returns (out, the final state [B, H, Dk, Dv] of the whole walk)."""
    B, _, H, Dk = y.shape
    Dv = z.shape[-1]
    run = functools.partial(gk_walk, reverse=reverse, decay_axis=decay_axis, pieces=pieces,
                            z_lo=z_lo, interpret=interpret)
    s_in = s0
    if pieces > 1:
        _, local = run(None, y, z, None, d, None, states_only=True)
        gamma = jnp.prod(d.reshape(B, H, pieces, -1, d.shape[-1]), axis=3)
        gamma = jnp.swapaxes(gamma, 1, 2)  # [B, P, H, D]
        decay = gamma[..., :, None] if decay_axis == 0 else gamma[..., None, :]
        starts = piece_starts(local.reshape(B, pieces, H, Dk, Dv), s0, reverse,
                              lambda p, carry: decay[:, p] * carry)
        s_in = starts.reshape(B * pieces, H, Dk, Dv)
    out, finals = run(x, y, z, a, d, s_in, **options)
    return out, finals.reshape(B, pieces, H, Dk, Dv)[:, 0 if reverse else pieces - 1]


def gate_bounds(lg: jax.Array) -> jax.Array:
    """The padded log gates lg [B, Tp, H, K] -> the kernels' form for the call, an int32 index
    into the prepass's ``FORMS``. With s_b the sum of lg over diagonal block b (DIAGONAL_BLOCK
    rows) on one channel: "bounded" where min s_b >= -BOUNDED_DECAY everywhere, "per_chunk"
    where at least BOUNDED_SHARE of the (chunk, head) pairs are, else "exact" (one pass over lg
    in XLA)."""
    B, Tp, H, K = lg.shape
    block = prepass.DIAGONAL_BLOCK
    sums = jnp.sum(lg.reshape(B, Tp // CHUNK, CHUNK // block, block, H, K), axis=3)
    chunk_least = jnp.min(sums, axis=(2, 4))   # [B, N, H]
    least = jnp.min(chunk_least)
    share = jnp.mean((chunk_least >= -prepass.BOUNDED_DECAY).astype(F32))
    return jnp.where(least >= -prepass.BOUNDED_DECAY, 0, jnp.where(share >= BOUNDED_SHARE, 1, 2))


def _fixed_form() -> int:
    if FIXED_FORM not in ("per_chunk", "exact"):
        raise ValueError(f"FIXED_FORM={FIXED_FORM!r}: None, 'per_chunk' or 'exact'")
    return prepass.FORMS.index(FIXED_FORM)


def _in_form(form: jax.Array, kernels: list, *args) -> Any:
    """``kernels[form](*args)``: by ``lax.switch`` on the call's form, or the FIXED_FORM one."""
    if FIXED_FORM is None:
        return jax.lax.switch(form, kernels, *args)
    return kernels[_fixed_form()](*args)


def _forward(q, k, v, lg, s0, scale: float, interpret: Any):
    """[B, T, H, *] inputs -> (o [B, T, H, V] in q's dtype, final state [B, H, K, V] f32,
    the scores A [B, H, Tp, CHUNK] bf16 of the padded sequence, the form of the prepass and
    pullback kernels for this call: an int32 index into FORMS, ``gate_bounds``)."""
    T, dt, P = q.shape[1], q.dtype, _num_pieces(q)
    q, k, v, lg = _pad(T, P, q, k, v, lg)
    form = gate_bounds(lg) if FIXED_FORM is None else jnp.int32(_fixed_form())
    run = lambda f: functools.partial(gk_prepass, scale=scale, form=f, interpret=interpret)
    q_t, k_h, a, d = _in_form(form, [run(f) for f in prepass.FORMS], q, k, lg)
    o, final = _walk_pieces(q_t, k_h, v, a, d,
                            None if s0 is None else s0.astype(F32), pieces=P, out_dtype=dt,
                            interpret=interpret)
    return o[:, :T], final, a, form


def _gate_gradient(local: jax.Array, T: int, last_term: jax.Array | None,
                   with_s0: bool) -> jax.Array:
    """dlg [B, T, H, K] float32 from the pullback kernel's chunk-local suffix sums ``local``
    [B, Tp, H, K] (module docstring): each chunk adds the totals of the chunks after it (a
    chunk's total is its first row); ``last_term`` (the final state's share at t = T - 1)
    reaches every s <= T - 1; dlg_0 = 0 without an initial state."""
    B, Tp, H, K = local.shape
    by_chunk = local.reshape(B, Tp // CHUNK, CHUNK, H, K)
    totals = by_chunk[:, :, 0]
    later = jax.lax.cumsum(totals, axis=1, reverse=True) - totals
    dlg = (by_chunk + later[:, :, None]).reshape(B, Tp, H, K)[:, :T]
    if last_term is not None:
        dlg = dlg + last_term[:, None]
    if with_s0:
        return dlg
    # lg_0 only decays the zero state; a select fuses with the sums above, where
    # dlg.at[:, 0].set(0) made XLA copy the whole array (0.51 ms at the anchor, s9_call2)
    first = jax.lax.broadcasted_iota(jnp.int32, (1, T, 1, 1), 1) == 0
    return jnp.where(first, 0.0, dlg)


def _backward(q, k, v, lg, s0, a, form, do, dstate, scale: float, interpret: Any):
    """dq, dk, dv, dlg, ds0 (module docstring); ``a``, ``form``: the forward's scores and
    its kernels' form, the pullback's too."""
    T = q.shape[1]
    dt, P = q.dtype, _num_pieces(q)
    qp, kp, vp, lgp, dop = _pad(T, P, q, k, v, lg, do)
    (q_hi, q_lo), (k_hi, k_lo), d = gk_decays(qp, kp, lgp, scale, interpret=interpret)
    run = functools.partial(_walk_pieces, pieces=P, interpret=interpret)
    swap = lambda s: None if s is None else jnp.swapaxes(s, -1, -2).astype(F32)
    with_state = not isinstance(dstate, SymbolicZero)
    carry = dstate.astype(F32) if with_state else None
    dq_t, final_t = run(dop, vp, k_hi, None, d, swap(s0), z_lo=k_lo, split_state=True,
                        decay_axis=1, out_dtype=F32)
    dk_h, _ = run(vp, dop, q_hi, None, d, swap(carry), z_lo=q_lo, split_state=True,
                  reverse=True, decay_axis=1, out_dtype=F32)
    dv, ds0 = run(k_hi, q_hi, dop, a.astype(dt), d, carry, reverse=True, out_dtype=v.dtype)
    pullback = lambda f: functools.partial(gk_pullback, scale=scale, form=f, interpret=interpret)
    dq, dk, local = _in_form(form, [pullback(f) for f in prepass.FORMS],
                             qp, kp, lgp, dq_t, dk_h, dop, vp)
    last_term = jnp.sum(dstate * swap(final_t), axis=-1) if with_state else None
    dlg = _gate_gradient(local, T, last_term, s0 is not None)
    ds0 = None if s0 is None else ds0.astype(s0.dtype)
    return dq[:, :T], dk[:, :T], dv[:, :T], dlg.astype(lg.dtype), ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _recurrence(q, k, v, lg, s0, scale, interpret):
    return _forward(q, k, v, lg, s0, scale, interpret)[:2]


def _recurrence_fwd(q, k, v, lg, s0, scale, interpret):
    q, k, v, lg, s0 = jax.tree.map(lambda p: p.value, (q, k, v, lg, s0))  # symbolic_zeros
    o, state, a, form = _forward(q, k, v, lg, s0, scale, interpret)
    return (o, state), (q, k, v, lg, s0, a, form)


def _recurrence_bwd(scale, interpret, residuals, cotangents):
    """The Mosaic GPU backward (``_backward``); a final-state cotangent that is a symbolic zero
    costs nothing."""
    q, k, v, lg, s0, a, form = residuals
    do, dstate = cotangents
    do = jnp.zeros(q.shape[:3] + v.shape[-1:], q.dtype) if isinstance(do, SymbolicZero) else do
    return _backward(q, k, v, lg, s0, a, form, do.astype(q.dtype), dstate, scale, interpret)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd, symbolic_zeros=True)


def mosaic_gpu_gk_gated_linear_attention(q, k, v, *, g, gk, scale: float, initial_state,
                                         segment_ids, chunk_size: int | None,
                                         interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """The op through the Hopper GLA kernel (registry contract; call only where
    ``mosaic_gpu_gk_accepts`` returned None). ``interpret``: e.g.
    ``plgpu.InterpretGPUParams()`` to run on CPU. Returns (o [B, T, H, V] in q's dtype, final
    state [B, H, K, V] float32). g is folded into gk (lg = gk + g); a segment start's log
    gates become RESET_LOG_GATE on every channel (their gradient is exactly zero)."""
    del chunk_size  # declined unless None or CHUNK
    B, T, H, K = q.shape
    lg = gk.astype(F32) if g is None else gk.astype(F32) + g.astype(F32)[..., None]
    if segment_ids is not None:
        starts = cc.segment_starts(segment_ids, B, T)[..., None, None]
        lg = jnp.where(starts, RESET_LOG_GATE, lg)
    return _recurrence(q, k, v, lg, initial_state, float(scale), interpret)


def mosaic_gpu_gk_accepts(q, k, v, *, g, gk, initial_state, segment_ids, chunk_size,
                          **_: Any) -> str | None:
    """None when the Hopper GLA kernel runs this call, else the reason it declines."""
    if (reason := hopper_accepts()) is not None:
        return reason
    reasons = [
        (gk is None, "needs per-channel gates gk (the scalar-gate kernel runs the others)"),
        (not transposes_swizzled_tiles(), "the backward's pullback needs jax >= 0.11 "
                                          "(transposed shared-memory tiles)"),
        (chunk_size not in (None, CHUNK), f"chunk_size must be None or {CHUNK}"),
        (any(x.dtype != jnp.bfloat16 for x in (q, k, v)), "q, k, v must be bfloat16"),
        (q.shape[-1] not in HEAD_DIMS, f"key dim must be one of {HEAD_DIMS}"),
        (v.shape[-1] not in HEAD_DIMS, f"value dim must be one of {HEAD_DIMS}"),
    ]
    return next((reason for failed, reason in reasons if failed), None)
