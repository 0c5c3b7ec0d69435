"""The math of one chunk of the gated linear recurrence, for one head (plain jnp on 2-D arrays).

Used twice: vmapped over (batch, head, chunk) by the XLA path, and on loaded blocks inside the
Pallas kernels. Within a chunk of C positions, with ``b`` the in-chunk cumulative log-gate
(``pallas_kernels.chunk_common``; scalar [C, 1] or per key channel [C, K]), ``S0`` the [K, V]
state entering the chunk and masks from the in-chunk segment counts r:

    o_t  = (q_t * e^{b_t} * [r_t = 0]) S0 + sum_{s <= t, r_s = r_t} (sum_k q_tk k_sk e^{b_tk - b_sk}) v_s
    S1   = [r_{C-1} = 0] e^{beta} * S0 + sum_{s: r_s = r_{C-1}} (k_s * e^{beta - b_s})^T v_s,
           beta = b_{C-1} (``b_total``, a column [K, 1] or [1, 1])

(o without ``scale``; callers scale). No factor ever exceeds 1, so strong decay cannot overflow:
  * scalar gate: the [C, C] decay matrix e^{b_t - b_s} multiplies q k^T;
  * per-channel gate: the chunk is cut into sub-blocks of ``sub`` rows. Pairs in a diagonal
    sub-block use e^{b_t - b_s} per channel directly ([sub, sub, K] elementwise); pairs with s
    in an earlier sub-block go through matmuls of q * e^{b_t - a} and k * e^{a - b_s}, the
    anchor a = b at the last row before the sub-block (row form, for o and dq) or at the last
    row of the sub-block (column form, for dk and dv).

The backward (``chunk_backward``) takes dO already multiplied by ``scale`` and the gradient
dS1 of the leaving state, and returns dq, dk, dv, the gradients of b and b_total, and dS0:

    dq_t  = sum_{s <= t} D_ts k_s e^{b_t - b_s} + (dO_t S0^T) e^{b_t} [r_t = 0],   D = dO v^T (masked)
    dk_s  = sum_{t >= s} D_ts q_t e^{b_t - b_s} + (v_s dS1^T) e^{beta - b_s} [r_s = r_{C-1}]
    dv_s  = sum_{t >= s} A_ts dO_t + (k_s e^{beta - b_s} [r_s = r_{C-1}]) dS1
    db_t  = q_t dq_t - k_t dk_t    (summed over K for a scalar gate)
    dbeta = rowsum(dS1 * S1)       (all of beta's influence goes through b_total)
    dS0   = [r_{C-1} = 0] e^{beta} dS1 + (q e^{b} [r = 0])^T dO
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_common import and_mask, causal_mask, decay_matrix, masked_exp, same_run
from pallas_kernels.chunk_common import dot as _dot, dot_nt as _dot_nt, dot_tn as _dot_tn

F32 = jnp.float32


class ChunkTerms(NamedTuple):
    """Gate and segment terms of one chunk; None where absent (static structure)."""
    b: jax.Array | None          # [C, 1] scalar or [C, K] per-channel in-chunk cumulative log-gate
    b_row: jax.Array | None      # [1, C] the scalar gate as a row (scalar gate only)
    b_total: jax.Array | None    # [1, 1] or [K, 1]: beta = b_{C-1} as a column
    r_col: jax.Array | None      # [C, 1] int32 in-chunk segment counts
    r_row: jax.Array | None      # [1, C]


def gate_kind(t: ChunkTerms) -> str:
    """"none", "scalar" or "channel"."""
    if t.b is None:
        return "none"
    return "scalar" if t.b_row is not None else "channel"


def _seg_rows(t: ChunkTerms, lo: int, hi: int, c_lo: int, c_hi: int) -> jax.Array | None:
    """Same-segment mask of rows [lo, hi) against columns [c_lo, c_hi)."""
    if t.r_col is None:
        return None
    return same_run(t.r_col[lo:hi], t.r_row[:, c_lo:c_hi])


def _state_masks(t: ChunkTerms) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
    """(reads [C, 1], writes [C, 1], carries [1, 1]) as float masks, None without segments."""
    if t.r_col is None:
        return None, None, None
    last = t.r_col[-1:]
    return ((t.r_col == 0).astype(F32), (t.r_col == last).astype(F32), (last == 0).astype(F32))


def _times(x: jax.Array, m: jax.Array | None) -> jax.Array:
    return x if m is None else x * m


def _read_weights(t: ChunkTerms) -> jax.Array | None:
    """e^{b_t} [r_t = 0]: how much of the entering state row t sees ([C, 1] or [C, K])."""
    reads, _, _ = _state_masks(t)
    if t.b is None:
        return reads
    return _times(jnp.exp(t.b), reads)


def _write_weights(t: ChunkTerms) -> jax.Array | None:
    """e^{beta - b_s} [r_s = r_{C-1}]: how much of k_s reaches the leaving state."""
    _, writes, _ = _state_masks(t)
    if t.b is None:
        return writes
    return _times(jnp.exp(t.b[-1:] - t.b), writes)


def _state_decay(t: ChunkTerms) -> jax.Array | None:
    """[r_{C-1} = 0] e^{beta}: the factor on the entering state's rows ([1, 1] or [K, 1])."""
    _, _, carries = _state_masks(t)
    if t.b is None:
        return carries
    return _times(jnp.exp(t.b_total), carries)


