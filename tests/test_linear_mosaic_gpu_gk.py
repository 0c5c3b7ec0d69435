"""The Hopper (Mosaic GPU) kernel of the per-channel-gate (GLA) linear recurrence, checked on CPU:

* the walk kernel and the whole op (forward and backward) lower through Mosaic GPU for the cuda
  platform (layout inference, shared-memory budget) on every supported jax, no GPU needed;
* in GPU interpret mode (``plgpu.InterpretGPUParams``, jax >= 0.12; skipped before, race
  detection on), o and the final state against the float64 step-by-step oracle: T not a
  multiple of the chunk, K != V both ways, g and gk together, an initial state, segments,
  strong gates (down to -20 per step and channel), T = 1, the sequence split into pieces (made
  to happen at small T by lowering ``mosaic_gpu.MIN_PIECE_CHUNKS``);
* the backward (three more walks, see ``mosaic_gpu_gk._backward``): dq, dk, dv, dgk, dg and the
  initial state's gradient against autodiff of the oracle, with output and final-state
  cotangents; the gate gradients to a tighter bound than the bf16 one (the hi + lo walks);
* the prepass's bisection in float32 XLA (``gla_prepass_xla``, the kernels' reference): the
  bisection-anchored intra-chunk scores, q~ and k^ against a float64 oracle with strong gates
  (steps of -30, segment resets of -80, mild gates on other channels), from bf16 and float32
  inputs, and its vjp (dq, dk) in float32; the forward's Mosaic GPU
  prepass kernel (``mosaic_gpu_gk_prepass``, from the raw log gates: q~, k^, A in bf16 and the
  state decays d in float32) lowers for cuda and, in interpret mode, matches the same oracle;
* the Mosaic GPU pullback kernel (``mosaic_gpu_gk_pullback``: dq, dk from the cotangents of q~,
  k^ and A, and the chunk-local suffix sums of q ⊙ dq - k ⊙ dk) lowers for cuda and, in
  interpret mode, matches float64 autodiff of the oracle and the float32 ``jax.vjp`` of
  ``decayed_tiles`` (padded chunk, steps of -30 and -80 resets, -5 on every step and channel);
* its ``accepts`` takes only calls with gk and declines everything else it does not support,
  and everything off Hopper.

Race detection sees races between TMA, the tensor cores and the warpgroup's code, not between
the threads of one warpgroup: the interpreter runs a warpgroup's array code as one step, so a
missing warpgroup barrier (e.g. between reading an SMEM tile transposed and overwriting it)
passes here (tried in session 11); those barriers are checked by reading the kernel.
"""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import gla_prepass_xla as xla_prepass
from kernel_utils import TOL_BF16, TOL_F32, assert_close, log_gate, normal
from pallas_kernels import mosaic_gpu_common
from pallas_kernels.linear import mosaic_gpu as scalar_mg
from pallas_kernels import chunk_common as cc
from pallas_kernels.linear import mosaic_gpu_gk as mg
from pallas_kernels.linear import mosaic_gpu_gk_kernel as mk
from pallas_kernels.linear import mosaic_gpu_gk_prepass as mp
from pallas_kernels.linear import mosaic_gpu_gk_pullback as mpb
from pallas_kernels.linear.reference import gated_linear_reference

plgpu = mosaic_gpu_common.plgpu
needs_interpreter = pytest.mark.skipif(
    plgpu is None or not hasattr(plgpu, "InterpretGPUParams"),
    reason="GPU interpret mode (plgpu.InterpretGPUParams) needs jax >= 0.12")
needs_transposed_tiles = pytest.mark.skipif(
    plgpu is None or not mosaic_gpu_common.transposes_swizzled_tiles(),
    reason="the pullback kernel reads a swizzled tile transposed: jax >= 0.11")
GATE_GRAD_TOL = 3e-4  # dg, dgk with a bf16-exact dO (measured 3.2e-5..1.6e-4 here)
NAMES = ("q", "k", "v", "g", "gk", "s0")


def _inputs(seed, B, T, H, K, V, with_g, with_s0, gk_low=-1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k = (normal(x, (B, T, H, K), jnp.bfloat16) for x in ks[:2])
    v = normal(ks[2], (B, T, H, V), jnp.bfloat16)
    gk = log_gate(ks[3], (B, T, H, K), gk_low, -0.01)
    g = log_gate(ks[4], (B, T, H), -0.5, -0.01) if with_g else None
    s0 = normal(ks[5], (B, H, K, V)) if with_s0 else None
    return q, k, v, g, gk, s0


def _segments(B, T, seed):
    """Random packed-document ids [B, T] (a few documents per row, lengths across chunks)."""
    starts = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.03, (B, T)).at[:, 0].set(False)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def _f64(x):
    return None if x is None else jnp.asarray(np.asarray(x, np.float64))


def _op(interpret=None, scale=0.125, segment_ids=None):
    return lambda q, k, v, g, gk, s0: mg.mosaic_gpu_gk_gated_linear_attention(
        q, k, v, g=g, gk=gk, scale=scale, initial_state=s0, segment_ids=segment_ids,
        chunk_size=None, interpret=interpret)


