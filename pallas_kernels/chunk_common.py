"""Chunk helpers shared by the chunkwise recurrences (linear, delta): segment runs, time padding,
chunk-local cumulative log gates, and the one-place registry of implementations.

Conventions. A sequence of length T is cut into N = ceil(T / C) chunks of C steps (padded at
the end). Segment resets are expressed as chunk-local *run ids* (``chunk_run_terms``: segment
starts in the chunk up to and including the step), so steps i, j of a chunk interact exactly
when their run ids agree, whatever the raw ids look like, and run 0 is the run of the state
entering the chunk. This keeps log gates finite (a reset is a mask, not a -inf gate), so
cumulative sums never meet inf - inf.

Log gates are accumulated *per chunk* (the anchor is the state entering the chunk):
B_i = sum_{s <= i, s in chunk} lg_s <= 0, so exp(B_i) and exp(B_i - B_j) for j <= i never
overflow, for any decay strength and any T.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from pallas_kernels import common


def segment_starts(segment_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """Bool [B, T]: True where step t begins a new segment (t > 0 and its id differs from t-1)."""
    if segment_ids is None:
        return jnp.zeros((B, T), bool)
    differs = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((B, 1), bool), differs], axis=1)


def pad_time(x: jax.Array, size: int) -> jax.Array:
    """Zero-pad axis 1 (time) to ``size``."""
    return common.pad_axis(x, size, axis=1)


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def chunk_cumsum(log_gate: jax.Array, chunk_size: int, axis: int) -> jax.Array:
    """Cumulative sum of ``log_gate`` along time ``axis`` restarting at every chunk of
    ``chunk_size`` steps (the length along ``axis`` must be a multiple of it)."""
    axis = axis % log_gate.ndim
    shape = log_gate.shape
    n = shape[axis] // chunk_size
    x = log_gate.reshape(shape[:axis] + (n, chunk_size) + shape[axis + 1:])
    return jnp.cumsum(x, axis=axis + 1).reshape(shape)


# ---- kernel layout: per-chunk terms as columns and rows ---------------------------------------
# A kernel working on one chunk needs some per-step scalars both as a column [C, 1] (b_t) and as
# a row [1, C] (b_s); rows are laid out here, [..., N, 1, C], so no in-kernel transpose is needed
# ((1, C) is a legal Mosaic TPU block: the full trailing dims).

def as_rows(x: jax.Array, chunk: int) -> jax.Array:
    """[..., Tp] -> [..., N, 1, C]: a per-step scalar as one row per chunk."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // chunk, 1, chunk)


def gate_terms(log_gate: jax.Array, chunk: int, scalar: bool
               ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """From a head-major, time-padded log-gate [B, H, Tp, X] (X = 1 scalar, X = K per channel):

      b        [B, H, Tp, X]       chunk-local inclusive cumulative log-gate (float32)
      b_row    [B, H, N, 1, C]     b as one row per chunk (scalar gates only, else None)
      b_total  [B, H, N, X, 1]     b at each chunk's last step, as a column
    """
    B, H, Tp, X = log_gate.shape
    b = chunk_cumsum(log_gate.astype(jnp.float32), chunk, axis=2)
    b_total = b.reshape(B, H, Tp // chunk, chunk, X)[:, :, :, -1, :, None]
    b_row = as_rows(b[..., 0], chunk) if scalar else None
    return b, b_row, b_total


def chunk_run_terms(segment_ids: jax.Array | None, T: int, padded_len: int, chunk: int
                    ) -> tuple[jax.Array | None, jax.Array | None]:
    """Chunk-local run ids r (segment starts in the chunk up to and including the step) as
    (r_col [B, Tp, 1], r_row [B, N, 1, C]) int32, or (None, None) without segments.

    Within a chunk: steps i, j interact iff r_i == r_j; step i reads the entering state iff
    r_i == 0; step j reaches the leaving state iff r_j == r_{C-1}; the entering state survives
    iff r_{C-1} == 0. The padding continues the last run.
    """
    if segment_ids is None:
        return None, None
    B = segment_ids.shape[0]
    starts = pad_time(segment_starts(segment_ids, B, T).astype(jnp.int32), padded_len)
    r = chunk_cumsum(starts, chunk, axis=1)
    return r[..., None], as_rows(r, chunk)


# ---- in-chunk masks and decays (plain jnp; also used inside Pallas kernels) -------------------

def causal_mask(rows: int, cols: int, row_offset: int = 0, col_offset: int = 0) -> jax.Array:
    """bool [rows, cols]: (row_offset + i) >= (col_offset + j)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + row_offset
    j = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + col_offset
    return i >= j


def same_run(r_col: jax.Array | None, r_row: jax.Array | None) -> jax.Array | None:
    """bool [C1, C2] from chunk-local run ids r_col [C1, 1] and r_row [1, C2]; None = no segments."""
    return None if r_col is None else r_col == r_row


def and_mask(a: jax.Array, b: jax.Array | None) -> jax.Array:
    return a if b is None else jnp.logical_and(a, b)


def masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """exp(x) where mask, 0 elsewhere, never evaluating exp of a masked (possibly huge) value, so
    neither the value nor its gradient can be inf or NaN."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def decay_matrix(b_col: jax.Array, b_row: jax.Array, mask: jax.Array) -> jax.Array:
    """[C1, C2] exp(b_i - b_j) on ``mask`` (pairs j <= i of one run), 0 elsewhere; every kept
    entry is <= 1 because log gates are <= 0."""
    return masked_exp(b_col - b_row, mask)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b [k, n] with float32 accumulation (the matmul of every chunk kernel)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b[n, k]^T -> [m, n], float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a[k, m]^T @ b [k, n] -> [m, n], float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
