"""The Hopper (Mosaic GPU) kernels of the (gated) delta rule, checked on CPU:

* the WY prepass kernel lowers for cuda (also with ``for_backward``, as the forward under the
  vjp runs it), and in interpret mode its T diag(β) matches a float64 per-chunk inverse, also
  for strongly correlated keys without decay (where a power series for (I + A)^-1 loses all
  precision); with ``for_backward`` its T = (I + A)^-1 and W = T diag(β Γ) k match float64
  and its T diag(β) is bit for bit the plain prepass's;
* both walks (forward; reverse, the state cotangent) lower through Mosaic GPU for the cuda
  platform (layouts, shared-memory budget) on every supported jax, no GPU needed, and so does
  the op's forward + backward;
* in GPU interpret mode (``plgpu.InterpretGPUParams``, jax >= 0.12; skipped before) the op's
  output and final state match the float64 step-by-step oracle (race detection on, padded last
  chunk, K != V, one and two warpgroups per CTA (``default_groups``), with and without g,
  initial state, segments, T = 1), and its gradients of q, k, v, beta, g and the initial
  state (output and final-state cotangents) match autodiff of the oracle;
* the chunk-gradient kernel of the backward lowers for cuda, and in interpret mode (with the
  prepass's T, T diag(β)) matches ``chunk_math.backward`` in float64 (segment resets, strongly
  correlated keys, K != V);
* ``mosaic_gpu_accepts`` declines what the kernels do not support, and everything off Hopper.
"""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernel_utils import TOL_BF16, assert_close, log_gate, normal, random_segments
from pallas_kernels import mosaic_gpu_common
from pallas_kernels.delta import chunk_math
from pallas_kernels.delta import mosaic_gpu as mg
from pallas_kernels.delta import mosaic_gpu_kernel as mk
from pallas_kernels.delta import mosaic_gpu_ws as ws
from pallas_kernels.delta.mosaic_gpu_grads import chunk_grads
from pallas_kernels.delta.mosaic_gpu_prepass import prepass
from pallas_kernels.delta.reference import delta_rule_reference

plgpu = mosaic_gpu_common.plgpu
needs_interpreter = pytest.mark.skipif(
    plgpu is None or not hasattr(plgpu, "InterpretGPUParams"),
    reason="GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12")
needs_transposed_tiles = pytest.mark.skipif(
    plgpu is None or not mosaic_gpu_common.transposes_swizzled_tiles(),
    reason="the forward walk reads swizzled tiles transposed: jax >= 0.11")
NAMES = ("q", "k", "v", "beta", "g", "s0")
_ws_launch = ws.launch


