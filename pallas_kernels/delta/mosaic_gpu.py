"""The (gated) delta rule on Hopper: the WY prepass, the custom_vjp and the chunk-parallel
backward around the Mosaic GPU walk kernels (``mosaic_gpu_kernel``, whose docstring has the
per-chunk math of both walks).

    S_t = e^{g_t} S_{t-1} + β_t k_t ⊗ (v_t - e^{g_t} S_{t-1}^T k_t),      o_t = scale · q_t S_t

Forward = (a) the prepass kernel (``mosaic_gpu_prepass``: per chunk, independent of the state,
so one CTA per (chunk, head, batch row)), T_β = T diag(β) in bf16 with T = (I + A)^-1 by stable
recursive doubling (under the vjp it also writes T and W = T diag(β Γ) K in bf16 for the
backward), then (b) the forward walk (Δ = T_β (V - Γ ⊙ K S), o, S_next; three rounds of
tensor-core products per chunk on the sequential path, on the transposed state S^T so that
each takes its left operand from registers). The WY factors W and U are not written
in the plain forward: per chunk and head at K = V = 128 the forward moves 96 KB through HBM
(prepass: k in, T_β out; walk: q, k, v, T_β in, o out) instead of 144 KB with W and U stored.

Backward (``jax.custom_vjp`` over the time-padded q, k, v, β, b = chunk-local cumulative log
gate, and the initial state): the forward under the vjp also writes the state entering every
chunk in bf16 ([B, N, H, K, V], the same size as the per-chunk states flash-linear-attention
materialises for its backward; saving them costs one TMA store per chunk, recomputing them
would cost a second forward walk). The reverse walk then carries the state cotangent from the
final state's cotangent down to chunk 0, writing the cotangent of the state leaving every chunk
(bf16) and returning the initial state's cotangent. With both per-chunk states known, every
chunk's gradients are independent: the chunk-gradient kernel (``mosaic_gpu_grads``, one CTA
per (chunk, head, batch row), ``chunk_math.backward``'s products on the tensor cores, reading
the prepass's T and T diag(β)) gives dq, dk, dv, dβ and db; autodiff carries db back
through the chunk cumsum to dg. (Before the chunk-gradient kernels, that part ran batched in
XLA and took 11.4 of the 12.7 ms forward+backward on the H100 at the anchor.)
Saved for the backward: q, k, v, β, b, W, T, T diag(β), the initial state and the per-chunk
states. Saving T and W (8 + 16 KB a chunk more written in the forward under the vjp, none in
the plain forward) spares the backward a kernel that recomputed them bit for bit.

Segment resets (packed documents) are log gates of RESET_LOG_GATE at segment starts, so the
state entering a segment is scaled by e^-80 (below float32 resolution of any sum it joins);
the replaced gates get exactly zero gradient.

Scope: bf16 q/k/v, K and V in {64, 128}, g optional, segments and initial state supported,
the default chunk only; ``mosaic_gpu_accepts`` declines everything else and everything off
Hopper. One CTA per (V blocks, head, batch row) walks the whole sequence, one V block of 64
per CTA where B·H is small (``mosaic_gpu_kernel.default_groups``).

Sequence split (``split_walk``, where B·H·V/64 <= 32 CTAs would leave most SMs idle, e.g.
T = 64k, B = 1, H = 16; ``pieces_for``): both walks cut the sequence into P pieces of whole
chunks, each a batch row of its own. The delta rule maps a piece's entering carry affinely,
carry_out = M_p carry_in + E_p with M_p [K, K] (the product over its chunks of
γ I - K^T diag(λ) W, in the walk kernel's notation), so one extra pass
(``mosaic_gpu_kernel.piece_maps``) walks every piece over V + K columns, the value columns
from zero (E_p) and K identity columns with zero values (M_p); XLA chains the maps in float32
(P small matmuls) and the walk then runs every piece from its true carry. The reverse walk
splits the same way with its own maps (the transposed ones). Measured on the H100 at
T = 64k, B = 1, H = 16 (4 pieces): gated forward 2.80 -> 1.27 ms (session 8).

CPU check: ``interpret=plgpu.InterpretGPUParams()`` (jax >= 0.12) runs the kernels on CPU.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.delta.mosaic_gpu_grads import chunk_grads
from pallas_kernels.delta.mosaic_gpu_kernel import CHUNK, HEAD_DIMS, V_BLOCK, piece_maps, walk
from pallas_kernels.delta.mosaic_gpu_prepass import prepass
from pallas_kernels.mosaic_gpu_common import (hopper_accepts, num_sms, piece_starts,
                                              transposes_swizzled_tiles)

RESET_LOG_GATE = -80.0  # the log gate standing for a segment start: e^-80 ~ 2e-35
F32 = jnp.float32
MAX_SPLIT_CTAS = 32     # the sequence is split only where the walks would run this few CTAs
MIN_PIECES = 4          # the map pass costs about one more walk of a piece: 2 would gain nothing
MAX_PIECES = 8
MIN_PIECE_CHUNKS = 16


def pieces_for(ctas: int, num_chunks: int) -> int:
    """Pieces of the sequence split for walks of ``ctas`` CTAs (B · H · V / 64) over
    ``num_chunks`` chunks: 1 unless ctas <= MAX_SPLIT_CTAS; then the largest power of two up
    to MAX_PIECES with ctas · P within the SM count and every piece at least MIN_PIECE_CHUNKS
    chunks long, and 1 if that is below MIN_PIECES. Time model: the split runs the map pass
    (2 P times the unsplit CTAs at K = V, one or two waves) and the walk, each over N / P
    chunks, instead of one walk over N."""
    pieces = 1
    while (ctas <= MAX_SPLIT_CTAS and 2 * pieces <= MAX_PIECES and ctas * 2 * pieces <= num_sms()
           and num_chunks // (2 * pieces) >= MIN_PIECE_CHUNKS):
        pieces *= 2
    return pieces if pieces >= MIN_PIECES else 1


def _split(x: jax.Array, pieces: int) -> jax.Array:
    """[B, Tp, H, ...] -> [B · P, Tp / P, H, ...]: each piece a batch row (a free reshape)."""
    return x.reshape(x.shape[0] * pieces, x.shape[1] // pieces, *x.shape[2:])


def _split_gates(b: jax.Array | None, pieces: int) -> jax.Array | None:
    """b [B, H, Tp] -> [B · P, H, Tp / P]."""
    if b is None:
        return None
    B, H, Tp = b.shape
    return jnp.swapaxes(b.reshape(B, H, pieces, Tp // pieces), 1, 2).reshape(B * pieces, H, -1)


def split_walk(q, k, m, x, b, s0, *, pieces: int, scale: float, reverse: bool = False,
               save_states: bool = False, interpret: Any = None) -> tuple[jax.Array, ...]:
    """``walk`` (same arguments and outputs) with the sequence cut into ``pieces`` pieces of
    whole chunks that walk in parallel: ``piece_maps`` gives every piece's affine map
    carry_out = M_p carry_in + E_p, XLA chains them from s0 in walk order (``piece_starts``,
    float32) and the walk then runs every piece from its true carry. Exact: the split
    changes only where the bf16 roundings of the carry happen."""
    if pieces == 1:
        return walk(q, k, m, x, b, s0, scale=scale, reverse=reverse, save_states=save_states,
                    interpret=interpret)
    B, Tp, H, K = k.shape
    V = x.shape[-1]
    args = [_split(a, pieces) for a in (q, k, m, x)] + [_split_gates(b, pieces)]
    maps, local = piece_maps(*args, scale=scale, reverse=reverse, interpret=interpret)
    maps = maps.reshape(B, pieces, H, K, K)
    advance = lambda p, carry: jnp.einsum("bhij,bhjv->bhiv", maps[:, p], carry,
                                          precision=jax.lax.Precision.HIGHEST)
    starts = piece_starts(local.reshape(B, pieces, H, K, V), s0, reverse, advance)
    outs = walk(*args, starts.reshape(B * pieces, H, K, V), scale=scale, reverse=reverse,
                save_states=save_states, interpret=interpret)
    whole = lambda a: a.reshape(B, -1, *a.shape[2:])  # the pieces back into one sequence
    final = outs[0 if reverse else 1].reshape(B, pieces, H, K, V)[:, 0 if reverse else -1]
    states = (whole(outs[-1]),) if save_states else ()
    return ((final,) if reverse else (whole(outs[0]), final)) + states


def gate_cumsum(g: jax.Array) -> jax.Array:
    """Time-padded log gates g [B, Tp, H] -> b [B, H, Tp] float32, the chunk-local cumulative
    sums the walks read."""
    return cc.chunk_cumsum(jnp.swapaxes(g.astype(F32), 1, 2), CHUNK, axis=2)


def _prepare(k: jax.Array, beta: jax.Array, b: jax.Array | None, interpret: Any = None,
             for_backward: bool = False) -> tuple[jax.Array, ...]:
    """The prepass kernel: (T_β [B, Tp, H, CHUNK],) in k's dtype; ``for_backward``: (T_β,
    W [B, Tp, H, K], T [B, Tp, H, CHUNK])."""
    return prepass(k, jnp.swapaxes(beta, 1, 2).astype(F32), b, for_backward=for_backward,
                   interpret=interpret)


def _forward(q, k, v, beta, b, s0, scale: float, pieces: int, interpret: Any,
             for_backward: bool = False):
    """The walk's outputs (and, ``for_backward``, its per-chunk states and the backward's
    factors W, T, T_β)."""
    t_beta, *w_t = _prepare(k, beta, b, interpret, for_backward=for_backward)
    s0 = None if s0 is None else s0.astype(F32)
    outs = split_walk(q, k, t_beta, v, b, s0, pieces=pieces, scale=scale,
                      save_states=for_backward, interpret=interpret)
    return outs, (*w_t, t_beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _delta(q, k, v, beta, b, s0, scale, pieces, interpret):
    (o, final), _ = _forward(q, k, v, beta, b, s0, scale, pieces, interpret)
    return o, final


def _delta_fwd(q, k, v, beta, b, s0, scale, pieces, interpret):
    (o, final, states), factors = _forward(q, k, v, beta, b, s0, scale, pieces, interpret,
                                           for_backward=True)
    return (o, final), (q, k, v, beta, b, s0, factors, states)


def chunk_gradients(q, k, v, beta, b, factors, states, do, d_states, scale: float,
                    interpret: Any = None):
    """Every chunk's gradients at once (the ``mosaic_gpu_grads`` kernel) from the prepass's
    ``factors`` (W, T, T diag(β)), the states entering the chunks and the cotangents of the
    states leaving them ([B, N, H, K, V] bf16). Returns (dq, dk, dv in their dtypes,
    dβ [B, Tp, H] in beta's, db [B, H, Tp] float32 or None ungated)."""
    w, t, t_beta = factors
    dq, dk, dv, dbeta, *db_parts = chunk_grads(
        q, k, v, w, t, t_beta, jnp.swapaxes(beta, 1, 2).astype(F32), b, states, do, d_states,
        scale=scale, interpret=interpret)
    db = db_parts[0] + db_parts[1] if db_parts else None
    return dq, dk, dv, jnp.swapaxes(dbeta, 1, 2).astype(beta.dtype), db


def _delta_bwd(scale, pieces, interpret, residuals, cotangents):
    q, k, v, beta, b, s0, factors, states = residuals
    do, d_final = cotangents
    do = do.astype(q.dtype)
    ds0, d_states = split_walk(q, k, factors[0], do, b, d_final.astype(F32), pieces=pieces,
                               scale=scale, reverse=True, save_states=True, interpret=interpret)
    grads = chunk_gradients(q, k, v, beta, b, factors, states, do, d_states, scale, interpret)
    return grads + (None if s0 is None else ds0.astype(s0.dtype),)


_delta.defvjp(_delta_fwd, _delta_bwd)


def mosaic_gpu_chunk_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                                g: jax.Array | None, *, scale: float,
                                initial_state: jax.Array | None,
                                segment_ids: jax.Array | None, chunk_size: int | None,
                                interpret: Any = None,
                                pieces: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The op through the Hopper kernels (registry contract; call only where
    ``mosaic_gpu_accepts`` returned None). ``interpret``: e.g. ``plgpu.InterpretGPUParams()``
    to run on CPU. ``pieces``: of the sequence split (``split_walk``), default ``pieces_for``.
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32). Time is
    zero-padded to whole pieces of chunks (padded steps have k = 0, β = 0 and gate 0, so the
    state passes through them unchanged)."""
    del chunk_size  # declined unless None or CHUNK
    B, T, H = q.shape[:3]
    if segment_ids is not None:
        starts = cc.segment_starts(segment_ids, B, T)[..., None]
        g = jnp.where(starts, RESET_LOG_GATE, jnp.zeros((B, T, H), F32) if g is None else g)
    pieces = pieces or pieces_for(B * H * v.shape[-1] // V_BLOCK, -(-T // CHUNK))
    Tp = common.round_up(T, CHUNK * pieces)
    pad = lambda x: cc.pad_time(x, Tp)
    b = None if g is None else gate_cumsum(pad(g))
    o, final = _delta(pad(q), pad(k), pad(v), pad(beta.astype(F32)), b, initial_state,
                      float(scale), pieces, interpret)
    return o[:, :T], final


def mosaic_gpu_accepts(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: Any, *,
                       chunk_size: int | None, **_: Any) -> str | None:
    """None when the Hopper kernels run this call, else the reason they decline."""
    if (reason := hopper_accepts()) is not None:
        return reason
    reasons = [
        (not transposes_swizzled_tiles(), "the forward walk needs jax >= 0.11 (transposed "
                                          "shared-memory tiles)"),
        (chunk_size not in (None, CHUNK), f"chunk_size must be None or {CHUNK}"),
        (any(x.dtype != jnp.bfloat16 for x in (q, k, v)), "q, k, v must be bfloat16"),
        (q.shape[-1] not in HEAD_DIMS, f"key dim must be one of {HEAD_DIMS}"),
        (v.shape[-1] not in HEAD_DIMS, f"value dim must be one of {HEAD_DIMS}"),
    ]
    return next((reason for failed, reason in reasons if failed), None)