def _scalar_pair_weights(t: ChunkTerms, C: int) -> jax.Array:
    """[C, C] weights of pairs (t, s): causal, same segment, times e^{b_t - b_s} if gated."""
    mask = and_mask(causal_mask(C, C), same_run(t.r_col, t.r_row))
    if t.b is None:
        return mask.astype(F32)
    return decay_matrix(t.b, t.b_row, mask)


def _diag_decay(t: ChunkTerms, lo: int, hi: int) -> jax.Array:
    """[c, c, K] e^{b_tk - b_sk} for pairs of sub-block [lo, hi) (causal, same segment)."""
    c = hi - lo
    mask = and_mask(causal_mask(c, c), _seg_rows(t, lo, hi, lo, hi))
    bi = t.b[lo:hi]
    return masked_exp(bi[:, None, :] - bi[None, :, :], mask[:, :, None])


def _masked(x: jax.Array, m: jax.Array | None) -> jax.Array:
    return x if m is None else jnp.where(m, x, 0.0)


def chunk_output(q, k, v, S0, t: ChunkTerms, sub: int) -> jax.Array:
    """[C, V] float32 o of the chunk (without ``scale``); see the module docstring."""
    dt = v.dtype
    C = q.shape[0]
    reads = _read_weights(t)
    o = _dot(_times(q.astype(F32), reads).astype(dt), S0.astype(dt))
    if gate_kind(t) != "channel":
        scores = _dot_nt(q, k) * _scalar_pair_weights(t, C)
        return o + _dot(scores.astype(dt), v)
    qf, kf = q.astype(F32), k.astype(F32)
    rows = []
    for lo in range(0, C, sub):
        hi = lo + sub
        a_diag = jnp.sum(qf[lo:hi, None, :] * kf[None, lo:hi, :] * _diag_decay(t, lo, hi), axis=-1)
        oi = _dot(a_diag.astype(dt), v[lo:hi])
        if lo:
            anchor = t.b[lo - 1:lo]
            qh = qf[lo:hi] * jnp.exp(t.b[lo:hi] - anchor)
            kh = kf[:lo] * jnp.exp(anchor - t.b[:lo])
            a_off = _masked(_dot_nt(qh.astype(dt), kh.astype(dt)), _seg_rows(t, lo, hi, 0, lo))
            oi = oi + _dot(a_off.astype(dt), v[:lo])
        rows.append(oi)
    return o + jnp.concatenate(rows, axis=0)


def chunk_transition(k, v, t: ChunkTerms) -> tuple[jax.Array | None, jax.Array]:
    """(decay, U) with S1 = decay * S0 + U: decay [1, 1] / [K, 1] (None = 1), U [K, V] float32.

    With a gate, k * e^{beta - b} is not rounded back to the input dtype: the state feeds every
    later chunk and the gate gradient's cancellation (rounding it: dg error 7e-3 instead of 1e-3).
    """
    kw = _times(k.astype(F32), _write_weights(t))
    mm = v.dtype if t.b is None else F32
    return _state_decay(t), _dot_tn(kw.astype(mm), v.astype(mm))


def apply_transition(S0: jax.Array, decay: jax.Array | None, U: jax.Array) -> jax.Array:
    return (S0 if decay is None else decay * S0) + U