def _inputs(seed, B, T, H, K, V, gated, init, segments):
    """bf16 q, k (L2-normalised rows), v; float32 beta in (0.1, 0.9), g, s0; segment ids."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = normal(ks[1], (B, T, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = normal(ks[2], (B, T, H, V), jnp.bfloat16)
    beta = jax.random.uniform(ks[3], (B, T, H), jnp.float32, 0.1, 0.9)
    g = log_gate(ks[4], (B, T, H), -0.5, -0.01) if gated else None
    s0 = normal(ks[5], (B, H, K, V)) if init else None
    seg = random_segments(ks[6], B, T) if segments else None
    return (q, k, v, beta, g, s0), seg


def _kernel_op(scale, segment_ids, interpret, pieces=None):
    return lambda q, k, v, beta, g, s0: mg.mosaic_gpu_chunk_delta_rule(
        q, k, v, beta, g, scale=scale, initial_state=s0, segment_ids=segment_ids,
        chunk_size=None, interpret=interpret, pieces=pieces)


def _oracle_op(scale, segment_ids):
    return lambda q, k, v, beta, g, s0: delta_rule_reference(
        q, k, v, beta, g, scale=scale, initial_state=s0, segment_ids=segment_ids)


def _f64(x):
    return None if x is None else jnp.asarray(np.asarray(x, np.float64))


@pytest.mark.parametrize("K,V,gated,reverse,save_states,with_s0", [
    # two warpgroups, states saved for the backward
    pytest.param(128, 128, True, False, True, True, marks=needs_transposed_tiles),
    (128, 128, True, True, True, True),     # the reverse walk as the backward runs it
    pytest.param(64, 128, False, False, False, False, marks=needs_transposed_tiles),  # K != V
    (128, 64, True, True, False, False),    # one warpgroup
])
def test_walk_lowers_for_cuda(K, V, gated, reverse, save_states, with_s0):
    B, T, H = 2, 256, 3
    sd = jax.ShapeDtypeStruct
    m = sd((B, T, H, K if reverse else mk.CHUNK), jnp.bfloat16)  # W or T_beta
    args = ((sd((B, T, H, K), jnp.bfloat16),) * 2 + (m, sd((B, T, H, V), jnp.bfloat16),
            sd((B, H, T), jnp.float32) if gated else None,
            sd((B, H, K, V), jnp.float32) if with_s0 else None))
    run = jax.jit(lambda q, k, m, x, b, s0: mk.walk(q, k, m, x, b, s0, scale=0.1,
                                                    reverse=reverse, save_states=save_states))
    text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("K,V,gated,reverse", [
    pytest.param(128, 128, True, False, marks=needs_transposed_tiles),  # two warpgroups
    pytest.param(64, 128, False, False, marks=needs_transposed_tiles),  # 192 columns: one
    (128, 64, True, True)])
def test_piece_maps_lower_for_cuda(K, V, gated, reverse):
    B, T, H = 8, 256, 3
    sd = jax.ShapeDtypeStruct
    args = ((sd((B, T, H, K), jnp.bfloat16),) * 2
            + (sd((B, T, H, K if reverse else mk.CHUNK), jnp.bfloat16),
               sd((B, T, H, V), jnp.bfloat16), sd((B, H, T), jnp.float32) if gated else None))
    run = jax.jit(lambda *a: mk.piece_maps(*a, scale=0.1, reverse=reverse))
    text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("K,gated,for_backward", [
    (128, True, False), (128, True, True), (64, False, True)])
def test_prepass_lowers_for_cuda(K, gated, for_backward):
    B, T, H = 2, 256, 3
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, H, T), jnp.float32),
            sd((B, H, T), jnp.float32) if gated else None)
    run = jax.jit(lambda *a: prepass(*a, for_backward=for_backward))
    text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _chunks(k):
    """(batch row, head, time slice) of every chunk of k [B, Tp, H, *]."""
    C = mk.CHUNK
    return [(bi, h, slice(n * C, (n + 1) * C))
            for bi, h, n in np.ndindex(k.shape[0], k.shape[2], k.shape[1] // C)]


def _inverse_float64(k, beta, b):
    """T = (I + A)^-1 of every chunk by a float64 matrix inverse, [B, Tp, H, C] (chunk n's in
    rows n C ..), from k [B, Tp, H, K], beta, b [B, H, Tp] (b None: no gate)."""
    k, beta = np.asarray(k, np.float64), np.asarray(beta, np.float64)
    b = np.zeros(beta.shape) if b is None else np.asarray(b, np.float64)
    T = np.zeros(k.shape[:3] + (mk.CHUNK,))
    for bi, h, t in _chunks(k):
        kc, bc, gc = k[bi, t, h], beta[bi, h, t], b[bi, h, t]
        A = np.tril(bc[:, None] * (kc @ kc.T) * np.exp(gc[:, None] - gc[None, :]), -1)
        T[bi, t, h] = np.linalg.inv(np.eye(mk.CHUNK) + A)
    return T


def _beta_cols(beta, C):
    """beta [B, H, Tp] as the column factor of every chunk's [C, C] matrix: [B, Tp, H, C]."""
    B, H, Tp = beta.shape
    cols = np.asarray(beta, np.float64).reshape(B, H, Tp // C, 1, C)
    return np.moveaxis(np.broadcast_to(cols, (B, H, Tp // C, C, C)).reshape(B, H, Tp, C), 1, 2)


def _w_float64(T, k, beta, b):
    """W = T diag(β Γ) k of every chunk in float64 (T [B, Tp, H, C], k [B, Tp, H, K])."""
    k, beta = np.asarray(k, np.float64), np.asarray(beta, np.float64)
    b = np.zeros(beta.shape) if b is None else np.asarray(b, np.float64)
    W = np.zeros(k.shape)
    for bi, h, t in _chunks(k):
        W[bi, t, h] = T[bi, t, h] @ ((beta[bi, h, t] * np.exp(b[bi, h, t]))[:, None] * k[bi, t, h])
    return W


def _prepass_inputs(seed, K, gated, shared):
    """k (L2-normalised, ``shared``: weight of a direction common to every key; 3: pairwise
    cosines ~0.9), beta in (0.1, 0.9) and b (chunk cumsum of log gates, or None)."""
    B, Tp, H = 1, 128, 2
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    k = normal(ks[0], (B, Tp, H, K)) + shared * normal(ks[1], (1, 1, 1, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    beta = jax.random.uniform(ks[2], (B, H, Tp), jnp.float32, 0.1, 0.9)
    b = mg.gate_cumsum(log_gate(ks[3], (B, Tp, H), -0.5, -0.01)) if gated else None
    return k, beta, b


@needs_interpreter
@pytest.mark.parametrize("K,gated,shared", [(128, True, 0.0), (64, False, 3.0)])
def test_interpret_prepass_matches_float64_inverse(K, gated, shared):
    """The plain prepass (race detection on): T diag(β) of every chunk against a float64
    inverse, also for strongly correlated keys (``shared`` = 3)."""
    k, beta, b = _prepass_inputs(K, K, gated, shared)
    (t_beta,) = prepass(k, beta, b, interpret=plgpu.InterpretGPUParams(detect_races=True))
    want = _inverse_float64(k, beta, b) * _beta_cols(beta, mk.CHUNK)
    assert t_beta.dtype == k.dtype and t_beta.shape == want.shape
    assert_close(t_beta, want, 1e-2, "T diag(beta)")


@needs_interpreter
@pytest.mark.parametrize("K,gated,shared", [(128, True, 0.0), (64, False, 3.0)])
def test_interpret_prepass_for_backward(K, gated, shared):
    """The prepass under the vjp (``for_backward``, race detection on): its T = (I + A)^-1 and
    W = T diag(β Γ) k per chunk, which the backward reads, match float64, also for strongly
    correlated keys; its T diag(β) is bit for bit the plain prepass's."""
    k, beta, b = _prepass_inputs(K + 1, K, gated, shared)
    interpret = plgpu.InterpretGPUParams(detect_races=True)
    t_beta, w, t = prepass(k, beta, b, for_backward=True, interpret=interpret)
    (plain,) = prepass(k, beta, b, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(t_beta, np.float32), np.asarray(plain, np.float32))
    want = _inverse_float64(k, beta, b)
    assert t.dtype == w.dtype == k.dtype and t.shape == want.shape and w.shape == k.shape
    assert_close(t, want, 1e-2, "T")
    assert_close(w, _w_float64(want, k, beta, b), 1e-2, "W")


def _loss(run, do, dstate):
    """sum(o * do) + sum(final state * dstate): exercises both cotangents."""
    def loss(*args):
        o, s = run(*args)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(do.dtype) * dstate)
    return loss


@needs_transposed_tiles
@pytest.mark.parametrize("K,V,gated,pieces", [(128, 128, True, 1), (64, 128, False, 1),
                                              (128, 128, True, 4)])
def test_backward_lowers_for_cuda(K, V, gated, pieces):
    B, T, H = 1, 200 * pieces, 2
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, T, H), jnp.float32),
            sd((B, T, H), jnp.float32) if gated else None, sd((B, H, K, V), jnp.float32))
    do, dstate = jnp.ones((B, T, H, V)), jnp.ones((B, H, K, V))
    grads = jax.jit(jax.grad(_loss(_kernel_op(0.1, None, None, pieces), do, dstate),
                             argnums=(0, 1, 2, 3, 5) + ((4,) if gated else ())))
    text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # the forward and the reverse walk (and with pieces their map passes)
    assert text.count("mosaic_gpu") >= (2 if pieces == 1 else 4)


def _force_two_warpgroups(monkeypatch):
    """Make ``default_groups`` pick two warpgroups per CTA (V = 128) at the tests' small B·H."""
    monkeypatch.setattr(mk, "num_sms", lambda: 1)


def test_default_groups():
    """Two warpgroups per CTA (V = 128) unless one CTA per V block fits in one wave of SMs."""
    sms = mosaic_gpu_common.num_sms()
    assert mk.default_groups(sms, 128) == 2          # the anchor: B·H = 128, 256 V blocks
    assert mk.default_groups(sms // 2, 128) == 1     # long T, small B: one V block per CTA
    assert mk.default_groups(4 * sms, 64) == 1       # V = 64 has one block


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gated,init,segments,two_wgs", [
    (2, 150, 2, 128, 128, True, False, False, True),   # two warpgroups, padded last chunk
    (1, 130, 2, 128, 128, True, False, False, False),  # one CTA per V block (small B·H)
    (1, 100, 1, 64, 128, False, True, False, True),    # no gate, initial state, K != V
    (1, 200, 1, 128, 64, True, True, True, False),     # V = 64, segments
    (1, 1, 1, 64, 64, True, True, False, False),       # T = 1
])
def test_interpret_matches_oracle(B, T, H, K, V, gated, init, segments, two_wgs, monkeypatch):
    if two_wgs:
        _force_two_warpgroups(monkeypatch)
    args, seg = _inputs(T, B, T, H, K, V, gated, init, segments)
    scale = K ** -0.5
    o, s = _kernel_op(scale, seg, plgpu.InterpretGPUParams(detect_races=True))(*args)
    with jax.enable_x64(True):
        ro, rs = (np.asarray(x) for x in _oracle_op(scale, seg)(*map(_f64, args)))
    assert o.dtype == jnp.bfloat16 and o.shape == ro.shape
    assert s.dtype == jnp.float32 and s.shape == rs.shape
    assert_close(o, ro, TOL_BF16, "o")
    assert_close(s, rs, TOL_BF16, "final state")


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gated,init,segments,two_wgs", [
    (1, 150, 2, 64, 128, True, True, False, True),    # K != V, gated, initial state
    (1, 100, 1, 128, 64, False, False, True, False),  # DeltaNet, segments, one warpgroup
    (1, 1, 1, 64, 64, True, False, False, False),     # T = 1
])
def test_interpret_gradients_match_oracle(B, T, H, K, V, gated, init, segments, two_wgs,
                                          monkeypatch):
    """dq, dk, dv, dbeta, dg, d initial state of the Mosaic GPU backward against autodiff of
    the float64 step-by-step oracle (both walks with two warpgroups per CTA where
    ``two_wgs``)."""
    if two_wgs:
        _force_two_warpgroups(monkeypatch)
    args, seg = _inputs(T + 7, B, T, H, K, V, gated, init, segments)
    kd, ks = jax.random.split(jax.random.PRNGKey(T), 2)
    do, dstate = normal(kd, (B, T, H, V)), normal(ks, (B, H, K, V))
    argnums = tuple(i for i, x in enumerate(args) if x is not None)
    got = jax.grad(_loss(_kernel_op(0.125, seg, plgpu.InterpretGPUParams()), do, dstate),
                   argnums)(*args)
    with jax.enable_x64(True):
        want = jax.grad(_loss(_oracle_op(0.125, seg), _f64(do), _f64(dstate)), argnums)(
            *map(_f64, args))
        want = [np.asarray(w) for w in want]
    for i, a, b in zip(argnums, got, want):
        assert a.dtype == args[i].dtype and a.shape == b.shape
        assert_close(a, b, TOL_BF16, f"d{NAMES[i]}")


