"""The Hopper (Mosaic GPU) kernels of the block-sparse softmax op, checked on CPU:

* forward and backward lower through Mosaic GPU for the cuda platform (layout inference,
  shared-memory budget; the compiled variant with register-operand wgmma) on every jax;
* in GPU interpret mode (``plgpu.InterpretGPUParams``, jax >= 0.12; skipped before) o and the
  gradients of q, k, v match the float64 oracle: causal, local, chunked | local, full, a
  random per-head BlockSparse with an empty query block, segments, GQA, Dv != D, T not a
  multiple of the 128 blocks, T = 1, per-(batch, head) maps; race detection with and without
  the forward's turn taking; padded query rows holding random q and dO change no gradient
  (their lse2 is +inf); the persistent forward with 1, 5 and one-per-item CTAs and partial
  L2 head groups gives o and lse2 (+inf on empty and padded rows) of the float64 oracle; the
  persistent backward kernels with 1, 5 and one-per-item CTAs give dq, dk, dv of the oracle
  (GQA, segments, padded T, empty rows; race detection on);
* the persistent kernels' item orders are permutations of the items and balance causal work;
* ``mosaic_gpu_accepts`` declines what the kernels do not support, and everything off Hopper;
  the op registers it after cuDNN, and auto dispatch on Hopper picks it where cuDNN declines.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernel_utils import TOL_BF16, assert_close
from test_sparse_utils import allowed_matrix, oracle, qkv, segments
from pallas_kernels import mosaic_gpu_common
from pallas_kernels.sparse import (BlockSparse, Causal, ChunkedCausal, Dense, Full, Local,
                                   implementations, make_block_map)
from pallas_kernels.sparse import mosaic_gpu_bwd, mosaic_gpu_fwd
from pallas_kernels.sparse import mosaic_gpu_op as mo
from pallas_kernels.sparse.mosaic_gpu_util import INTERPRET_CTAS, launch_ctas

plgpu = mosaic_gpu_common.plgpu
needs_interpreter = pytest.mark.skipif(
    plgpu is None or not hasattr(plgpu, "InterpretGPUParams"),
    reason="GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12")


def _block_sparse(seed: int, lead: tuple[int, ...], T: int) -> BlockSparse:
    """Random 128-blocks per ``lead`` = (head,) or (batch, head) (duplicates and -1 slots
    included), query block 1 empty."""
    n = -(-T // 128)
    kv = np.random.default_rng(seed).integers(-1, n, size=lead + (n, 2))
    kv[..., 1, :] = -1
    return BlockSparse(kv, 128, 128)


MASKS = {  # name -> mask(B, Hq, T)
    "causal": lambda B, Hq, T: Causal(),
    "local": lambda B, Hq, T: Local(70, 20),
    "chunked_or_local": lambda B, Hq, T: ChunkedCausal(100) | Local(5, 5),
    "full": lambda B, Hq, T: Full(),
    "block_sparse": lambda B, Hq, T: _block_sparse(T, (Hq,), T),
    "block_sparse_and_causal": lambda B, Hq, T: _block_sparse(T + 1, (B, Hq), T) & Causal(),
}


def _run(mask, seg, interpret=None, scale=None):
    return lambda q, k, v: mo.mosaic_gpu_flash_attention(
        q, k, v, mask=mask, segment_ids=seg, scale=q.shape[-1] ** -0.5 if scale is None else scale,
        interpret=interpret)


@pytest.mark.parametrize("name,D,Dv,Hq,Hkv,with_segments", [
    ("causal", 128, 128, 2, 1, False),
    ("local", 64, 128, 2, 2, True),
    ("block_sparse_and_causal", 128, 64, 4, 2, False),
])
def test_forward_and_backward_lower_for_cuda(name, D, Dv, Hq, Hkv, with_segments):
    B, T = 2, 300
    sd = jax.ShapeDtypeStruct
    mask = MASKS[name](B, Hq, T)
    args = (sd((B, T, Hq, D), jnp.bfloat16), sd((B, T, Hkv, D), jnp.bfloat16),
            sd((B, T, Hkv, Dv), jnp.bfloat16), sd((B, T), jnp.int32))

    def loss(q, k, v, seg):
        o = _run(mask, seg if with_segments else None)(q, k, v)
        return jnp.sum(o.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3  # forward, dq and dk/dv kernels


@needs_interpreter
@pytest.mark.parametrize("name,B,T,Hq,Hkv,D,Dv,with_segments", [
    ("causal", 1, 200, 2, 1, 64, 64, False),             # GQA, padded last block
    ("causal", 1, 1, 1, 1, 64, 64, False),               # T = 1
    ("local", 2, 300, 1, 1, 128, 64, True),              # Dv != D, segments
    ("chunked_or_local", 1, 130, 2, 2, 64, 128, False),  # formula of an Or, T = 128 + 2
    ("full", 2, 100, 1, 1, 64, 64, True),                # one block, padded keys, segments
    ("full", 2, 300, 2, 2, 128, 128, True),  # the H100 dk/dv failure's shape class (issue 6)
    ("block_sparse", 1, 300, 2, 1, 64, 64, False),       # per-head map, empty block, GQA
    ("block_sparse_and_causal", 2, 256, 2, 1, 64, 64, False),  # per (batch, head) map
])
def test_interpret_matches_oracle(name, B, T, Hq, Hkv, D, Dv, with_segments):
    mask = MASKS[name](B, Hq, T)
    q, k, v, do = qkv(T + D, B, T, Hq, Hkv, D, Dv, dtype=jnp.bfloat16)
    seg = segments(T, B, T) if with_segments else None
    out, vjp = jax.vjp(_run(mask, seg, plgpu.InterpretGPUParams()), q, k, v)
    want, want_grads = oracle(q, k, v, allowed_matrix(mask, T, B, Hq, seg), do=do)
    assert out.dtype == jnp.bfloat16
    assert_close(out, want, TOL_BF16, "o")
    if name == "block_sparse":
        assert np.all(np.asarray(out[:, 128:256], np.float32) == 0)  # the empty query block
    for what, got, ref, x in zip(("dq", "dk", "dv"), vjp(do), want_grads, (q, k, v)):
        assert got.dtype == x.dtype and got.shape == x.shape
        assert_close(got, ref, TOL_BF16, what)


@needs_interpreter
def test_interpret_padded_query_rows_add_nothing():
    """Full mask, segments (padded rows get id 0, the first document's), T not a multiple of the
    128 blocks, Hq = Hkv: the kernels run on padded arrays whose padded query rows hold random
    q and dO (and so a nonzero delta), as stale or unexpected memory would on a GPU. The forward
    gives those rows lse2 = +inf, so dk and dv of the real keys still match the oracle (before
    the fix these rows saw the first document with finite lse2 and leaked into its dk, dv)."""
    B, T, Tp, H, D = 1, 200, 256, 2, 64
    mask, seg = Full(), segments(T, B, T)
    q, k, v, do = qkv(T, B, Tp, H, H, D, dtype=jnp.bfloat16)  # rows >= T: the padding
    real = lambda x: x[:, :T]
    cfg, seg_p, maps = mo.walk_setup(real(q), real(k), real(v), mask=mask, segment_ids=seg,
                                     scale=D ** -0.5, interpret=plgpu.InterpretGPUParams())
    o, lse2 = mosaic_gpu_fwd.forward(cfg, q, k, v, maps[0], seg_p)
    assert np.all(np.asarray(lse2)[:, :, T:] == np.inf)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    grads = mosaic_gpu_bwd.backward(cfg, q, k, v, do, lse2, delta, maps, seg_p)
    want, want_grads = oracle(real(q), real(k), real(v), allowed_matrix(mask, T, B, H, seg),
                              do=real(do))
    assert_close(real(o), want, TOL_BF16, "o")
    for what, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(real(got), ref, TOL_BF16, what)


def _lse2_oracle(q, k, allowed: np.ndarray, T: int) -> np.ndarray:
    """float64 base-2 log-sum-exp [B, Hq, T] of the real rows' allowed logits; +inf on rows
    that see nothing (the padded rows >= T are not included)."""
    q, k = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)[:, :T] for x in (q, k))
    kr = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    s = np.where(allowed, np.einsum("bqhd,bkhd->bhqk", q, kr) * q.shape[-1] ** -0.5, -np.inf)
    m = s.max(-1)
    finite = np.isfinite(m)
    base = np.where(finite, m, 0.0)
    total = np.exp(s - base[..., None]).sum(-1)
    return np.where(finite, base + np.log(np.where(finite, total, 1.0)), np.inf) / np.log(2.0)


@pytest.mark.parametrize("blocks,heads,batch,group,ctas,balance,descending", [
    (32, 16, 8, 16, 132, 1.04, True),   # the causal anchor on an H100: 31 or 32 items per CTA
    (32, 16, 8, 16, 132, 1.04, False),  # its dk/dv kernel (key blocks, the first first)
    (8, 16, 32, 64, 132, 1.04, True),   # T = 1024
    (5, 3, 2, 4, 4, 1.2, True),         # a partial last head group
    (5, 3, 2, 4, 4, 1.2, False),
    (3, 2, 2, 3, 5, None, True),
])
def test_schedule_covers_every_item_once(blocks, heads, batch, group, ctas, balance, descending):
    """The persistent kernels' item order is a permutation of (b, h, block); on causal masks
    (query block n visits n + 1 key blocks, key block n is visited by blocks - n query blocks)
    the CTAs' work is even to within ``balance`` (max / mean), where one block per head in turn
    would give 1.125 at the anchor."""
    sched = mosaic_gpu_fwd.Schedule(blocks, heads, batch, group, ctas, descending)
    b, h, q_block = (np.asarray(x) for x in sched.coords(jnp.arange(sched.items)))
    assert len(set(zip(b.tolist(), h.tolist(), q_block.tolist()))) == sched.items
    assert b.max() < batch and h.max() < heads and q_block.min() >= 0 and q_block.max() < blocks
    counts = np.asarray([sched.count(c) for c in range(ctas)])
    assert counts.sum() == sched.items and counts.max() - counts.min() <= 1
    if balance is not None:
        length = q_block + 1 if descending else blocks - q_block
        work = np.bincount(np.arange(sched.items) % ctas, weights=length)
        assert work.max() / work.mean() <= balance


def test_launch_ctas_default_is_one_per_item_on_the_gpu():
    """Default grid (the launch measured fastest on the H100): one CTA per item compiled, a
    few CTAs walking several items each when interpreted; an override never exceeds the
    item count."""
    assert launch_ctas(False, 4096, None) == 4096
    assert launch_ctas(True, 4096, None) == INTERPRET_CTAS
    assert launch_ctas(True, 2, None) == 2
    assert launch_ctas(False, 4096, 132) == 132
    assert launch_ctas(False, 7, 10**9) == 7


@needs_interpreter
@pytest.mark.parametrize("ctas,D,Dv", [(1, 64, 64), (5, 64, 128), (10**6, 128, 64)])
def test_interpret_persistent_grid(ctas, D, Dv, monkeypatch):
    """The forward's persistent launch with 1 CTA (every item in one CTA: the k/v ring and
    the two q buffers carried across 12 items), 5 (uneven shares) and one CTA per item, heads
    in L2 groups of 3 (and a last one of 1): o and lse2 match the float64 oracle on a
    per-(batch, head) block-sparse & causal map (items of 0 to 3 visits, an empty query
    block), segments, GQA, T = 300 (padded rows get lse2 = +inf, as do rows that see
    nothing)."""
    B, T, Tp, Hq, Hkv = 2, 300, 384, 2, 1
    monkeypatch.setattr(mosaic_gpu_fwd, "CTAS", ctas)
    monkeypatch.setattr(mosaic_gpu_fwd, "L2_BYTES", Tp * (D + Dv) * 3)  # 1.5 k/v heads
    mask, seg = MASKS["block_sparse_and_causal"](B, Hq, T), segments(T + 3, B, T)
    q, k, v = qkv(ctas + D, B, Tp, Hq, Hkv, D, Dv, dtype=jnp.bfloat16)[:3]
    real = lambda x: x[:, :T]
    cfg, seg_p, maps = mo.walk_setup(real(q), real(k), real(v), mask=mask, segment_ids=seg,
                                     scale=D ** -0.5, interpret=plgpu.InterpretGPUParams())
    sched = mosaic_gpu_fwd.schedule(cfg, 3, Hq, B, Tp * (D + Dv) * 2)
    assert (sched.group, sched.ctas) == (3, min(ctas, 3 * Hq * B))
    o, lse2 = mosaic_gpu_fwd.forward(cfg, q, k, v, maps[0], seg_p)
    allowed = allowed_matrix(mask, T, B, Hq, seg)
    assert_close(real(o), oracle(real(q), real(k), real(v), allowed), TOL_BF16, "o")
    lse2 = np.asarray(lse2, np.float64)
    want = _lse2_oracle(q, k, allowed, T)
    assert np.all(np.isinf(lse2[:, :, T:]) & (lse2[:, :, T:] > 0))
    assert np.array_equal(np.isinf(lse2[:, :, :T]), np.isinf(want))
    assert np.isinf(want).any() and np.isfinite(want).any()
    finite = np.isfinite(want)
    np.testing.assert_allclose(lse2[:, :, :T][finite], want[finite], atol=2e-3)


@needs_interpreter
@pytest.mark.parametrize("ctas,D,Dv", [(1, 64, 64), (5, 64, 128), (10**6, 128, 64)])
def test_interpret_persistent_backward(ctas, D, Dv, monkeypatch):
    """Both persistent backward kernels with 1 CTA (dq: 24 items, dk/dv: 12, the ring and the
    resident tiles reloaded across all of them), 5 (uneven shares) and one CTA per item, dk/dv's
    k/v heads in L2 groups of 3 and 1, with race detection (the forward runs without it: with
    segments and refilled ring slots the detector flags its k-ring segment ids, also before
    its persistent change): dq, dk, dv match the float64 oracle on a per-(batch, head)
    block-sparse & causal map (items of 0 to 3 visits, an empty query block), segments, GQA
    over two k/v heads (the dk/dv walk over each group's two q heads), T = 300 with random q
    and dO in the padded rows (the dk/dv walk's missing key bound)."""
    B, T, Tp, Hq, Hkv = 2, 300, 384, 4, 2
    monkeypatch.setattr(mosaic_gpu_bwd, "CTAS", ctas)
    monkeypatch.setattr(mosaic_gpu_bwd, "L2_BYTES", 3 * Tp * (4 * (D + Dv) + 16))
    mask, seg = MASKS["block_sparse_and_causal"](B, Hq, T), segments(T + 5, B, T)
    q, k, v, do = qkv(ctas + D + 1, B, Tp, Hq, Hkv, D, Dv, dtype=jnp.bfloat16)
    real = lambda x: x[:, :T]
    cfg, seg_p, maps = mo.walk_setup(real(q), real(k), real(v), mask=mask, segment_ids=seg,
                                     scale=D ** -0.5, interpret=plgpu.InterpretGPUParams())
    dq_sched, dkv_sched = mosaic_gpu_bwd.schedules(cfg, Tp, Hq, Hkv, B, D, Dv, 2)
    assert (dq_sched.items, dq_sched.group, dq_sched.ctas) == (24, 8, min(ctas, 24))
    assert (dkv_sched.items, dkv_sched.group, dkv_sched.ctas) == (12, 3, min(ctas, 12))
    o, lse2 = mosaic_gpu_fwd.forward(cfg, q, k, v, maps[0], seg_p)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    racy = dataclasses.replace(cfg, interpret=plgpu.InterpretGPUParams(detect_races=True))
    grads = mosaic_gpu_bwd.backward(racy, q, k, v, do, lse2, delta, maps, seg_p)
    want_grads = oracle(real(q), real(k), real(v), allowed_matrix(mask, T, B, Hq, seg),
                        do=real(do))[1]
    for what, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(real(got), ref, TOL_BF16, what)


@needs_interpreter
@pytest.mark.parametrize("pingpong", [True, False])
def test_interpret_has_no_races(pingpong, monkeypatch):
    """Forward and backward with race detection on (two visits per block row: ring reuse),
    with and without the forward consumers' turn taking."""
    monkeypatch.setattr(mosaic_gpu_fwd, "PINGPONG", pingpong)
    T, mask = 384, Causal()
    q, k, v, do = qkv(7, 1, T, 2, 1, 64, 64, dtype=jnp.bfloat16)
    run = _run(mask, None, plgpu.InterpretGPUParams(detect_races=True))
    out, vjp = jax.vjp(run, q, k, v)
    grads = vjp(do)
    want, want_grads = oracle(q, k, v, allowed_matrix(mask, T, 1, 2), do=do)
    assert_close(out, want, TOL_BF16, "o")
    for what, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(got, ref, TOL_BF16, what)


def test_accepts_declines_unsupported_calls(monkeypatch):
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    kw = dict(mask=Causal(), segment_ids=None, logits_soft_cap=None, block_sizes=None)
    reason = mo.mosaic_gpu_accepts(q, q, q, **kw)
    assert reason is not None and "Hopper" in reason  # this machine has no Hopper GPU
    monkeypatch.setattr(mosaic_gpu_common, "is_hopper", lambda: True)
    accepts = lambda *a, **over: mo.mosaic_gpu_accepts(*(a or (q, q, q)), **{**kw, **over})
    assert accepts() is None
    assert accepts(segment_ids=jnp.zeros((1, 256), jnp.int32)) is None
    assert accepts(mask=_block_sparse(0, (2,), 256) & Local(100, 0)) is None
    assert accepts(mask=make_block_map(Causal(), 256, (128, 128))) is None
    assert accepts(block_sizes=(128, 128)) is None
    assert "soft cap" in accepts(logits_soft_cap=30.0)
    assert "bfloat16" in accepts(q.astype(jnp.float32), q, q)
    assert "head dim" in accepts(q[..., :32], q[..., :32], q)
    assert "value head dim" in accepts(q, q, q[..., :96])
    assert "block_sizes" in accepts(block_sizes=(64, 64))
    assert "tile" in accepts(mask=Dense(np.tril(np.ones((256, 256), bool))))
    assert "tile" in accepts(mask=BlockSparse(np.zeros((4, 1), np.int32), 64, 64))
    assert "block sizes" in accepts(mask=make_block_map(Causal(), 256, (64, 64)))
    assert "seq_len" in accepts(mask=make_block_map(Causal(), 200, (128, 128)))


def test_registered_after_cudnn():
    names = implementations()
    assert names.index("cudnn") < names.index("mosaic_gpu") < names.index("pallas")


def test_auto_picks_the_hopper_kernel_where_cudnn_declines(monkeypatch):
    """On Hopper ("sparse" is GPU-checked) auto dispatch runs this kernel for what cuDNN lacks
    (packed segments here; cuDNN also declines off an NVIDIA GPU) and keeps cuDNN's place first."""
    from pallas_kernels.sparse.ops import REGISTRY
    monkeypatch.setattr(mosaic_gpu_common, "is_hopper", lambda: True)
    assert "sparse" in mosaic_gpu_common.GPU_CHECKED
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    kw = dict(mask=Full(), segment_ids=jnp.zeros((1, 256), jnp.int32), scale=0.1,
              logits_soft_cap=None, block_sizes=None)
    assert REGISTRY.choose(None, q, q, q, **kw).name == "mosaic_gpu"
    assert REGISTRY.choose(None, q, q, q, **{**kw, "logits_soft_cap": 30.0}).name != "mosaic_gpu"
