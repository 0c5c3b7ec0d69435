"""Mask library: block classes against brute force, the XLA path against the float64 oracle."""
import numpy as np
import pytest
import jax

from kernel_utils import assert_close, TOL_F32
from test_sparse_utils import allowed_matrix, oracle, qkv, segments
from pallas_kernels.sparse import (BlockSparse, Causal, ChunkedCausal, Dense, Full, Local,
                                   attention_reference, flash_attention)
from pallas_kernels.sparse.masks import EMPTY, FULL


def _random_block_sparse(seed, H, nq, nk, bq, bk, slots=3):
    rng = np.random.default_rng(seed)
    kv = rng.integers(-1, nk, size=(H, nq, slots))
    kv[:, 1] = -1  # an empty row of blocks
    return BlockSparse(kv, bq, bk)


def _dense(seed, T):
    return Dense(np.random.default_rng(seed).random((T, T)) < 0.3)


MASKS = {
    "full": Full(),
    "causal": Causal(),
    "local": Local(9, 4),
    "local_left": Local(None, 6),
    "chunked": ChunkedCausal(13),
    "and": Causal() & Local(20, 0),
    "or": ChunkedCausal(16) | Local(2, 2),
    "block_sparse": _random_block_sparse(0, 3, 6, 6, 16, 16),
    "block_sparse_and_causal": _random_block_sparse(1, 1, 6, 6, 16, 16) & Causal(),
    "dense": _dense(2, 83),
    "dense_or_local": _dense(3, 83) | Local(1, 1),
}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 8), (8, 24)])
def test_block_classes_match_brute_force(name, bq, bk):
    mask, T = MASKS[name], 83
    nq, nk = -(-T // bq), -(-T // bk)
    classes = np.asarray(mask.block_classes(nq, nk, bq, bk))
    vals = np.asarray(mask.values(np.arange(nq * bq), np.arange(nk * bk)))
    vals = vals.reshape(*vals.shape[:2], nq, bq, nk, bk)
    classes = np.broadcast_to(classes, vals.shape[:2] + classes.shape[2:])
    any_true, all_true = vals.any(axis=(3, 5)), vals.all(axis=(3, 5))
    assert not np.any((classes == EMPTY) & any_true), "a block with allowed pairs is called empty"
    assert not np.any((classes == FULL) & ~all_true), "a block with masked pairs is called full"
    if name not in ("and", "or", "block_sparse_and_causal", "dense_or_local"):  # leaves are exact
        assert np.array_equal(classes == FULL, all_true) and np.array_equal(classes != EMPTY, any_true)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_xla_path_matches_oracle(name):
    mask = MASKS[name]
    B, T, Hq, Hkv = 2, 83, 3, 1 if name != "block_sparse" else 3
    q, k, v, do = qkv(10, B, T, Hq, Hkv, 16, 8)
    seg = segments(11, B, T)
    out = flash_attention(q, k, v, mask=mask, segment_ids=seg, impl="xla")
    ref = oracle(q, k, v, allowed_matrix(mask, T, B, Hq, seg))
    assert_close(out, ref, TOL_F32)


def test_xla_path_gradients_and_soft_cap():
    B, T, Hq, Hkv = 1, 50, 4, 2
    q, k, v, do = qkv(20, B, T, Hq, Hkv, 16)
    mask = Local(7, 0)
    fn = lambda q, k, v: attention_reference(q, k, v, mask=mask, logits_soft_cap=2.0, q_chunk=16)
    out, vjp = jax.vjp(fn, q, k, v)
    ref, grads = oracle(q, k, v, allowed_matrix(mask, T, B, Hq), cap=2.0, do=do)
    assert_close(out, ref, TOL_F32)
    for name, g, r in zip("qkv", vjp(do), grads):
        assert_close(g, r, TOL_F32, f"d{name}")


def test_empty_rows_give_zeros():
    q, k, v, _ = qkv(30, 1, 24, 2, 2, 8)
    mask = BlockSparse(np.array([[0], [-1], [1]]), 8, 8)
    out = flash_attention(q, k, v, mask=mask, impl="xla")
    assert np.all(np.asarray(out[:, 8:16]) == 0) and np.all(np.isfinite(np.asarray(out)))


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = qkv(40, 1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="non-negative"):
        Local(-1, 0)
    with pytest.raises(TypeError, match="boolean"):
        Dense(np.zeros((16, 16), np.int32))
    with pytest.raises(TypeError, match="Mask"):
        flash_attention(q, k, v, mask=np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="impl"):
        flash_attention(q, k, v, impl="triton")