def test_pieces_for():
    """The sequence is split only at few CTAs (B·H·V/64 <= 32), into 4..8 pieces that keep
    the walk's CTAs within the SM count and at least MIN_PIECE_CHUNKS chunks each."""
    sms = mosaic_gpu_common.num_sms()
    assert mg.pieces_for(64, 4096) == 1          # T = 16k, B = 2, H = 16: no split
    assert mg.pieces_for(32, 16) == 1            # too short for 4 pieces of 16 chunks
    if sms >= 128:
        assert mg.pieces_for(32, 1024) == 4      # T = 64k, B = 1, H = 16 (132 SMs)
        assert mg.pieces_for(16, 1024) == 8      # 8 heads
        assert mg.pieces_for(16, 64) == 4        # 4 pieces of 16 chunks


@needs_interpreter
@pytest.mark.parametrize("K,V,gated,init,segments,two_wgs", [
    (64, 64, True, True, True, True),      # map pass: identity columns in warpgroup 1
    (64, 128, False, False, False, False), # 192 carried columns, one warpgroup per CTA
])
def test_interpret_sequence_split_matches_oracle(K, V, gated, init, segments, two_wgs,
                                                 monkeypatch):
    """The op split into 4 pieces (2 chunks each, the last padded): output, final state and
    every gradient against the float64 oracle."""
    if two_wgs:
        _force_two_warpgroups(monkeypatch)
    B, T, H = 1, 300, 1
    args, seg = _inputs(T + K, B, T, H, K, V, gated, init, segments)
    if gated:  # weak decay, so that the state entering each piece matters
        args = args[:4] + (args[4] * 0.05,) + args[5:]
    kd, ks = jax.random.split(jax.random.PRNGKey(K + V), 2)
    do, dstate = normal(kd, (B, T, H, V)), normal(ks, (B, H, K, V))
    _assert_op_and_gradients(_kernel_op(0.125, seg, plgpu.InterpretGPUParams(), pieces=4),
                             _oracle_op(0.125, seg), args, do, dstate)


