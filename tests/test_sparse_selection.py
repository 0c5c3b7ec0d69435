"""MoBA-style block selection: against a NumPy re-derivation, and end to end inside jit."""
import numpy as np
import jax

from kernel_utils import assert_close, TOL_F32
from test_sparse_utils import allowed_matrix, oracle, qkv
from pallas_kernels.sparse import Causal, flash_attention, select_blocks


def _numpy_selection(q, k, bs, top_k):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, _ = q.shape
    G = Hq // k.shape[2]
    n = -(-T // bs)
    mean = lambda x, i: x[:, i * bs:(i + 1) * bs].mean(axis=1)  # [B, H, D]
    qbar = np.stack([mean(q, i) for i in range(n)], axis=2)
    kbar = np.repeat(np.stack([mean(k, i) for i in range(n)], axis=2), G, axis=1)
    scores = np.einsum("bhid,bhjd->bhij", qbar, kbar)
    chosen = np.zeros((B, Hq, n, n), bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(n):
                chosen[b, h, i, i] = True
                order = np.argsort(-scores[b, h, i, :i], kind="stable")[:top_k]
                chosen[b, h, i, order] = True
    return chosen


def test_selection_matches_numpy():
    q, k, _, _ = qkv(0, 2, 75, 4, 2, 16)
    mask = select_blocks(q, k, block_size=8, top_k=3)
    got = np.zeros((2, 4, 10, 10), bool)
    kv = np.asarray(mask.kv_blocks)
    assert kv.shape == (2, 4, 10, 4) and kv.dtype == np.int32
    for idx in np.ndindex(kv.shape[:3]):
        got[idx][kv[idx][kv[idx] >= 0]] = True
    assert np.array_equal(got, _numpy_selection(q, k, 8, 3))
    assert np.all(kv[:, :, 0, 1:] == -1)  # the first block has no earlier candidates


def test_selected_attention_in_jit_matches_oracle():
    T, bs = 70, 16
    q, k, v, do = qkv(1, 1, T, 4, 2, 16)

    @jax.jit
    def run(q, k, v):
        mask = select_blocks(q, k, block_size=bs, top_k=1) & Causal()
        return flash_attention(q, k, v, mask=mask), mask.a.kv_blocks

    out, kv = run(q, k, v)
    mask = select_blocks(q, k, block_size=bs, top_k=1) & Causal()
    assert np.array_equal(np.asarray(kv), np.asarray(mask.a.kv_blocks))
    ref, grads = oracle(q, k, v, allowed_matrix(mask, T, 1, 4), do=do)
    assert_close(out, ref, TOL_F32)
    _, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask=mask), q, k, v)
    for what, g, r in zip(("dq", "dk", "dv"), vjp(do), grads):
        assert_close(g, r, TOL_F32, what)
