"""The per-chunk gradients of the (gated) delta rule's backward on Hopper (Mosaic GPU).

Once the forward walk has saved S, the state entering every chunk, and the reverse walk dS1,
the cotangent of the state leaving it (both bf16 [B, N, H, K, V]), every chunk's gradients
are independent. One kernel, one CTA (one warpgroup) per (chunk, head, batch row), computes
what ``chunk_math.backward`` does (its docstring has the derivation). C = 64 steps,
b the chunk-local cumulative log gate (none: b = 0), s the output scale,

    D_ij = e^{b_i - b_j} [j <= i],  Γ_i = e^{b_i},  λ_i = e^{b_{C-1} - b_i},  γ = e^{b_{C-1}},

each "wgmma" below a tensor-core product of bf16 operands from shared memory into float32
registers. T = (I + A)^-1 and T_β = T diag(β) of every chunk come from the forward's prepass
(``mosaic_gpu_prepass.prepass(..., for_backward=True)``, bf16 [B, Tp, H, C], saved as residuals:
16 KB a chunk written in the forward under the vjp, read here), so the backward neither
recomputes them (the recursive doubling: ten dependent products) nor launches a kernel for them.
The kernel (``chunk_grads``), from TMA-loaded q, k, v, W (the forward's, saved), T, T_β,
dO [C, *] and S, dS1 [K, V] (two groups of copies: T, dO and dS1 arrive while the first line
runs), in the order it runs them (a line's products issued together):

    Δ    = T_β v - W S,  P = s (q k^T) ⊙ D                    wgmma T_β v, W S, q k^T
    dPD  = s (dO Δ^T) ⊙ D,  dΔ = P^T dO + (λ k) dS1,  Δ dS1^T  wgmma dO Δ^T, two summed, one
    dWn  = dΔ S^T  (= -dW),  dO S^T                           wgmma (two)
    dRu  = T^T dΔ,  dRwn = T^T dWn  (= -dRw),  Y = dΔ v^T      wgmma (three)
    X    = T^T Y             (= dRu v^T)                      wgmma, and k k^T again
    dA   = strictly-lower(-X diag(β) T^T + dRwn W^T)          wgmma (two, summed; U = T_β v
                                                              is never stored: dRu U^T = X T_β^T)
    M    = diag(β) dA ⊙ D
    dq   = dPD k + s Γ ⊙ (dO S^T)                             wgmma
    dk   = dPD^T q + M k + M^T k - β Γ ⊙ dRwn + λ ⊙ (Δ dS1^T) wgmma (three, summed)
    dv   = β ⊙ dRu
    dβ   = rowsum(dRu ⊙ v) - Γ rowsum(k ⊙ dRwn) + rowsum(dA ⊙ (k k^T) ⊙ D)

and with a gate, E = dPD ⊙ (q k^T) + M ⊙ (k k^T), the gradient of b in two parts (the caller
adds them, then carries db back through the chunk cumsum to dg):

    db_col = rowsum(E) + Γ (s rowsum(q ⊙ dO S^T) - β rowsum(k ⊙ dRwn)) - d_λ
             + [i = C-1] (sum(d_λ) + γ sum(S ⊙ dS1)),      d_λ = λ rowsum(k ⊙ Δ dS1^T)
    db_row = -colsum(E)

T and T_β are bit for bit what a separate inverse kernel of the backward computed before
(same doubling, same bf16 rounding; checked in ``tests/test_delta_mosaic_gpu.py`` at the commit
that moved them). Saved: that kernel's launch and its k, β, b loads (estimated ~0.2 ms at the
anchor shape), for 2 x 8 KB more HBM writes per chunk in the forward under the vjp; the speed
on the H100 is not measured yet.

Shared memory (bf16 unless noted; vectors float32, 1 KB each as allocations are aligned; Mosaic
GPU keeps 2 KB more; an SM has 228 KB, 227 KB at most per CTA, 1 KB reserved per CTA): the
inputs q, k, W, v, dO, S, dS1, β, b (β and b twice, once per register layout they are read
in), three [C, C] tiles (T; T_β, P, Y, -X diag(β), M; dPD) and three more tiles of the inputs'
shapes reused across disjoint lifetimes (Δ then dk; dΔ then dv; λ k, dWn then dRwn); dq goes
to dO's tile. At K = V = 128 that is 216 KB + 7 KB of vectors + 2 KB: 225 KB, one CTA per SM.
(K != V: dq and dk get tiles of their own; K or V is 64 there, so it fits easily.)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.delta.mosaic_gpu_prepass import CHUNK
from pallas_kernels.mosaic_gpu_common import (per_col, per_row, pl, plgpu, products,
                                              summed_products, tiled_smem, transposed,
                                              wgmma_zeros)

F32 = jnp.float32
FIRST_TILES = ("q", "k", "v", "w", "c1", "s")  # TMA group the first round waits for (T_β in c1)
REST_TILES = ("t", "do", "ds")                 # the second group, awaited inside _gradients


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    gated: bool
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Terms:
    """Per-row factors of one chunk in registers (None = 1, ungated)."""
    beta: Any        # [C] β, row layout
    gamma: Any       # [C] Γ
    lam: Any         # [C] λ
    carry: Any       # scalar γ
    decay: Any       # [C, C] D (causal mask included)
    row: Any         # [C, C] int32 iotas
    col: Any


def _scale_rows(x: jax.Array, factor: Any) -> jax.Array:
    return x if factor is None else x * per_row(factor, x.shape)


def _row_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=1)


def _load(ref) -> jax.Array:
    """A bf16 SMEM tile as float32 registers in the wgmma layout (loaded where used, not held
    across products: fewer live registers)."""
    return plgpu.layout_cast(ref[...], plgpu.Layout.WGMMA).astype(F32)


def _zeros(x, y) -> jax.Array:
    return wgmma_zeros((x.shape[0], y.shape[-1]))


def _terms(buf, gated: bool) -> _Terms:
    C = CHUNK
    layout = plgpu.Layout.WGMMA
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=layout)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=layout)
    causal = row >= col
    beta = plgpu.layout_cast(buf["beta_col"][...], layout.reduce(1))
    if not gated:
        return _Terms(beta, None, None, None, jnp.where(causal, 1.0, 0.0), row, col)
    b = plgpu.layout_cast(buf["b_col"][...], layout.reduce(1))
    b_row = plgpu.layout_cast(buf["b_row"][...], layout.reduce(0))
    b_last = buf["b_col"][C - 1]
    diff = per_row(b, (C, C)) - per_col(b_row, (C, C))
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    return _Terms(beta, jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last), decay, row, col)


def _times_beta_cols(x: jax.Array, buf) -> jax.Array:
    """x diag(β) for a [C, C] x."""
    beta_row = plgpu.layout_cast(buf["beta_row"][...], plgpu.Layout.WGMMA.reduce(0))
    return x * per_col(beta_row, x.shape)


def _state_dot(buf) -> jax.Array:
    """sum(S ⊙ dS1) over [K, V], by [C, V] row blocks (bounded registers)."""
    K = buf["s"].shape[0]
    total = 0.0
    for r in range(0, K, CHUNK):
        block = lambda ref: _load(ref.at[pl.ds(r, CHUNK)])
        total = total + jnp.sum(_row_sum(block(buf["s"]) * block(buf["ds"])))
    return total


def _vector_copies(beta_ref, b_ref, bi, h, rows, names: tuple[str, ...]):
    """TMA sources of a chunk's per-step vectors: "beta_*" from beta, "b_*" from b."""
    return [((beta_ref if name.startswith("beta") else b_ref).at[bi, h, rows], name)
            for name in names]