def _assert_op_and_gradients(op, oracle, args, do, dstate):
    """op's output, final state and gradients of every given input (cotangents do, dstate)
    against the float64 oracle's."""
    argnums = tuple(i for i, x in enumerate(args) if x is not None)
    (o, s), got = op(*args), jax.grad(_loss(op, do, dstate), argnums)(*args)
    with jax.enable_x64(True):
        ro, rs = oracle(*map(_f64, args))
        want = jax.grad(_loss(oracle, _f64(do), _f64(dstate)), argnums)(*map(_f64, args))
    assert_close(o, np.asarray(ro), TOL_BF16, "o")
    assert_close(s, np.asarray(rs), TOL_BF16, "final state")
    for i, a, b in zip(argnums, got, want):
        assert_close(a, np.asarray(b), TOL_BF16, f"d{NAMES[i]}")


@needs_transposed_tiles
@pytest.mark.parametrize("gated,save_states", [(True, True), (False, False)])
def test_warp_specialized_forward_lowers_for_cuda(gated, save_states, monkeypatch):
    """The two-warpgroup forward (``mosaic_gpu_ws``) at K = V = 128, one V block per CTA."""
    monkeypatch.setattr(mk, "WARP_SPECIALIZED", True)
    B, T, H, K, V = 1, 256, 2, 128, 128
    sd = jax.ShapeDtypeStruct
    args = ((sd((B, T, H, K), jnp.bfloat16),) * 2 + (sd((B, T, H, mk.CHUNK), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, H, T), jnp.float32) if gated else None,
            sd((B, H, K, V), jnp.float32)))
    run = jax.jit(lambda *a: mk.walk(*a, scale=0.1, save_states=save_states, groups=1))
    text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@needs_interpreter