def chunk_backward(q, k, v, do, S0, dS1, t: ChunkTerms, sub: int):
    """(dq, dk, dv, db, db_total, dS0) of one chunk, float32; ``do`` already times ``scale``.

    db / db_total are None without a gate. See the module docstring for the formulas. With a
    gate, the products that form dq and dk take float32 operands (``gt``): db = q dq - k dk
    cancels, and bf16-rounded operands there cost dg its accuracy (bf16 case of the tests:
    dg error 1.8e-2 with them rounded, 1.0e-3 without; see also ``chunk_transition``).
    """
    dt = v.dtype
    gt = dt if t.b is None else F32
    C = q.shape[0]
    qf, kf = q.astype(F32), k.astype(F32)
    dom = do.astype(dt)
    if gate_kind(t) != "channel":
        w = _scalar_pair_weights(t, C)
        scores = (_dot_nt(q, k) * w).astype(dt)
        dscores = (_dot_nt(dom, v) * w).astype(gt)
        dq, dk = _dot(dscores, k.astype(gt)), _dot_tn(dscores, q.astype(gt))
        dv = _dot_tn(scores, dom)
    else:
        dq, dk, dv = _channel_intra_backward(qf, kf, v, dom, t, sub, gt)
    reads, writes = _read_weights(t), _write_weights(t)
    decay, U = chunk_transition(k, v, t)
    dq = dq + _times(_dot_nt(dom.astype(gt), S0.astype(gt)), reads)
    dk = dk + _times(_dot_nt(v.astype(gt), dS1.astype(gt)), writes)
    dv = dv + _dot(_times(kf, writes).astype(dt), dS1.astype(dt))
    dS0 = apply_transition(dS1, decay, _dot_tn(_times(qf, reads).astype(dt), dom))
    if t.b is None:
        return dq, dk, dv, None, None, dS0
    db = qf * dq - kf * dk
    S1 = apply_transition(S0, decay, U)
    if gate_kind(t) == "scalar":
        db = jnp.sum(db, axis=1, keepdims=True)
        db_total = jnp.sum(dS1 * S1, keepdims=True).reshape(1, 1)
    else:
        db_total = jnp.sum(dS1 * S1, axis=1, keepdims=True)
    return dq, dk, dv, db, db_total, dS0


def _channel_intra_backward(qf, kf, v, dom, t: ChunkTerms, sub: int, gt):
    """In-chunk parts of dq, dk, dv for a per-channel gate, sub-block by sub-block (dq and dk
    from ``gt`` operands)."""
    dt = v.dtype
    C = qf.shape[0]
    dqs, dks, dvs = [], [], []
    for lo in range(0, C, sub):
        hi = lo + sub
        e = _diag_decay(t, lo, hi)                                            # [c, c, K]
        d_diag = _dot_nt(dom[lo:hi], v[lo:hi])                                # [c, c]
        a_diag = jnp.sum(qf[lo:hi, None, :] * kf[None, lo:hi, :] * e, axis=-1)
        dq_i = jnp.sum(d_diag[:, :, None] * kf[None, lo:hi, :] * e, axis=1)
        dk_i = jnp.sum(d_diag[:, :, None] * qf[lo:hi, None, :] * e, axis=0)
        dv_i = _dot_tn(a_diag.astype(dt), dom[lo:hi])
        if lo:  # row form: s in earlier sub-blocks, anchor a = b_{lo-1}
            anchor = t.b[lo - 1:lo]
            kh = kf[:lo] * jnp.exp(anchor - t.b[:lo])
            d_off = _masked(_dot_nt(dom[lo:hi], v[:lo]), _seg_rows(t, lo, hi, 0, lo))
            dq_i = dq_i + jnp.exp(t.b[lo:hi] - anchor) * _dot(d_off.astype(gt), kh.astype(gt))
        if hi < C:  # column form: t in later sub-blocks, anchor a = b_{hi-1}
            anchor = t.b[hi - 1:hi]
            qh = qf[hi:] * jnp.exp(t.b[hi:] - anchor)
            kh = kf[lo:hi] * jnp.exp(anchor - t.b[lo:hi])
            seg = _seg_rows(t, hi, C, lo, hi)
            d_off = _masked(_dot_nt(dom[hi:], v[lo:hi]), seg)                 # [C - hi, c]
            a_off = _masked(_dot_nt(qh.astype(dt), kh.astype(dt)), seg)
            dk_i = dk_i + jnp.exp(anchor - t.b[lo:hi]) * _dot_tn(d_off.astype(gt), qh.astype(gt))
            dv_i = dv_i + _dot_tn(a_off.astype(dt), dom[hi:])
        dqs.append(dq_i)
        dks.append(dk_i)
        dvs.append(dv_i)
    return (jnp.concatenate(dqs, axis=0), jnp.concatenate(dks, axis=0), jnp.concatenate(dvs, axis=0))
