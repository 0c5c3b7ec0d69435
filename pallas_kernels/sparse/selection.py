"""Content-based block selection (MoBA-style): which key blocks each query block attends to.

With blocks of ``block_size`` positions, per batch b and q head h (k/v head h // G):

    kbar[j] = mean of k over key block j,   qbar[i] = mean of q over query block i
    score[i, j] = <qbar[i], kbar[j]>
    selected(i) = {i} (the local block) + top_k of score[i, j] over j < i (causal) or j != i

The result is a ``BlockSparse`` with kv_blocks [B, Hq, nq, top_k + 1] (-1 where fewer than
top_k candidates exist). It is computed with jnp on device, so it works inside jit; combine it
with ``Causal()`` for token-level causality inside the local block:

    mask = select_blocks(q, k, block_size=64, top_k=4) & Causal()
    o = flash_attention(q, k, v, mask=mask)           # block map built in-graph, no host trip

``flash_attention`` sees that the BlockSparse holds jax arrays and builds the block map with
jnp (static widths: top_k + 1 visits per query block); ``make_block_map(mask, T, (64, 64))``
returns the same map explicitly, which can be passed as ``mask=`` too. Kernel blocks must
divide ``block_size``. Selection is not differentiated (indices; inputs are stop-gradient).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.sparse.masks import BlockSparse


def _block_means(x: jax.Array, block_size: int) -> jax.Array:
    """[B, T, H, D] -> [B, H, nblocks, D]: means over each block's valid positions."""
    B, T, H, D = x.shape
    n = -(-T // block_size)
    padded = common.pad_axis(x.astype(jnp.float32), n * block_size, axis=1)
    sums = padded.reshape(B, n, block_size, H, D).sum(axis=2)
    counts = jnp.minimum(T - jnp.arange(n) * block_size, block_size).astype(jnp.float32)
    return jnp.swapaxes(sums / counts[None, :, None, None], 1, 2)


def select_blocks(q: jax.Array, k: jax.Array, *, block_size: int, top_k: int,
                  causal: bool = True) -> BlockSparse:
    """MoBA-style top-k key blocks per query block plus the local block (see the module docstring)."""
    B, T, Hq, Hkv, _, _ = common.check_qkv(q, k, k)
    if block_size < 1 or top_k < 0:
        raise ValueError(f"block_size must be >= 1 and top_k >= 0, got {block_size}, {top_k}")
    n = -(-T // block_size)
    qbar = _block_means(jax.lax.stop_gradient(q), block_size)            # [B, Hq, n, D]
    kbar = _block_means(jax.lax.stop_gradient(k), block_size)            # [B, Hkv, n, D]
    kbar = jnp.repeat(kbar, Hq // Hkv, axis=1)
    scores = jnp.einsum("bhid,bhjd->bhij", qbar, kbar)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    candidate = (j < i) if causal else (j != i)
    scores = jnp.where(candidate, scores, -jnp.inf)
    k_eff = min(top_k, max(n - 1, 0))
    picks = [jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (B, Hq, n, 1))]
    if k_eff:
        best, idx = jax.lax.top_k(scores, k_eff)
        picks.append(jnp.where(jnp.isfinite(best), idx, -1).astype(jnp.int32))
    return BlockSparse(jnp.concatenate(picks, axis=-1), block_size, block_size)