@pytest.mark.parametrize("K,V,gated,init,segments", [
    (128, 128, True, True, True),      # two CTAs per head, initial state, segments
    (64, 64, False, False, False),     # DeltaNet, K = V = 64
])
def test_interpret_warp_specialized_matches_oracle(K, V, gated, init, segments, monkeypatch):
    """The two-warpgroup forward (``WARP_SPECIALIZED``): output, final state and, through the
    forward under the vjp that saves the states, every gradient against the float64 oracle."""
    monkeypatch.setattr(mk, "WARP_SPECIALIZED", True)
    launches = []
    monkeypatch.setattr(ws, "launch", lambda *a: launches.append(a[0]) or _ws_launch(*a))
    B, T, H = 1, 200, 1
    args, seg = _inputs(T + V, B, T, H, K, V, gated, init, segments)
    kd, ks = jax.random.split(jax.random.PRNGKey(K), 2)
    do, dstate = normal(kd, (B, T, H, V)), normal(ks, (B, H, K, V))
    _assert_op_and_gradients(_kernel_op(0.125, seg, plgpu.InterpretGPUParams(detect_races=True)),
                             _oracle_op(0.125, seg), args, do, dstate)
    assert [c.save_states for c in launches] == [False, True]  # both forwards ran it


def test_accepts_declines_unsupported_calls():
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    beta = jnp.zeros((1, 64, 1), jnp.float32)
    kw = dict(chunk_size=None, initial_state=None, segment_ids=None, scale=0.1)
    reason = mg.mosaic_gpu_accepts(q, q, q, beta, None, **kw)
    assert reason is not None and "Hopper" in reason  # this machine has no Hopper GPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mosaic_gpu_common, "is_hopper", lambda: True)
        mp.setattr(mg, "transposes_swizzled_tiles", lambda: False)
        assert "jax >= 0.11" in mg.mosaic_gpu_accepts(q, q, q, beta, beta, **kw)
        mp.setattr(mg, "transposes_swizzled_tiles", lambda: True)
        assert mg.mosaic_gpu_accepts(q, q, q, beta, beta, **kw) is None
        assert mg.mosaic_gpu_accepts(
            q, q, q, beta, None, **{**kw, "segment_ids": jnp.zeros((1, 64), jnp.int32),
                                    "initial_state": jnp.zeros((1, 1, 128, 128))}) is None
        assert "chunk_size" in mg.mosaic_gpu_accepts(q, q, q, beta, None,
                                                     **{**kw, "chunk_size": 32})
        assert "bfloat16" in mg.mosaic_gpu_accepts(q.astype(jnp.float32), q, q, beta, None, **kw)
        assert "key dim" in mg.mosaic_gpu_accepts(q[..., :32], q[..., :32], q, beta, None, **kw)
        assert "value dim" in mg.mosaic_gpu_accepts(q, q, q[..., :96], beta, None, **kw)


