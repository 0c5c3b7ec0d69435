"""Sparse op features on the Pallas path: segments, soft cap, bf16, tiny/odd T, unequal blocks,
empty rows, TPU interpret mode, prebuilt and device-built block maps, dispatch."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from kernel_utils import assert_close, TOL_BF16, TOL_F32
from test_sparse_utils import allowed_matrix, oracle, qkv, segments
from pallas_kernels.sparse import (BlockMap, BlockSizes, BlockSparse, Causal, Full, Local,
                                   flash_attention, make_block_map, ops)
from pallas_kernels.common import Implementation
from pallas_kernels.sparse.pallas_op import pallas_flash_attention


def _check(mask, T, *, B=1, Hq=2, Hkv=1, D=16, seed=0, seg=False, cap=None, blocks=(16, 16),
           dtype=jnp.float32, interpret=None, tol=TOL_F32):
    q, k, v, do = qkv(seed, B, T, Hq, Hkv, D, dtype=dtype)
    seg_ids = segments(seed + 1, B, T) if seg else None
    if interpret is None:
        fn = lambda q, k, v: flash_attention(q, k, v, mask=mask, segment_ids=seg_ids, logits_soft_cap=cap,
                                             block_sizes=blocks, impl="pallas")
    else:
        fn = lambda q, k, v: pallas_flash_attention(q, k, v, mask=mask, segment_ids=seg_ids, scale=D ** -0.5,
                                                    logits_soft_cap=cap, block_sizes=BlockSizes(*blocks),
                                                    interpret=interpret)
    out, vjp = jax.vjp(fn, q, k, v)
    assert out.dtype == dtype
    ref, grads = oracle(q, k, v, allowed_matrix(mask, T, B, Hq, seg_ids), cap=cap, do=do)
    assert_close(out, ref, tol)
    # With one key per row (T = 1) dq and dk are exactly zero: judged against 1e-3 of dv's
    # scale there (far below ||dq||, ||dk|| in every other case).
    floor = 1e-3 * float(np.linalg.norm(np.asarray(grads[2], np.float64)))
    for what, g, r in zip(("dq", "dk", "dv"), vjp(do), grads):
        assert g.dtype == dtype
        assert_close(g, r, tol, what, floor=floor)
    return out


def test_segments_soft_cap_gqa():
    _check(Causal(), 77, B=2, Hq=4, Hkv=2, seg=True, cap=1.5, seed=1)


def test_bf16_inputs():
    _check(Local(20, 3), 70, Hq=4, Hkv=2, seg=True, dtype=jnp.bfloat16, tol=TOL_BF16, seed=2)


@pytest.mark.parametrize("T", [1, 7])
def test_tiny_sequences(T):
    _check(Causal(), T, seed=3 + T, blocks=(8, 8))


def test_unequal_block_sizes():
    _check(Local(11, 0) | Local(0, 2), 75, blocks=(32, 16), seed=4)


def test_empty_rows_are_zero_with_finite_gradients():
    # query block 1 lists no key block; with segments some rows also lose their only keys
    mask = BlockSparse(np.array([[0], [-1], [1], [0]]), 16, 16)
    out = _check(mask, 64, seg=True, seed=5)
    assert np.all(np.asarray(out[:, 16:32]) == 0)


def test_tpu_interpret_mode():
    """Mosaic-TPU-legal tiles (128 x 128) under TPU interpret mode; unwritten outputs would be NaN."""
    _check(Causal() & Local(150, 0), 200, Hq=2, Hkv=1, D=64, seg=True, cap=5.0, blocks=(128, 128),
           interpret=pltpu.InterpretParams(uninitialized_memory="nan"), seed=6)


def test_block_maps_visit_only_needed_blocks():
    bmap = make_block_map(Local(9, 4), 300, (16, 16))
    assert bmap.fwd_index.shape == (1, 1, 19, 3) and bmap.bwd_index.shape == (1, 1, 19, 3)
    kinds = np.asarray(bmap.fwd_kind)
    assert kinds[0, 0, 0].tolist() == [1, 1, 0] and kinds[0, 0, 5].tolist() == [1, 1, 1]
    # a skipped visit repeats the last real block, so no new block is fetched for it
    assert np.asarray(bmap.fwd_index)[0, 0, 0].tolist() == [0, 1, 1]


def test_device_block_map_matches_host_and_runs_in_jit():
    T, bs = 90, 16
    kv = np.random.default_rng(7).integers(-1, 6, size=(2, 2, 6, 3))
    host = make_block_map(BlockSparse(kv, bs, bs) & Causal(), T, (bs, bs))
    device = jax.jit(lambda kv: make_block_map(BlockSparse(kv, bs, bs) & Causal(), T, (bs, bs)))(jnp.asarray(kv))
    for name in ("fwd", "bwd"):
        h_kind, d_kind = (np.asarray(getattr(m, f"{name}_kind")) for m in (host, device))
        h_idx, d_idx = (np.asarray(getattr(m, f"{name}_index")) for m in (host, device))
        w = h_kind.shape[-1]
        assert d_kind.shape[-1] >= w and np.all(d_kind[..., w:] == 0)
        assert np.array_equal(h_kind, d_kind[..., :w])
        assert np.array_equal(np.where(h_kind > 0, h_idx, -1), np.where(d_kind[..., :w] > 0, d_idx[..., :w], -1))
    q, k, v, _ = qkv(8, 2, T, 2, 2, 16)
    run = jax.jit(lambda q, k, v, kv: flash_attention(q, k, v, mask=BlockSparse(kv, bs, bs) & Causal()))
    out = run(q, k, v, jnp.asarray(kv))
    via_map = flash_attention(q, k, v, mask=host)
    ref = oracle(q, k, v, allowed_matrix(BlockSparse(kv, bs, bs) & Causal(), T, 2, 2))
    assert_close(out, ref, TOL_F32)
    assert_close(via_map, ref, TOL_F32, "prebuilt BlockMap")
    assert isinstance(host, BlockMap) and len(jax.tree_util.tree_leaves(host)) == 7


def test_dispatch_auto_and_registration(monkeypatch):
    assert ops.implementations() == ["cudnn", "mosaic_gpu", "pallas", "xla"]
    q, k, v, _ = qkv(9, 1, 20, 2, 2, 8)
    calls = []

    def fake_run(q, k, v, **kw):
        calls.append(kw["scale"])
        return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)

    monkeypatch.setitem(ops.REGISTRY._impls, "fake", Implementation("fake", fake_run, lambda *a, **kw: None, 0))
    flash_attention(q, k, v, scale=0.5)
    assert calls == [0.5]
    monkeypatch.setitem(ops.REGISTRY._impls, "fake", Implementation("fake", fake_run, lambda *a, **kw: "no", 0))
    out = flash_attention(q, k, v, mask=Full())  # falls through to pallas
    assert calls == [0.5] and np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(ValueError, match="cannot run this call: no"):
        flash_attention(q, k, v, impl="fake")
    with pytest.raises(ValueError, match="seq_len"):
        flash_attention(q, k, v, mask=make_block_map(Causal(), 21, (8, 8)))
