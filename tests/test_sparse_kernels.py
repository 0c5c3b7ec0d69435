"""Portable Pallas kernels (CPU interpret mode): every mask kind, forward and gradients of q, k, v,
against the float64 oracle; T not a multiple of the block, GQA, Dv != D."""
import numpy as np
import pytest
import jax

from kernel_utils import assert_close, TOL_F32
from test_sparse_utils import allowed_matrix, oracle, qkv
from pallas_kernels.sparse import (BlockSparse, Causal, ChunkedCausal, Dense, Full, Local,
                                   flash_attention)

B, T, HQ, HKV, D, DV = 2, 83, 4, 2, 16, 8


def _random_kv_blocks(seed, shape, nk, slots):
    kv = np.random.default_rng(seed).integers(-1, nk, size=shape + (slots,))
    kv[..., 2, :] = -1  # a query block with nothing to attend
    return kv


MASKS = {
    "full": lambda: Full(),
    "causal": lambda: Causal(),
    "local": lambda: Local(9, 4),
    "chunked_causal": lambda: ChunkedCausal(21),
    "causal_and_local": lambda: Causal() & Local(20, 0),
    "chunked_or_local": lambda: ChunkedCausal(16) | Local(2, 2),
    "dense_per_head": lambda: Dense(np.random.default_rng(1).random((HQ, T, T)) < 0.3),
    # per (batch, head) patterns at the kernel's block size, with an empty query block
    "block_sparse": lambda: BlockSparse(_random_kv_blocks(2, (B, HQ, 6), 6, 3), 16, 16),
    # mask blocks twice the kernel blocks (aligned) with token-level causality
    "block_sparse_and_causal": lambda: BlockSparse(_random_kv_blocks(3, (3,), 3, 2), 32, 32) & Causal(),
    # mask blocks not aligned with the kernel blocks: packed tiles
    "block_sparse_unaligned": lambda: BlockSparse(_random_kv_blocks(4, (HQ, 7), 7, 2), 12, 12),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_forward_and_gradients_match_oracle(name):
    mask = MASKS[name]()
    q, k, v, do = qkv(sorted(MASKS).index(name), B, T, HQ, HKV, D, DV)
    fn = lambda q, k, v: flash_attention(q, k, v, mask=mask, block_sizes=(16, 16), impl="pallas")
    out, vjp = jax.vjp(fn, q, k, v)
    ref, grads = oracle(q, k, v, allowed_matrix(mask, T, B, HQ), do=do)
    assert_close(out, ref, TOL_F32)
    for what, g, r in zip(("dq", "dk", "dv"), vjp(do), grads):
        assert_close(g, r, TOL_F32, what)
