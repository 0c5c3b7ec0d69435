"""Delta-rule chunk preparation shared by the XLA path and the Pallas kernels.

Segment resets become a monotone "run id" per step (count of segment starts so far), so two
steps share a run exactly when no reset lies between them, whatever the raw ids look like.
The initial state belongs to run 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.delta.reference import segment_starts

DEFAULT_CHUNK = 64


def run_ids(segment_ids: jax.Array | None, B: int, T: int) -> jax.Array:
    """int32 [B, T]: number of segment starts at or before each step (0 for the first run)."""
    return jnp.cumsum(segment_starts(segment_ids, B, T).astype(jnp.int32), axis=1)


def pad_time(x: jax.Array, size: int, edge: bool = False) -> jax.Array:
    """Pad axis 1 (time) to ``size``: zeros, or the last value when ``edge`` (run ids)."""
    if not edge:
        return common.pad_axis(x, size, axis=1)
    extra = size - x.shape[1]
    return jnp.concatenate([x, jnp.repeat(x[:, -1:], extra, axis=1)], axis=1) if extra else x


def resolve_chunk(chunk_size: int | None) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size