def _reference(scale=0.125, segment_ids=None):
    return lambda q, k, v, g, gk, s0: gated_linear_reference(
        q, k, v, g=g, gk=gk, scale=scale, initial_state=s0, segment_ids=segment_ids)


def _loss(run, do, dstate):
    """sum(o * do) + sum(final state * dstate): exercises both cotangents."""
    def loss(*args):
        o, s = run(*args)
        return jnp.sum(o.astype(do.dtype) * do) + jnp.sum(s.astype(do.dtype) * dstate)
    return loss


@pytest.mark.parametrize("Dk,Dv,scores,split,decay_axis,reverse,out_dtype,pieces,states_only", [
    (128, 128, True, False, 0, False, jnp.bfloat16, 1, False),  # the forward, two warpgroups
    (128, 64, True, False, 0, True, jnp.bfloat16, 2, False),    # dv walk: reverse, A^T, pieces
    (128, 128, False, True, 1, False, jnp.float32, 1, False),   # dq / dk: hi + lo, largest SMEM
    (64, 128, False, True, 1, True, jnp.float32, 2, False),
    (128, 128, False, True, 1, True, jnp.float32, 2, True),     # the split's state pass
])
def test_walk_lowers_for_cuda(Dk, Dv, scores, split, decay_axis, reverse, out_dtype, pieces,
                              states_only):
    B, T, H = 2, 256, 3
    sd = jax.ShapeDtypeStruct
    bf16 = lambda d: sd((B, T, H, d), jnp.bfloat16)
    args = (bf16(Dk), bf16(Dk), bf16(Dv), sd((B, H, T, mk.CHUNK), jnp.bfloat16) if scores else None,
            sd((B, H, T // mk.CHUNK, (Dk, Dv)[decay_axis]), jnp.float32),
            sd((B * pieces, H, Dk, Dv), jnp.float32), bf16(Dv) if split else None)
    run = jax.jit(lambda x, y, z, a, d, s0, z_lo: mk.gk_walk(
        None if states_only else x, y, z, a, d, s0, z_lo=z_lo, split_state=split,
        decay_axis=decay_axis, reverse=reverse, out_dtype=out_dtype, pieces=pieces,
        states_only=states_only))
    assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("K,V,with_g,with_s0,segments", [
    (128, 128, False, True, False),
    (64, 128, True, False, True),
])
@needs_transposed_tiles
def test_op_and_gradients_lower_for_cuda(K, V, with_g, with_s0, segments):
    B, T, H = 1, 200, 2
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, T, H), jnp.float32) if with_g else None,
            sd((B, T, H, K), jnp.float32), sd((B, H, K, V), jnp.float32) if with_s0 else None)
    seg = _segments(B, T, 0) if segments else None
    do, dstate = jnp.ones((B, T, H, V)), jnp.ones((B, H, K, V))
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    grads = jax.jit(jax.grad(_loss(_op(segment_ids=seg), do, dstate), argnums=argnums))
    text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # the prepass (its scores A are a residual; the forward walk is dead code under grad), the
    # backward's decays kernel, its three walks and the pullback kernel; the prepass and the
    # pullback in each of their three forms (a branch each of a lax.switch)
    assert text.count("custom_call @mosaic_gpu") == 3 + 1 + 3 + 3


