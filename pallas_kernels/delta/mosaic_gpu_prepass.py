"""The WY / UT prepass of the delta rule on Hopper (Mosaic GPU): per chunk, independent of the
state, so every (chunk, head, batch row) is its own CTA (one warpgroup).

Chunk of C = 64 steps, b the chunk-local cumulative log gate (zeros without g), Γ_i = e^{b_i},
D_ij = e^{b_i - b_j} on j <= i:

    A = strictly-lower(diag(β) (k k^T) ⊙ D)          wgmma: k k^T
    T = (I + A)^-1                                    by recursive doubling, below
    T_β = T diag(β)  [C, C]

T_β leaves in bf16 for the forward walk (``mosaic_gpu_kernel``), which forms the WY product
Δ = T_β (v - Γ ⊙ k S) itself, so W and U never travel through HBM in the plain forward: per
chunk the prepass reads k (16 KB at K = 128) and writes 8 KB. Under the vjp (``for_backward``)
T and W = T diag(β Γ) k [C, K] (wgmma: T (β Γ k)) leave too, in bf16, for the backward (the
reverse walk reads W; the chunk-gradient kernel ``mosaic_gpu_grads`` reads W, T and T_β and so
needs no kernel of its own to recompute them).

Recursive doubling (stable; no powers of A). T_s, the inverse of the diagonal blocks of I + A
of size s, is block diagonal; with L_s the part of A in the lower off-diagonal blocks of the
diagonal blocks of size 2s (entries i > j in one 2s block but not one s block),

    T_2s = T_s - (T_s L_s) T_s       (exact: (T_s L_s)^2 = 0),   T_1 = I,  T_2 = I - L_1,

five levels of two products each up to s = 64 (the wgmma operands in bf16, T accumulated in
float32): the same recursion as ``chunk_math.inverse_unit_lower``; ``invert_unit_lower``.
Every operand is a true inverse of a sub-block or a block of A, so nothing grows (a power
series sum (-A)^p forms entries up to C(63, p)·β^p for strongly correlated keys and cancels
away all precision even in float32; checked in ``tests/test_delta_mosaic_gpu.py`` and
``tests/test_delta_utils.py``).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import (per_col, per_row, pl, plgpu, products, tiled_smem,
                                              transposed, wgmma_zeros)

CHUNK = 64


def invert_unit_lower(a: jax.Array, row: jax.Array, col: jax.Array, scratch: tuple[Any, Any, Any],
                      interpret: bool) -> jax.Array:
    """(I + a)^-1 (float32, wgmma layout) for a strictly lower-triangular [C, C] ``a`` (float32,
    wgmma layout) by the recursive doubling of the module docstring; ``row``, ``col``: int32
    iotas of ``a``'s shape; ``scratch``: three [C, C] bf16 tiles (T_s, L_s, -T_s L_s) that the
    products read, free again on return."""
    t_smem, l_smem, p_smem = scratch
    C = a.shape[0]
    eye = jnp.where(row == col, 1.0, 0.0)
    off_block = lambda s: ((jax.lax.div(row, 2 * s) == jax.lax.div(col, 2 * s))
                           & (jax.lax.div(row, s) != jax.lax.div(col, s)))
    t = eye - jnp.where(off_block(1), a, 0.0)
    s = 2
    while s < C:
        t_smem[...] = t.astype(t_smem.dtype)
        l_smem[...] = jnp.where(off_block(s), a, 0.0).astype(l_smem.dtype)
        plgpu.commit_smem()
        (tl,) = products((wgmma_zeros((C, C)),), ((t_smem, l_smem),), interpret)
        p_smem[...] = (-tl).astype(p_smem.dtype)
        plgpu.commit_smem()
        (t,) = products((t,), ((p_smem, t_smem),), interpret)
        s *= 2
    return t


def _kernel(gated: bool, for_backward: bool, interpret: bool, k_ref, beta_ref, b_ref, *refs):
    """One chunk: T_β (and, ``for_backward``, W and T) to HBM. ``refs``: the outputs, then the
    scratch of ``prepass``."""
    n_out = 3 if for_backward else 1
    outs, (k_smem, bc_smem, br_smem, beta_smem, beta_row_smem, t_smem, l_smem, p_smem,
           loaded) = refs[:n_out], refs[n_out:]
    n, h, bi = (jax.lax.axis_index(a) for a in ("chunks", "heads", "rows"))
    C = CHUNK
    rows = pl.ds(n * C, C)
    layout = plgpu.Layout.WGMMA
    plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, h], k_smem, loaded)
    for buf in (beta_smem, beta_row_smem):  # β twice: one buffer per register layout
        plgpu.copy_gmem_to_smem(beta_ref.at[bi, h, rows], buf, loaded)
    if gated:
        for buf in (bc_smem, br_smem):
            plgpu.copy_gmem_to_smem(b_ref.at[bi, h, rows], buf, loaded)
    plgpu.barrier_wait(loaded)
    (kk,) = products((wgmma_zeros((C, C)),), ((k_smem, transposed(k_smem)),), interpret)
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=layout)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=layout)
    beta = plgpu.layout_cast(beta_smem[...], layout.reduce(1))
    a = kk * per_row(beta, (C, C))
    if gated:
        b_col = plgpu.layout_cast(bc_smem[...], layout.reduce(1))
        b_row = plgpu.layout_cast(br_smem[...], layout.reduce(0))
        diff = per_row(b_col, (C, C)) - per_col(b_row, (C, C))
        a = a * jnp.exp(jnp.where(row > col, diff, 0.0))
    t = invert_unit_lower(jnp.where(row > col, a, 0.0), row, col, (t_smem, l_smem, p_smem),
                          interpret)
    beta_row = plgpu.layout_cast(beta_row_smem[...], layout.reduce(0))
    l_smem[...] = (t * per_col(beta_row, (C, C))).astype(l_smem.dtype)
    if for_backward:
        row_scale_k = beta * jnp.exp(b_col) if gated else beta  # β Γ, the row factor of W
        k_scaled = plgpu.layout_cast(k_smem[...], layout).astype(jnp.float32) * per_row(
            row_scale_k, k_smem.shape)
        t_smem[...] = t.astype(t_smem.dtype)
        k_smem[...] = k_scaled.astype(k_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(l_smem, outs[0].at[bi, rows, h])
    if for_backward:  # T leaves while W's product runs
        plgpu.copy_smem_to_gmem(t_smem, outs[2].at[bi, rows, h])
        (w,) = products((wgmma_zeros(k_smem.shape),), ((t_smem, k_smem),), interpret)
        k_smem[...] = w.astype(k_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, outs[1].at[bi, rows, h])
    plgpu.wait_smem_to_gmem(0)


def prepass(k: jax.Array, beta: jax.Array, b: jax.Array | None, *, for_backward: bool = False,
            interpret: Any = None) -> tuple[jax.Array, ...]:
    """k [B, Tp, H, K] bf16 (Tp a multiple of CHUNK), beta [B, H, Tp] float32, b [B, H, Tp]
    float32 chunk-local cumulative log gates or None. Returns (T_β,), T_β = T diag(β)
    [B, Tp, H, C] in k's dtype (chunk n's [C, C] matrix in rows n C .. n C + C - 1); with
    ``for_backward`` (T_β, W [B, Tp, H, K], T [B, Tp, H, C]), W and T for the backward."""
    B, Tp, H, K = k.shape
    C = CHUNK
    gated = b is not None
    b = b if gated else jnp.zeros((1, 1, C), jnp.float32)  # never read
    dtype = k.dtype
    tile = jax.ShapeDtypeStruct((B, Tp, H, C), dtype)
    vector = lambda: plgpu.SMEM((C,), jnp.float32)
    return plgpu.kernel(
        functools.partial(_kernel, gated, for_backward, interpret is not None),
        kernel_name="delta_prepass",
        out_type=(tile,) + ((jax.ShapeDtypeStruct(k.shape, dtype), tile) if for_backward else ()),
        scratch_types=[tiled_smem((C, K), dtype)] + [vector() for _ in range(4)] + [
            tiled_smem((C, C), dtype) for _ in range(3)] + [
            plgpu.Barrier(num_arrivals=3 + (2 if gated else 0))],
        grid=(Tp // C, H, B),
        grid_names=("chunks", "heads", "rows"),
        compiler_params=plgpu.CompilerParams(approx_math=True),  # exp as ex2.approx
        **({} if interpret is None else {"interpret": interpret}),
    )(k, beta, b)
