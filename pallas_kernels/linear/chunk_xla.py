"""Chunkwise gated linear recurrence in plain jnp (the ``impl="xla"`` path and the fallback).

The same per-chunk math as the Pallas kernels (``chunk_math``: no exponent is ever positive,
so any decay strength and any T are safe), batched over every (batch, head, chunk) with vmap:

  1. all chunks at once: S_next = decay ⊙ S + U  (``chunk_transition``: decay, U per chunk);
  2. one ``lax.scan`` over the N chunks of that affine map gives the state entering each chunk
     ([B, H, N, K, V]: T/C states per head, cheap elementwise steps);
  3. all chunks at once: o = scale · ``chunk_output``(q, k, v, S_entering).

Autodiff of this function is the XLA backward. No [T, T] buffer: the largest intermediates are
[B, H, N, C, C] scores and, for per-channel gates, [B, H, N, C/sub, sub, sub, K] diagonal factors.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.linear.chunk_math import ChunkTerms, apply_transition, chunk_output, chunk_transition

DEFAULT_CHUNK = 64
SUB_BLOCK = 16


def head_major_inputs(q, k, v, g, gk, segment_ids, chunk: int):
    """Chunk-layout inputs shared by the chunked paths: q, k, v as [B, H, Tp, D] (time
    zero-padded to a multiple of ``chunk``; padded steps have k = 0 and gate 0) and the
    ChunkTerms arrays (b [B, H, Tp, X], b_row, b_total, r_col [B, Tp, 1], r_row) from
    ``chunk_common.gate_terms`` / ``chunk_run_terms``; absent gates / segments are None."""
    T = q.shape[1]
    Tp = common.round_up(T, chunk)
    hm = lambda x: jnp.swapaxes(cc.pad_time(x, Tp), 1, 2)
    b = b_row = b_total = None
    if g is not None or gk is not None:
        log_gate = hm(gk.astype(jnp.float32)) if gk is not None else 0.0
        if g is not None:
            log_gate = log_gate + hm(g.astype(jnp.float32)[..., None])
        b, b_row, b_total = cc.gate_terms(log_gate, chunk, scalar=gk is None)
    r_col, r_row = cc.chunk_run_terms(segment_ids, T, Tp, chunk)
    return (hm(q), hm(k), hm(v)), ChunkTerms(b, b_row, b_total, r_col, r_row)


def _per_chunk(x: jax.Array | None, B: int, H: int, N: int, chunk: int, *, per_batch: bool,
               time: bool):
    """Reshape a chunk-layout array to [B·H·N, ...] (one leading axis per chunk): ``per_batch``
    arrays (segment terms, no head axis) are shared across heads; ``time`` arrays have a
    [Tp = N·C] axis after the head axis, the others already [N, ...]."""
    if x is None:
        return None
    if per_batch:
        x = jnp.broadcast_to(x[:, None], (B, H) + x.shape[1:])
    if time:
        x = x.reshape(B, H, N, chunk, *x.shape[3:])
    return x.reshape(B * H * N, *x.shape[3:])


def chunk_gated_linear_xla(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           g: jax.Array | None, gk: jax.Array | None, scale: float,
                           initial_state: jax.Array | None, segment_ids: jax.Array | None,
                           chunk_size: int | None) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``reference.gated_linear_reference`` with heads equal.

    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(DEFAULT_CHUNK if chunk_size is None else chunk_size, common.round_up(T, 8))
    sub = math.gcd(C, SUB_BLOCK)
    (qh, kh, vh), terms = head_major_inputs(q, k, v, g, gk, segment_ids, C)
    N = qh.shape[2] // C
    flat = lambda x, per_batch=False, time=True: _per_chunk(x, B, H, N, C, per_batch=per_batch,
                                                            time=time)
    terms = ChunkTerms(flat(terms.b), flat(terms.b_row, time=False),
                       flat(terms.b_total, time=False), flat(terms.r_col, per_batch=True),
                       flat(terms.r_row, per_batch=True, time=False))
    qc, kc, vc = flat(qh), flat(kh), flat(vh)

    decay, U = jax.vmap(chunk_transition)(kc, vc, terms)
    by_chunk = lambda x: None if x is None else jnp.moveaxis(x.reshape(B, H, N, *x.shape[1:]), 2, 0)

    def step(s, xs):
        d, u = xs
        return apply_transition(s, d, u), s

    s0 = common.vary_like(jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
                          else initial_state.astype(jnp.float32), U)
    final, entering = jax.lax.scan(step, s0, (by_chunk(decay), by_chunk(U)))
    entering = jnp.moveaxis(entering, 0, 2).reshape(B * H * N, K, V)
    o = jax.vmap(lambda *a: chunk_output(*a, sub=sub))(qc, kc, vc, entering, terms)
    o = (scale * o).reshape(B, H, N * C, V)[:, :, :T]
    return jnp.swapaxes(o, 1, 2).astype(q.dtype), final