def _grads_inputs(seed, B, Tp, H, K, V, gated, shared, resets):
    """Fresh random per-chunk inputs of the chunk-gradient kernel: bf16 q, k (L2-normalised,
    ``shared`` the weight of one direction common to all keys), v, dO and any bf16 entering
    states S / leaving-state cotangents dS1 [B, N, H, K, V]; beta [B, H, Tp] float32; b the
    chunk-local cumulative log gate with segment-start gates of -80 where ``resets``."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    N = Tp // mk.CHUNK
    q = normal(ks[0], (B, Tp, H, K), jnp.bfloat16)
    k = normal(ks[1], (B, Tp, H, K)) + shared * normal(ks[2], (1, 1, 1, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v, do = (normal(ks[i], (B, Tp, H, V), jnp.bfloat16) for i in (3, 4))
    s, ds = (normal(ks[i], (B, N, H, K, V), jnp.bfloat16) for i in (5, 6))
    beta = jax.random.uniform(ks[7], (B, H, Tp), jnp.float32, 0.1, 0.9)
    b = None
    if gated:
        g = log_gate(ks[8], (B, Tp, H), -0.5, -0.01)
        if resets:
            g = jnp.where(jax.random.bernoulli(ks[9], 0.05, g.shape), mg.RESET_LOG_GATE, g)
        b = mg.gate_cumsum(g)
    return q, k, v, beta, b, s, do, ds


def _chunk_backward_float64(q, k, v, beta, b, s, do, ds, scale):
    """``chunk_math.backward`` in float64 on every chunk, and W of the forward (float64,
    rounded to bf16 as the forward saves it). Returns (W, dq, dk, dv, dbeta, db_col, db_row)
    in the kernel's layouts."""
    B, Tp, H, K = k.shape
    C, N = mk.CHUNK, Tp // mk.CHUNK
    with jax.enable_x64(True):
        chunks = lambda x: jnp.moveaxis(_f64(x).reshape(B, N, C, H, -1), 3, 1)  # [B,H,N,C,D]
        unchunk = lambda x: np.asarray(jnp.moveaxis(x, 1, 3).reshape(B, Tp, H, -1))
        vec = lambda x: np.asarray(x).reshape(B, H, Tp)
        per_chunk = lambda x: _f64(x).reshape(B, H, N, C, 1)
        gates = chunk_math.Gates(None, None, None, None) if b is None else chunk_math.Gates(
            per_chunk(b), _f64(b).reshape(B, H, N, 1, C), None, None)
        over = lambda fn: jax.vmap(jax.vmap(jax.vmap(fn)))
        w = over(lambda k, beta, gates: chunk_math.prepare(k, k, beta, gates).W)(
            chunks(k), per_chunk(beta), gates)
        heads_first = lambda x: jnp.moveaxis(_f64(x), 1, 2)  # [B, N, H, ...] -> [B, H, N, ...]
        dq, dk, dv, dbeta, db_col, db_row, _ = over(chunk_math.backward)(
            chunks(q), chunks(k), chunks(v), per_chunk(beta), gates, heads_first(s),
            scale * chunks(do), heads_first(ds))
        return (unchunk(w).astype(jnp.bfloat16), unchunk(dq), unchunk(dk), unchunk(dv),
                vec(dbeta), vec(db_col), vec(db_row))


