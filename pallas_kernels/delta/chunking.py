"""Delta-rule input layout shared by the XLA path and the Pallas kernels.

[B, T, H, D] inputs become head-major [B, H, Tp, D] (T zero-padded to a multiple of the chunk C:
padded steps have beta = 0, k = 0, g = 0, so they leave the state unchanged), beta and the
chunk-local cumulative log gate b become float32 columns [B, H, Tp, 1] (b also as rows
[B, H, N, 1, C]), and segment ids become chunk-local run ids r (``chunk_common``) as columns
[B, Tp, 1] and rows [B, N, 1, C].
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common

DEFAULT_CHUNK = 64


class Layout(NamedTuple):
    q: jax.Array              # [B, H, Tp, K]
    k: jax.Array              # [B, H, Tp, K]
    v: jax.Array              # [B, H, Tp, V]
    beta: jax.Array           # [B, H, Tp, 1] float32
    b: jax.Array | None       # [B, H, Tp, 1] float32
    b_row: jax.Array | None   # [B, H, N, 1, C]
    r_col: jax.Array | None   # [B, Tp, 1] int32
    r_row: jax.Array | None   # [B, N, 1, C]


def chunk_for(T: int, chunk_size: int | None) -> int:
    """The chunk length for T steps: ``chunk_size`` (default 64), but no longer than T rounded
    up to 16, so a short sequence is not one mostly-padded chunk."""
    cc.check_chunk_size(chunk_size)
    return min(DEFAULT_CHUNK if chunk_size is None else chunk_size, common.round_up(T, 16))


def to_layout(q, k, v, beta, g, segment_ids, C: int) -> Layout:
    T = q.shape[1]
    Tp = common.round_up(T, C)
    hm = lambda x: common.pad_axis(jnp.swapaxes(x, 1, 2), Tp, axis=2)
    b = b_row = None
    if g is not None:
        b, b_row, _ = cc.gate_terms(hm(g)[..., None], C, scalar=True)
    r_col, r_row = cc.chunk_run_terms(segment_ids, T, Tp, C)
    return Layout(hm(q), hm(k), hm(v), hm(beta.astype(jnp.float32))[..., None], b, b_row,
                  r_col, r_row)


def from_head_major(x: jax.Array, T: int) -> jax.Array:
    """[B, H, Tp, D] -> [B, T, H, D]."""
    return jnp.swapaxes(x[:, :, :T], 1, 2)