@needs_transposed_tiles
@pytest.mark.parametrize("fixed", ["per_chunk", "exact", "bounded"])
def test_fixed_form_lowers_without_a_choice_in_xla(fixed, monkeypatch):
    """FIXED_FORM = "per_chunk" or "exact" (valid for any gates) runs that form of both kernels
    with no conditional in XLA; "bounded", valid only for bounded gates, is refused."""
    monkeypatch.setattr(mg, "FIXED_FORM", fixed)
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 200, 2, 64), jnp.bfloat16),) * 3 + (None, sd((1, 200, 2, 64), jnp.float32),
                                                        None)
    do, dstate = jnp.ones((1, 200, 2, 64)), jnp.ones((1, 2, 64, 64))
    grads = jax.jit(jax.grad(_loss(_op(), do, dstate), argnums=(0, 1, 2, 4)))
    if fixed == "bounded":
        with pytest.raises(ValueError, match="FIXED_FORM"):
            grads.trace(*args)
        return
    text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1 + 1 + 3 + 1
    assert "stablehlo.case" not in text


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,with_g,with_s0,segments,gk_low,min_piece", [
    (2, 150, 2, 128, 128, False, False, False, -1.0, 16),  # two warpgroups, padded last chunk
    (1, 100, 1, 64, 128, True, True, False, -1.0, 1),      # g and gk, initial state, 2 pieces
    (1, 130, 1, 128, 64, False, True, True, -20.0, 16),    # strong gates, segments, one wg
    (1, 1, 1, 64, 64, True, False, False, -1.0, 16),       # T = 1
])
def test_interpret_matches_oracle(B, T, H, K, V, with_g, with_s0, segments, gk_low, min_piece,
                                  monkeypatch):
    monkeypatch.setattr(scalar_mg, "MIN_PIECE_CHUNKS", min_piece)
    q, k, v, g, gk, s0 = _inputs(T, B, T, H, K, V, with_g, with_s0, gk_low)
    seg = _segments(B, T, T) if segments else None
    scale = K ** -0.5
    run = _op(plgpu.InterpretGPUParams(detect_races=True), scale, seg)
    o, s = run(q, k, v, g, gk, s0)
    with jax.enable_x64(True):
        ro, rs = (np.asarray(x) for x in _reference(scale, seg)(*map(_f64, (q, k, v, g, gk, s0))))
    assert o.dtype == jnp.bfloat16 and o.shape == ro.shape and s.dtype == jnp.float32
    assert_close(o, ro, TOL_BF16, "o")
    assert_close(s, rs, TOL_BF16, "final state")


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,with_g,with_s0,segments,gk_low,min_piece", [
    (1, 150, 2, 64, 128, True, True, False, -1.0, 1),     # g and gk, s0, 2 pieces
    (1, 150, 2, 128, 64, False, True, False, -0.12, 16),  # mild: bounded form fwd and bwd
    (1, 150, 2, 64, 64, False, False, False, -2.5, 16),   # blocks to ~-50: bounded too
    (1, 130, 1, 128, 64, False, False, True, -20.0, 16),  # segments (dgk 0), strong
    (1, 1, 1, 64, 64, False, False, False, -1.0, 16),     # T = 1 (dgk is exactly 0)
])
def test_interpret_gradients_match_oracle(B, T, H, K, V, with_g, with_s0, segments, gk_low,
                                          min_piece, monkeypatch):
    """dq, dk, dv, dg, dgk, d initial state of the Mosaic GPU backward (output and final-state
    cotangents) against autodiff of the float64 step-by-step oracle."""
    monkeypatch.setattr(scalar_mg, "MIN_PIECE_CHUNKS", min_piece)
    inputs = _inputs(T + 11, B, T, H, K, V, with_g, with_s0, gk_low)
    kd, ks = jax.random.split(jax.random.PRNGKey(T), 2)
    # dO exact in bf16: the op rounds it to bf16, which alone moves dgk by ~1e-3
    do = normal(kd, (B, T, H, V), jnp.bfloat16).astype(jnp.float32)
    dstate = normal(ks, (B, H, K, V))
    seg = _segments(B, T, T + 5) if segments else None
    argnums = tuple(i for i, x in enumerate(inputs) if x is not None)
    got = jax.grad(_loss(_op(plgpu.InterpretGPUParams(), segment_ids=seg), do, dstate),
                   argnums)(*inputs)
    with jax.enable_x64(True):
        want = jax.grad(_loss(_reference(segment_ids=seg), _f64(do), _f64(dstate)), argnums)(
            *map(_f64, inputs))
        want = [np.asarray(w) for w in want]
    for i, a, b in zip(argnums, got, want):
        name = NAMES[i]
        assert a.dtype == inputs[i].dtype, name
        if T == 1 and name == "gk":
            assert not np.any(np.asarray(a)), "dgk of the first step decays only zeros"
            continue
        assert_close(a, b, GATE_GRAD_TOL if name in ("g", "gk") else TOL_BF16, f"d{name}")


def _steps_in_chunks(gk, chunks, value=-80.0):
    """gk with ``value`` at row 5 of each chunk in ``chunks`` on channel 3."""
    for n in chunks:
        gk = gk.at[:, n * mk.CHUNK + 5, :, 3].set(value)
    return gk


@pytest.mark.parametrize("chunks,form", [((), 0), ((2,), 1), ((0, 1), 1), ((0, 1, 3), 2)])
def test_gate_bounds_pick_the_prepass_form(chunks, form):
    """gate_bounds: "bounded" (0) where every diagonal block sums to >= -BOUNDED_DECAY,
    "per_chunk" (1) where at least BOUNDED_SHARE of the (chunk, head) pairs do, else "exact"
    (2), with the block sums of numpy."""
    lg = _steps_in_chunks(log_gate(jax.random.PRNGKey(4), (2, 256, 2, 64), -0.5, -0.01), chunks)
    least = _block_minima(lg).min(axis=-1)   # [B, H, N]
    share = np.mean(least >= -mp.BOUNDED_DECAY)
    assert (least.min() >= -mp.BOUNDED_DECAY) == (form == 0)
    assert (share >= mg.BOUNDED_SHARE) == (form < 2)
    assert int(mg.gate_bounds(lg)) == form


@needs_interpreter
@pytest.mark.parametrize("chunks", [(), (2,), (0, 1, 3)])
def test_interpret_forward_in_each_prepass_form_matches_oracle(chunks):
    """The op's output and final state in each prepass form (picked as in
    ``test_gate_bounds_pick_the_prepass_form``: bounded, per chunk, exact) against the float64
    oracle."""
    B, T, H, K, V = 1, 250, 1, 64, 64
    q, k, v, _, gk, _ = _inputs(6, B, T, H, K, V, False, False, gk_low=-0.5)
    gk = _steps_in_chunks(gk, chunks)
    o, s = _op(plgpu.InterpretGPUParams(detect_races=True))(q, k, v, None, gk, None)
    with jax.enable_x64(True):
        ro, rs = (np.asarray(x) for x in _reference()(*map(_f64, (q, k, v, None, gk, None))))
    assert_close(o, ro, TOL_BF16, "o")
    assert_close(s, rs, TOL_BF16, "final state")