def _issue(copies, buf, loaded) -> None:
    """Start TMA copies (source, name of the destination in ``buf``) arriving on ``loaded``."""
    for src, name in copies:
        plgpu.copy_gmem_to_smem(src, buf[name], loaded)


def _chunk_coordinates():
    n, h, bi = (jax.lax.axis_index(a) for a in ("chunks", "heads", "rows"))
    return n, h, bi, pl.ds(n * CHUNK, CHUNK)


def _kernel(cfg: _Config, q_ref, k_ref, v_ref, w_ref, t_ref, tb_ref, beta_ref, b_ref, s_ref,
            do_ref, ds_ref, *refs):
    """The gradients of one chunk."""
    dq_ref, dk_ref, dv_ref, dbeta_ref = refs[:4]
    db_refs = refs[4:6] if cfg.gated else None
    first_loaded, rest_loaded, buf = refs[-3:]
    n, h, bi, rows = _chunk_coordinates()
    sources = dict(q=q_ref.at[bi, rows, h], k=k_ref.at[bi, rows, h], v=v_ref.at[bi, rows, h],
                   w=w_ref.at[bi, rows, h], c1=tb_ref.at[bi, rows, h], s=s_ref.at[bi, n, h],
                   t=t_ref.at[bi, rows, h], do=do_ref.at[bi, rows, h], ds=ds_ref.at[bi, n, h])
    _issue([(sources[name], name) for name in FIRST_TILES]
           + _vector_copies(beta_ref, b_ref, bi, h, rows, _vector_names(cfg.gated)),
           buf, first_loaded)
    _issue([(sources[name], name) for name in REST_TILES], buf, rest_loaded)
    plgpu.barrier_wait(first_loaded)
    grads = _gradients(cfg, buf, rest_loaded)
    vectors = [("dbeta", dbeta_ref)] + ([("db_col", db_refs[0]), ("db_row", db_refs[1])]
                                        if cfg.gated else [])
    for name, ref in vectors:
        buf[name][...] = grads[name]
    plgpu.commit_smem()
    for name, ref in (("dq", dq_ref), ("dk", dk_ref), ("dv", dv_ref)):
        plgpu.copy_smem_to_gmem(buf[name], ref.at[bi, rows, h])
    for name, ref in vectors:
        plgpu.copy_smem_to_gmem(buf[name], ref.at[bi, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _vector_names(gated: bool) -> tuple[str, ...]:
    """The per-step vectors the kernel loads (each in the two register layouts it is read in)."""
    return ("beta_col", "beta_row") + (("b_col", "b_row") if gated else ())


def _gradients(cfg: _Config, buf, rest_loaded) -> dict[str, jax.Array]:
    """The module docstring's sequence on one chunk's tiles (T in ``t``, T_β in ``c1``): the
    first round's operands are loaded, T, dO and dS1 arrive on ``rest_loaded`` meanwhile.
    Leaves dq, dk, dv in their tiles and returns the vectors (dbeta and, gated, db_col,
    db_row)."""
    interp, s, C = cfg.interpret, cfg.scale, CHUNK
    f = _terms(buf, cfg.gated)
    bf16 = buf["q"].dtype
    q, k, v, w, do = (buf[x] for x in ("q", "k", "v", "w", "do"))
    st, ds = buf["s"], buf["ds"]
    t_s, c1, c2 = buf["t"], buf["c1"], buf["c2"]
    xd, xa, xk = buf["delta"], buf["d_delta"], buf["kx"]
    commit = plgpu.commit_smem
    zcc = wgmma_zeros((C, C))

    # Δ and the scores P, then dPD and dΔ.
    u, ws, qk = products((_zeros(c1, v), _zeros(w, st), zcc),
                         ((c1, v), (w, st), (q, transposed(k))), interp)
    xd[...] = (u - ws).astype(bf16)
    c1[...] = (qk * f.decay * s).astype(bf16)                          # P (over T_β)
    xk[...] = _scale_rows(_load(k), f.lam).astype(bf16)
    commit()
    plgpu.barrier_wait(rest_loaded)
    state_dot = _state_dot(buf) if cfg.gated else None
    dp, d_delta, delta_ds = summed_products(
        (zcc, _zeros(c1, do), _zeros(xd, k)),
        (((do, transposed(xd)),), ((transposed(c1), do), (xk, ds)), ((xd, transposed(ds)),)),
        interp)
    dpd = dp * f.decay * s
    c2[...] = dpd.astype(bf16)
    xa[...] = d_delta.astype(bf16)
    out = {}
    if cfg.gated:
        e = dpd * qk
        e_row, e_col = _row_sum(e), jnp.sum(e, axis=0)
        d_lam = f.lam * _row_sum(_load(k) * delta_ds)
    buf["dk"][...] = _scale_rows(delta_ds, f.lam).astype(bf16)        # overwrites Δ (K == V)
    commit()

    # dWn = dΔ S^T; dO S^T starts dq.
    dwn, do_s = products((_zeros(xa, k), _zeros(do, k)),
                         ((xa, transposed(st)), (do, transposed(st))), interp)
    if cfg.gated:
        d_gamma = s * _row_sum(_load(q) * do_s)
    xk[...] = dwn.astype(bf16)
    buf["dq"][...] = _scale_rows(do_s * s, f.gamma).astype(bf16)      # overwrites dO (K == V)
    commit()

    # dRu, dRwn, dv, dβ's first two terms.
    dru, drwn, y = products((_zeros(t_s, xa), _zeros(t_s, xk), zcc),
                            ((transposed(t_s), xa), (transposed(t_s), xk), (xa, transposed(v))),
                            interp)
    k_drwn = _row_sum(_load(k) * drwn)
    dbeta = _row_sum(dru * _load(v)) - (k_drwn if f.gamma is None else f.gamma * k_drwn)
    if cfg.gated:
        d_gamma = d_gamma - f.beta * k_drwn
    buf["dv"][...] = _scale_rows(dru, f.beta).astype(bf16)            # overwrites dΔ
    xk[...] = drwn.astype(bf16)
    c1[...] = y.astype(bf16)
    commit()

    # dA and M.
    x, kk = products((zcc, zcc), ((transposed(t_s), c1), (k, transposed(k))), interp)
    c1[...] = _times_beta_cols(-x, buf).astype(bf16)
    commit()
    (da,) = summed_products((zcc,), (((c1, transposed(t_s)), (xk, transposed(w))),), interp)
    da = jnp.where(f.row > f.col, da, 0.0)
    kkd = kk * f.decay
    dbeta = dbeta + _row_sum(da * kkd)
    m = _scale_rows(da * f.decay, f.beta)
    c1[...] = m.astype(bf16)
    if cfg.gated:
        e = m * kk
        e_row, e_col = e_row + _row_sum(e), e_col + jnp.sum(e, axis=0)

    # dq, dk.
    beta_gamma = f.beta if f.gamma is None else f.beta * f.gamma
    dk_init = _load(buf["dk"]) - _scale_rows(_load(xk), beta_gamma)
    commit()
    dq, dk = summed_products((_load(buf["dq"]), dk_init),
                             (((c2, k),), ((transposed(c2), q), (c1, k), (transposed(c1), k))),
                             interp)
    buf["dq"][...] = dq.astype(bf16)
    buf["dk"][...] = dk.astype(bf16)
    out["dbeta"] = dbeta
    if cfg.gated:
        last = plgpu.broadcasted_iota(jnp.int32, (C,), 0,
                                      layout=plgpu.Layout.WGMMA.reduce(1)) == C - 1
        d_last = jnp.sum(d_lam) + f.carry * state_dot
        out["db_col"] = (e_row + f.gamma * d_gamma - d_lam + jnp.where(last, d_last, 0.0))
        out["db_row"] = -e_col
    return out


def _buffers(K: int, V: int, gated: bool, dtype) -> dict[str, Any]:
    """The gradient kernel's shared memory by name (module docstring)."""
    C = CHUNK
    ck, cv = (lambda: tiled_smem((C, K), dtype)), (lambda: tiled_smem((C, V), dtype))
    cc = lambda: tiled_smem((C, C), dtype)
    buf = dict(k=ck(), t=cc(), c1=cc(), c2=cc(),
               **{name: _vector() for name in _vector_names(gated)},
               q=ck(), w=ck(), kx=ck(), v=cv(), do=cv(), delta=cv(), d_delta=cv(),
               s=tiled_smem((K, V), dtype), ds=tiled_smem((K, V), dtype), dbeta=_vector())
    if K != V:
        buf.update(dq=ck(), dk=ck())
    if gated:
        buf.update(db_col=_vector(), db_row=_vector())
    return buf


def _vector() -> Any:
    return plgpu.SMEM((CHUNK,), F32)


def _alias(buf: dict[str, Any], K: int, V: int) -> dict[str, Any]:
    """Names for tiles reused across disjoint lifetimes."""
    buf = dict(buf, dv=buf["d_delta"])
    if K == V:
        buf.update(dq=buf["do"], dk=buf["delta"])
    return buf


def _launch(kernel, args, out_type, buffers: dict[str, Any], copies: tuple[int, ...],
            interpret: Any) -> tuple[jax.Array, ...]:
    """Run ``kernel(*in_refs, *out_refs, *barriers, buf)`` with one CTA per (chunk, head, batch
    row); ``barriers``: one per group of TMA loads, of ``copies[i]`` arrivals; ``buf``:
    ``buffers`` allocated."""
    B, Tp, H = args[0].shape[:3]

    def body(*refs):
        pl.run_scoped(lambda **buf: kernel(*refs, buf), **buffers)

    return tuple(plgpu.kernel(
        body,
        kernel_name="delta_chunk_grads",
        out_type=tuple(out_type),
        scratch_types=[plgpu.Barrier(num_arrivals=n) for n in copies],
        grid=(Tp // CHUNK, H, B),
        grid_names=("chunks", "heads", "rows"),
        compiler_params=plgpu.CompilerParams(approx_math=True),  # exp as ex2.approx
        **({} if interpret is None else {"interpret": interpret}),
    )(*args))


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array, t: jax.Array,
                t_beta: jax.Array, beta: jax.Array, b: jax.Array | None, states: jax.Array,
                do: jax.Array, d_states: jax.Array, *, scale: float,
                interpret: Any = None) -> tuple[jax.Array, ...]:
    """The kernel on every chunk. q, k, W [B, Tp, H, K], v, dO [B, Tp, H, V] bf16 (Tp a multiple
    of CHUNK; dO the output's cotangent, unscaled), T, T_β [B, Tp, H, C] bf16 (the prepass's,
    ``for_backward``), beta [B, H, Tp] float32, b [B, H, Tp] float32 chunk-local cumulative log
    gates or None, states / d_states [B, N, H, K, V] bf16 (entering / cotangent of leaving each
    chunk). Returns (dq, dk [B, Tp, H, K], dv [B, Tp, H, V] in their
    dtypes, dβ [B, H, Tp] float32) and, gated, (db_col, db_row [B, H, Tp] float32)."""
    B, Tp, H, K = k.shape
    V = v.shape[-1]
    cfg = _Config(float(scale), b is not None, interpret is not None)
    b = b if cfg.gated else jnp.zeros((1, 1, CHUNK), F32)  # never read
    vec = jax.ShapeDtypeStruct((B, H, Tp), F32)
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype), vec] + ([vec, vec] if cfg.gated else [])
    copies = (len(FIRST_TILES) + len(_vector_names(cfg.gated)), len(REST_TILES))
    return _launch(lambda *refs: _kernel(cfg, *refs[:-1], _alias(refs[-1], K, V)),
                   (q, k, v, w, t, t_beta, beta, b, states, do, d_states), out_type,
                   _buffers(K, V, cfg.gated, k.dtype), copies, interpret)