@pytest.mark.parametrize("K,V,gated", [(128, 128, True), (64, 64, False), (64, 128, True)])
def test_grads_kernel_lowers_for_cuda(K, V, gated):
    B, Tp, H = 2, 128, 3
    sd = jax.ShapeDtypeStruct
    ck, cv = sd((B, Tp, H, K), jnp.bfloat16), sd((B, Tp, H, V), jnp.bfloat16)
    vec, states = sd((B, H, Tp), jnp.float32), sd((B, Tp // mk.CHUNK, H, K, V), jnp.bfloat16)
    inverse = sd((B, Tp, H, mk.CHUNK), jnp.bfloat16)
    args = (ck, ck, cv, ck, inverse, inverse, vec, vec if gated else None, states, cv, states)
    run = jax.jit(lambda *a: chunk_grads(*a, scale=0.1))
    text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@needs_interpreter
@pytest.mark.parametrize("K,V,gated,shared,resets,tol", [
    (128, 128, True, 0.0, True, 1e-2),        # segment resets (log gates of -80)
    (64, 128, False, 3.0, False, TOL_BF16),   # DeltaNet, keys' cosines ~0.9, K != V
    (128, 64, True, 1.0, False, 1e-2),        # K != V the other way
])
def test_interpret_grads_kernel_matches_float64(K, V, gated, shared, resets, tol):
    """The chunk-gradient kernel alone (race detection on) against ``chunk_math.backward`` in
    float64 on the same bf16 inputs (bf16 operands, float32 accumulation): errors 1.5e-3 to
    3.5e-3, so within 1e-2; with strongly correlated keys T = (I + A)^-1 has large entries and
    its bf16 copy gives dv, dβ ~9e-3, so that case gets TOL_BF16."""
    B, Tp, H = 1, 128, 2
    q, k, v, beta, b, s, do, ds = _grads_inputs(K + V + int(shared), B, Tp, H, K, V, gated,
                                                shared, resets)
    scale = K ** -0.5
    w, *want = _chunk_backward_float64(q, k, v, beta, b, s, do, ds, scale)
    interpret = plgpu.InterpretGPUParams(detect_races=True)
    t_beta, _, t = prepass(k, beta, b, for_backward=True, interpret=interpret)
    got = chunk_grads(q, k, v, w, t, t_beta, beta, b, s, do, ds, scale=scale,
                      interpret=interpret)
    names = ("dq", "dk", "dv", "dbeta") + (("db_col", "db_row") if gated else ())
    assert len(got) == len(names)
    for name, a, ref, like in zip(names, got, want, (q, k, v, beta, b, b)):
        assert a.dtype == like.dtype and a.shape == ref.shape, name
        assert_close(a, ref, tol, name)