@needs_interpreter
@pytest.mark.parametrize("chunks,form", [((), 0), ((2,), 1), ((2,), 2)])
def test_interpret_gradients_in_each_form_match_oracle(chunks, form, monkeypatch):
    """Gradients of every input with the prepass and pullback kernels in one form (forced
    here; ``test_gate_bounds_pick_the_prepass_form`` checks the choice): bounded on mild gates,
    per chunk and exact with a step of -80 in chunk 2, against the float64 oracle."""
    B, T, H, K, V = 1, 250, 1, 64, 64
    q, k, v, _, gk, s0 = _inputs(8, B, T, H, K, V, False, True, gk_low=-0.5)
    gk = _steps_in_chunks(gk, chunks)
    monkeypatch.setattr(mg, "gate_bounds", lambda lg: jnp.int32(form))
    kd, ks = jax.random.split(jax.random.PRNGKey(form), 2)
    do = normal(kd, (B, T, H, V), jnp.bfloat16).astype(jnp.float32)
    dstate = normal(ks, (B, H, K, V))
    inputs, argnums = (q, k, v, None, gk, s0), (0, 1, 2, 4, 5)
    got = jax.grad(_loss(_op(plgpu.InterpretGPUParams()), do, dstate), argnums)(*inputs)
    with jax.enable_x64(True):
        want = jax.grad(_loss(_reference(), _f64(do), _f64(dstate)), argnums)(
            *map(_f64, inputs))
    for i, a, b in zip(argnums, got, want):
        name = NAMES[i]
        assert_close(a, np.asarray(b), GATE_GRAD_TOL if name == "gk" else TOL_BF16, f"d{name}")


def _prepass_inputs(seed, B, T, H, K, dtype, cumsum=True):
    """q, k (``dtype``) and the chunk-local gate sums b (``cumsum``; else the log gates
    themselves), padded to whole chunks as in the op.
    Gates: log_sigmoid(N(0, 1) + 4) (mild), steps of -30 and segment resets of -80 on every
    channel at random steps, and -20 per step on the first 8 channels."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (normal(x, (B, T, H, K), dtype) for x in ks[:2])
    lg = jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H, K)) + 4.0)
    step = jax.random.uniform(ks[3], (B, T, H, 1))
    lg = jnp.where(step < 0.1, -30.0, jnp.where(step > 0.95, -80.0, lg)).at[..., :8].set(-20.0)
    Tp = -(-T // mk.CHUNK) * mk.CHUNK
    q, k, lg = (cc.pad_time(x, Tp) for x in (q, k, lg))
    return q, k, xla_prepass.chunk_log_gates(lg, mk.CHUNK) if cumsum else lg


def _block_minima(lg):
    """Per chunk, head and channel, the least sum of lg over a diagonal block of the prepass
    [B, H, N, K]."""
    B, Tp, H, K = lg.shape
    block = mp.DIAGONAL_BLOCK
    sums = np.asarray(lg, np.float64).reshape(B, Tp // mk.CHUNK, mk.CHUNK // block, block, H, K)
    return sums.sum(axis=3).min(axis=2).transpose(0, 2, 1, 3)


def _prepass_oracle(q, k, b, scale):
    """(q~, k^, A) of ``mosaic_gpu_gk_prepass`` elementwise per channel, in the inputs' dtype
    (float64 here): A_ij = scale sum_c q_ic k_jc e^{b_ic - b_jc}, j <= i."""
    B, Tp, H, K = q.shape
    C = mk.CHUNK
    qc, kc, bc = (x.reshape(B, Tp // C, C, H, K) for x in (q, k, b))
    mask = cc.causal_mask(C, C)[None, None, :, :, None, None]
    decay = cc.masked_exp(bc[:, :, :, None] - bc[:, :, None, :], mask)   # [B, N, i, j, H, K]
    a = scale * jnp.einsum("bnihk,bnjhk,bnijhk->bhnij", qc, kc, decay)
    k_hat = kc * jnp.exp(bc[:, :, -1:] - bc)
    return scale * q * jnp.exp(b), k_hat.reshape(q.shape), a.reshape(B, H, Tp, C)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, TOL_BF16), (jnp.float32, TOL_F32)])
def test_prepass_matches_oracle_with_strong_gates(dtype, tol):
    """q~, k^ and the bisection-anchored scores A of the float32 XLA reference: finite and
    accurate for any gate strength, from bf16 inputs (widened to float32) and float32 ones."""
    B, T, H, K = 2, 150, 2, 64
    q, k, b = _prepass_inputs(1, B, T, H, K, dtype)
    scale = K ** -0.5
    got = xla_prepass.decayed_tiles(q, k, b, scale, mk.CHUNK)
    with jax.enable_x64(True):
        want = [np.asarray(x) for x in _prepass_oracle(*map(_f64, (q, k, b)), scale)]
    for name, g, w in zip(("q~", "k^", "A"), got, want):
        assert g.dtype == jnp.float32, name
        assert_close(g, w, tol, name)
    upper = np.triu(np.ones((mk.CHUNK, mk.CHUNK), bool), 1)
    a = np.asarray(got[2]).reshape(B, H, -1, mk.CHUNK, mk.CHUNK)
    assert not np.any(a[..., upper]), "A has entries above the diagonal"


def test_prepass_vjp_matches_oracle_with_strong_gates():
    """dq, dk of the float32 XLA reference's ``jax.vjp`` at random cotangents of q~, k^
    and all of A (the masked part included) against float64 autodiff of the oracle."""
    B, T, H, K = 1, 150, 2, 64
    q, k, b = _prepass_inputs(2, B, T, H, K, jnp.float32)
    scale = K ** -0.5
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    cots = (normal(ks[0], q.shape), normal(ks[1], k.shape),
            normal(ks[2], (B, H, q.shape[1], mk.CHUNK)))
    _, pullback = jax.vjp(lambda q, k: xla_prepass.decayed_tiles(q, k, b, scale, mk.CHUNK), q, k)
    got = pullback(cots)
    with jax.enable_x64(True):
        b64 = _f64(b)
        _, pullback64 = jax.vjp(lambda q, k: _prepass_oracle(q, k, b64, scale), _f64(q), _f64(k))
        want = [np.asarray(x) for x in pullback64(tuple(map(_f64, cots)))]
    for name, g, w in zip(("dq", "dk"), got, want):
        assert_close(g, w, TOL_F32, name)


@pytest.mark.parametrize("K", [128, 64])
@pytest.mark.parametrize("kernel", ["gk_prepass", "gk_decays"])
def test_prepass_kernels_lower_for_cuda(K, kernel):
    sd = jax.ShapeDtypeStruct
    args = (sd((2, 128, 3, K), jnp.bfloat16), sd((2, 128, 3, K), jnp.bfloat16),
            sd((2, 128, 3, K), jnp.float32))
    run = jax.jit(lambda q, k, lg: getattr(mp, kernel)(q, k, lg, 0.1))
    assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K", [(1, 150, 2, 128), (2, 64, 1, 64)])
def test_prepass_kernel_matches_oracle_with_strong_gates(B, T, H, K):
    """q~, k^, A and d of the Mosaic GPU prepass (race detection on) from the raw log gates,
    against the float64 oracle (its chunk-local sums in float64 too), with the gates of
    ``_prepass_inputs``: bf16 q~, k^, A (the forward's operands), float32 d."""
    q, k, lg = _prepass_inputs(T, B, T, H, K, jnp.bfloat16, cumsum=False)
    scale = K ** -0.5
    q_t, k_h, a, d = mp.gk_prepass(q, k, lg, scale,
                                   interpret=plgpu.InterpretGPUParams(detect_races=True))
    with jax.enable_x64(True):
        b = cc.chunk_cumsum(_f64(lg), mk.CHUNK, axis=1)
        want = [np.asarray(x) for x in _prepass_oracle(_f64(q), _f64(k), b, scale)]
        last = np.asarray(b).reshape(B, -1, mk.CHUNK, H, K)[:, :, -1]
        want.append(np.exp(last.transpose(0, 2, 1, 3)))
    tols = (TOL_BF16,) * 3 + (TOL_F32,)
    for name, g, w, tol in zip(("q~", "k^", "A", "d"), (q_t, k_h, a, d), want, tols):
        assert g.shape == w.shape, name
        assert_close(g, w, tol, name)
    assert a.dtype == jnp.bfloat16 and d.dtype == jnp.float32


@needs_interpreter
def test_decays_kernel_matches_oracle_with_strong_gates():
    """The backward's q~, k^ (hi + lo bf16 parts) and d of the Mosaic GPU decays kernel (race
    detection on) against the float64 oracle, to float32 accuracy: hi alone is bf16-rounded."""
    B, T, H, K = 1, 150, 2, 128
    q, k, lg = _prepass_inputs(T, B, T, H, K, jnp.bfloat16, cumsum=False)
    scale = K ** -0.5
    q_parts, k_parts, d = mp.gk_decays(q, k, lg, scale,
                                       interpret=plgpu.InterpretGPUParams(detect_races=True))
    with jax.enable_x64(True):
        b = cc.chunk_cumsum(_f64(lg), mk.CHUNK, axis=1)
        q_t, k_h, _ = (np.asarray(x) for x in _prepass_oracle(_f64(q), _f64(k), b, scale))
        last = np.asarray(b).reshape(B, -1, mk.CHUNK, H, K)[:, :, -1]
    for name, (hi, lo), want in (("q~", q_parts, q_t), ("k^", k_parts, k_h)):
        assert hi.dtype == lo.dtype == jnp.bfloat16, name
        assert_close(hi.astype(jnp.float32) + lo.astype(jnp.float32), want, TOL_F32, name)
        assert_close(hi, want, TOL_BF16, f"{name} hi")
    assert_close(d, np.exp(last.transpose(0, 2, 1, 3)), TOL_F32, "d")


@pytest.mark.parametrize("K,V,channels", [(128, 64, 64), (64, 128, 64), (128, 128, 32),
                                           (64, 64, 32)])
@needs_transposed_tiles
def test_pullback_kernel_lowers_for_cuda(K, V, channels):
    sd = jax.ShapeDtypeStruct
    B, T, H = 2, 128, 3
    tile = lambda dtype: sd((B, T, H, K), dtype)
    args = (tile(jnp.bfloat16), tile(jnp.bfloat16), tile(jnp.float32), tile(jnp.float32),
            tile(jnp.float32), sd((B, T, H, V), jnp.bfloat16), sd((B, T, H, V), jnp.bfloat16))
    run = jax.jit(lambda q, k, lg, dq_t, dk_h, do, v: mpb.gk_pullback(
        q, k, lg, dq_t, dk_h, do, v, 0.1, channels=channels))
    assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,gates,channels", [
    (1, 150, 2, 128, 64, "strong", 64),  # padded last chunk, steps of -30, resets of -80
    (1, 100, 1, 64, 128, "steep", 64),   # -5 on every step and channel
    (1, 100, 1, 64, 64, "strong", 32),   # 32 channels per CTA (the default)
    (1, 187, 2, 128, 64, "mild", 32),    # the bounded form (middle anchors)
    (1, 120, 1, 64, 64, "mild", 64),
    (1, 187, 2, 128, 64, "sigmoid", 32),  # log_sigmoid(N(0, 1)): ~-0.8 a step, bounded
    (1, 187, 2, 128, 64, "mixed", 32),   # per chunk: the CTAs of one chunk's channels 0..31 not
])
def test_pullback_kernel_matches_vjp(B, T, H, K, V, gates, channels):
    """dq, dk of the Mosaic GPU pullback (race detection on) from the raw log gates at random
    cotangents of q~, k^ and of A as the kernel forms it, dA = dO v^T per chunk (all of it:
    its upper triangle must be ignored), against float64 autodiff of the oracle and the float32
    ``jax.vjp`` of ``decayed_tiles``; its chunk-local suffix sums L_i = sum_{t >= i in the
    chunk} (q ⊙ dq - k ⊙ dk)_t against the same sums of the float64 dq, dk (float32 inside the
    kernel: measured 3e-6). "mild" and "sigmoid": every 32-row block's gates sum to
    >= -BOUNDED_DECAY, so the kernel runs in its bounded form (middle anchors): mild gates with
    one block summing to ~-56 on channel 40 (anchor factors up to e^{+-56}), or gates of
    log_sigmoid(N(0, 1)) on every channel (blocks down to ~-36); "mixed": mild with a step of
    -80 on channel 5 of chunk 1, per chunk (that CTA the bisection, the others bounded); else
    the bisection."""
    q, k, lg = _prepass_inputs(T + 3, B, T, H, K, jnp.bfloat16, cumsum=False)
    if gates == "steep":
        lg = jnp.full(lg.shape, -5.0, jnp.float32)
    elif gates == "mixed":
        mild = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(5), lg.shape) + 4.0)
        lg = mild.at[:, 70, :, 5].set(-80.0)
    elif gates == "sigmoid":
        lg = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(5), lg.shape))
        assert -mp.BOUNDED_DECAY <= _block_minima(lg).min() < -30.0
    elif gates == "mild":
        mild = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(5), lg.shape) + 4.0)
        lg = mild.at[:, min(T, 150) - 1, :, 40].set(-55.0)
        least = _block_minima(lg)
        assert least.min() >= -mp.BOUNDED_DECAY and least[..., 40].min() < -55.0
    scale = K ** -0.5
    ks = jax.random.split(jax.random.PRNGKey(T), 4)
    do, v = (normal(x, q.shape[:3] + (V,), jnp.bfloat16) for x in ks[2:])
    by_chunk = lambda x: x.reshape(B, -1, mk.CHUNK, H, V)
    with jax.enable_x64(True):  # float64: dA's bf16 products are exact
        da = jnp.einsum("bnihv,bnjhv->bhnij", by_chunk(_f64(do)), by_chunk(_f64(v)))
        da = np.asarray(da.reshape(B, H, q.shape[1], mk.CHUNK), np.float32)
    cots = (normal(ks[0], q.shape), normal(ks[1], k.shape), jnp.asarray(da))
    got = mpb.gk_pullback(q, k, lg, *cots[:2], do, v, scale, channels=channels,
                          form={"mild": "bounded", "sigmoid": "bounded",
                                "mixed": "per_chunk"}.get(gates, "exact"),
                          interpret=plgpu.InterpretGPUParams(detect_races=True))
    b = xla_prepass.chunk_log_gates(lg, mk.CHUNK)
    f32 = lambda x: x.astype(jnp.float32)
    _, pullback = jax.vjp(lambda q, k: xla_prepass.decayed_tiles(q, k, b, scale, mk.CHUNK),
                          f32(q), f32(k))
    xla = pullback(cots)
    with jax.enable_x64(True):
        b64 = cc.chunk_cumsum(_f64(lg), mk.CHUNK, axis=1)
        _, pullback64 = jax.vjp(lambda q, k: _prepass_oracle(q, k, b64, scale), _f64(q), _f64(k))
        want = [np.asarray(x) for x in pullback64(tuple(map(_f64, cots)))]
        dg = _f64(q) * want[0] - _f64(k) * want[1]
        by_chunk = cc.pad_time(dg, got[2].shape[1]).reshape(B, -1, mk.CHUNK, H, K)
        local = jnp.flip(jnp.cumsum(jnp.flip(by_chunk, 2), axis=2), 2).reshape(got[2].shape)
        want.append(np.asarray(local))
    for name, g, x, w in zip(("dq", "dk"), got, xla, want):
        assert g.dtype == q.dtype and g.shape == q.shape, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert_close(g, w, TOL_BF16, name)
        assert_close(g, x, TOL_BF16, f"{name} against decayed_tiles")
    assert got[2].dtype == jnp.float32 and got[2].shape == q.shape
    assert_close(got[2], want[2], TOL_F32, "chunk-local sums of q dq - k dk")


def test_prepass_interval_matrices_cover_each_pair_once():
    """The level exponents of ``interval_matrices`` pair with the level code of the kernel:
    every pair i > j of a chunk has exactly one level h with h <= i XOR j < 2h, and there the
    exponent rows of i and j add up to the interval (j, i] (anchor between them, both <= 0)."""
    C = mk.CHUNK
    e = mp.interval_matrices(C)
    assert e.shape == (2 + len(mp.LEVELS), C, C) and set(np.unique(e)) <= {0.0, 1.0}
    rows = np.arange(C)
    for i in range(C):
        for j in range(i):
            levels = [t for t, h in enumerate(mp.LEVELS) if h <= (i ^ j) < 2 * h]
            assert len(levels) == 1
            both = e[2 + levels[0], i] + e[2 + levels[0], j]
            np.testing.assert_array_equal(both, (rows > j) & (rows <= i))


@pytest.mark.parametrize("block", [16, 32, 64])
def test_prepass_middle_anchor_matrix_gives_offsets_from_the_block_middle(block):
    """(E_mid @ lg)[r] = b_r - b_m(r), m(r) the middle row of r's diagonal block: the factors
    e^{x_i} e^{-x_j} of a bounded chunk multiply to e^{b_i - b_j} for i, j in one block."""
    C = mk.CHUNK
    lg = -np.random.default_rng(block).uniform(0, 1, (C, 3))
    b = np.cumsum(lg, axis=0)
    m = np.arange(C) - np.arange(C) % block + block // 2 - 1
    e = mp.middle_anchor_matrix(block)
    assert set(np.unique(e)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(e @ lg, b - b[m], atol=1e-12)


@needs_interpreter
def test_prepass_kernel_exact_with_steep_gates_on_every_channel():
    """Log gates of -5 on every step and channel (the decay across a chunk is e^{-315}, across
    a 16-row sub-chunk e^{-75}): q~, k^ and A of the kernel stay finite and match the float64
    oracle (no exponent is positive; what underflows is below float32's range), and d, e^{-320}
    in float64, is 0."""
    B, T, H, K = 1, 100, 2, 128
    ks = jax.random.split(jax.random.PRNGKey(7), 2)
    q, k = (normal(x, (B, T, H, K), jnp.bfloat16) for x in ks)
    Tp = -(-T // mk.CHUNK) * mk.CHUNK
    q, k = (cc.pad_time(x, Tp) for x in (q, k))
    lg = jnp.full((B, Tp, H, K), -5.0, jnp.float32)
    scale = K ** -0.5
    got = mp.gk_prepass(q, k, lg, scale, interpret=plgpu.InterpretGPUParams(detect_races=True))
    with jax.enable_x64(True):
        b = cc.chunk_cumsum(_f64(lg), mk.CHUNK, axis=1)
        want = [np.asarray(x) for x in _prepass_oracle(_f64(q), _f64(k), b, scale)]
    for name, g, w in zip(("q~", "k^", "A"), got, want):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert_close(g, w, TOL_BF16, name)
    assert not np.any(np.asarray(got[3])), "d"


@needs_interpreter
@pytest.mark.parametrize("block", [32, 16, 64])
def test_prepass_kernel_bounded_chunks_take_the_middle_anchor(monkeypatch, block):
    """Chunks whose diagonal blocks' gates sum to >= -BOUNDED_DECAY on every channel take one
    anchor per block (the levels above the block stay), the others the bisection, in one call:
    chunk 0 mild gates, chunk 1 a step of -80 on one channel (bisection), chunk 2 mild but one
    channel summing to ~-57 in one block (factors up to e^{+-57}). Both match the float64
    oracle (chunk 2's A to 5e-3, the bf16 rounding's order), and the bounded chunks' A differs
    from the all-bisection kernel's
    (BOUNDED_DECAY = -1: no chunk bounded) by rounding, while chunk 1's is the same bits."""
    monkeypatch.setattr(mp, "DIAGONAL_BLOCK", block)
    B, T, H, K = 1, 187, 2, 128
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    q, k = (normal(x, (B, T, H, K), jnp.bfloat16) for x in ks[:2])
    lg = jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H, K)) + 4.0)
    lg = lg.at[:, 70, :, 5].set(-80.0).at[:, 150, :, 3].set(-56.0)
    Tp = -(-T // mk.CHUNK) * mk.CHUNK
    q, k, lg = (cc.pad_time(x, Tp) for x in (q, k, lg))
    sums = np.asarray(lg).reshape(B, -1, mk.CHUNK // block, block, H, K).sum(axis=3)
    bounded = sums.min(axis=(0, 2, 3, 4)) >= -mp.BOUNDED_DECAY
    assert list(bounded) == [True, False, True]
    scale = K ** -0.5
    run = lambda form="per_chunk": mp.gk_prepass(
        q, k, lg, scale, form=form, interpret=plgpu.InterpretGPUParams(detect_races=True))
    got = run()
    with jax.enable_x64(True):
        b = cc.chunk_cumsum(_f64(lg), mk.CHUNK, axis=1)
        want = [np.asarray(x) for x in _prepass_oracle(_f64(q), _f64(k), b, scale)]
    for name, g, w in zip(("q~", "k^", "A"), got, want):
        assert_close(g, w, TOL_BF16, name)
    by_chunk = lambda x: np.asarray(x, np.float32).reshape(B, H, -1, mk.CHUNK, mk.CHUNK)
    assert_close(by_chunk(got[2])[:, :, 2], by_chunk(want[2])[:, :, 2], 5e-3, "A of chunk 2")
    if block == 32:   # the static forms: the same bits as the per-chunk branch where it agrees
        for form in ("bounded", "exact"):
            a_static = by_chunk(run(form)[2])
            for n, fast in enumerate(bounded):
                if fast == (form == "bounded"):
                    assert np.array_equal(a_static[:, :, n], by_chunk(got[2])[:, :, n]), form
    monkeypatch.setattr(mp, "BOUNDED_DECAY", -1.0)
    a_fast, a_bisection = by_chunk(got[2]), by_chunk(run()[2])
    for n, fast in enumerate(bounded):
        same = np.array_equal(a_fast[:, :, n], a_bisection[:, :, n])
        assert same != fast, f"chunk {n}"


def test_accepts_declines_unsupported_calls():
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    gk = jnp.zeros((1, 64, 1, 128))
    kw = dict(g=None, gk=gk, initial_state=None, segment_ids=None, chunk_size=None)
    reason = mg.mosaic_gpu_gk_accepts(q, q, q, **kw)
    assert reason is not None and "Hopper" in reason  # this machine has no Hopper GPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mosaic_gpu_common, "is_hopper", lambda: True)
        mp.setattr(mg, "transposes_swizzled_tiles", lambda: False)
        assert "jax >= 0.11" in mg.mosaic_gpu_gk_accepts(q, q, q, **kw)
        mp.setattr(mg, "transposes_swizzled_tiles", lambda: True)
        assert mg.mosaic_gpu_gk_accepts(q, q, q, **kw) is None
        assert mg.mosaic_gpu_gk_accepts(q, q, q, **{**kw, "g": jnp.zeros((1, 64, 1))}) is None
        assert mg.mosaic_gpu_gk_accepts(
            q, q, q, **{**kw, "segment_ids": jnp.zeros((1, 64), jnp.int32)}) is None
        assert mg.mosaic_gpu_gk_accepts(
            q, q, q, **{**kw, "initial_state": jnp.zeros((1, 1, 128, 128))}) is None
        assert "gk" in mg.mosaic_gpu_gk_accepts(q, q, q, **{**kw, "gk": None})
        assert "chunk_size" in mg.mosaic_gpu_gk_accepts(q, q, q, **{**kw, "chunk_size": 32})
        assert "bfloat16" in mg.mosaic_gpu_gk_accepts(q.astype(jnp.float32), q, q, **kw)
        assert "key dim" in mg.mosaic_gpu_gk_accepts(q[..., :32], q[..., :32], q,
                                                     **{**kw, "gk": gk[..., :32]})
        assert "value dim" in mg.mosaic_gpu_gk_accepts(q, q, q[..., :96], **kw)


def test_registered_for_gk_calls_only(monkeypatch):
    """On Hopper, once both kernels are GPU-checked (``auto``), auto dispatch runs this kernel
    for gk calls and the scalar kernel otherwise; until "linear_gk" is GPU-checked, auto passes
    over this kernel."""
    import dataclasses
    from pallas_kernels.linear import REGISTRY
    monkeypatch.setattr(mosaic_gpu_common, "is_hopper", lambda: True)
    monkeypatch.setattr(mg, "transposes_swizzled_tiles", lambda: True)
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    kw = dict(scale=0.1, initial_state=None, segment_ids=None, chunk_size=None)
    gk = jnp.zeros((1, 64, 1, 128))
    if "linear_gk" not in mosaic_gpu_common.GPU_CHECKED:
        assert REGISTRY.choose(None, q, q, q, g=None, gk=gk, **kw).name != "mosaic_gpu_gk"
    for name in ("mosaic_gpu", "mosaic_gpu_gk"):
        monkeypatch.setitem(REGISTRY._impls, name,
                            dataclasses.replace(REGISTRY._impls[name], auto=True))
    assert REGISTRY.choose(None, q, q, q, g=None, gk=gk, **kw).name == "mosaic_gpu_gk"
    assert REGISTRY.choose(None, q, q, q, g=None, gk=None, **kw).name == "mosaic_gpu"


def test_pieces_of_the_sequence_split(monkeypatch):
    """The split is on where B · H CTAs leave SMs idle (and the tests above force it)."""
    shape = lambda B, T, H: jnp.zeros((B, T, H, 1))
    assert mg._num_pieces(shape(8, 4096, 16)) == 1
    assert mg._num_pieces(shape(1, 65536, 16)) == 8
    monkeypatch.setattr(scalar_mg, "MIN_PIECE_CHUNKS", 1)
    assert mg._num_pieces(shape(1, 150, 2)) == 2
