"""The math of one chunk of the (gated) delta rule, for one head, on 2-D arrays (plain jnp).

Used twice: vmapped over (batch, head, chunk) by the XLA path, and on loaded blocks inside the
Pallas kernels. Chunk of C steps entered with state S0 [K, V]; ``b`` [C, 1] the in-chunk
cumulative log gate (``pallas_kernels.chunk_common``; None = DeltaNet), ``r`` the in-chunk
segment counts (None = no segments). Masks and decays (every factor <= 1):

    D[i, j] = e^{b_i - b_j} [j <= i, r_i = r_j]      Γ_i = e^{b_i} [r_i = 0]
    λ_j = e^{b_{C-1} - b_j} [r_j = r_{C-1}]          γ = e^{b_{C-1}} [r_{C-1} = 0]

With S_i = a_i S_{i-1} + k_i δ_i^T, δ_i = β_i (v_i - a_i S_{i-1}^T k_i) solves the unit
lower-triangular system (I + A) Δ = diag(β) V - diag(β Γ) K S0, A = strictly-lower(β k k^T ⊙ D):

    T = (I + A)^-1,  U = T (β V),  W = T (β Γ K)               (``prepare``: independent of S0)
    Δ = U - W S0
    O = Γ Q S0 + (Q K^T ⊙ D) Δ                                  (unscaled; callers scale)
    S1 = γ S0 + (λ K)^T Δ                                        (``apply``)

T is formed with matmuls only: A is nilpotent (A^C = 0), so with N = -A,
    (I + A)^-1 = sum_{p < C} N^p = (I + N)(I + N^2)(I + N^4) ... (I + N^{2^{m-1}}),  2^m >= C,
2 log2(C) [C, C] matmuls, no row-by-row substitution (no dynamic row slicing in a kernel, and
tensor-core / MXU friendly).

``backward`` takes dO already multiplied by ``scale`` and dS1, and returns dq, dk, dv, dβ, the
gradient of b as a column part plus a row part (summed by the caller, who also turns db into dg
by a reverse in-chunk cumsum), and dS0:

    dΔ  = (Q K^T ⊙ D)^T dO + (λ K) dS1          dW = -dΔ S0^T
    dRu = T^T dΔ,  dRw = T^T dW                  dA = -strictly-lower(dRu U^T + dRw W^T)
    dS0 = (Γ Q)^T dO + γ dS1 - W^T dΔ
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_common import and_mask, causal_mask, decay_matrix, masked_exp, same_run
from pallas_kernels.chunk_common import dot as _dot, dot_nt as _dot_nt, dot_tn as _dot_tn

F32 = jnp.float32


class Gates(NamedTuple):
    """Gate and segment terms of one chunk; None where absent (static structure)."""
    b: jax.Array | None          # [C, 1] in-chunk cumulative log gate
    b_row: jax.Array | None      # [1, C] the same as a row
    r_col: jax.Array | None      # [C, 1] int32 in-chunk segment counts
    r_row: jax.Array | None      # [1, C]


class Prepared(NamedTuple):
    """State-independent terms of one chunk (see the module docstring)."""
    D: jax.Array        # [C, C]
    gamma: jax.Array    # [C, 1]
    lam: jax.Array      # [C, 1]
    carry: jax.Array    # [1, 1]
    kk: jax.Array       # [C, C] k k^T
    T: jax.Array        # [C, C] (I + A)^-1
    U: jax.Array        # [C, V]
    W: jax.Array        # [C, K]


def _strict_lower(C: int) -> jax.Array:
    return causal_mask(C, C, col_offset=1)


def inverse_unit_lower(a: jax.Array) -> jax.Array:
    """(I + a)^-1 for a strictly lower-triangular [C, C] ``a``, by recursive doubling over
    diagonal blocks: with T_s the inverse of the diagonal blocks of size s of I + a (T_1 = I)
    and L_s the entries of ``a`` inside a diagonal block of size 2s but not of size s,

        T_2s = T_s - (T_s L_s) T_s          (exact: the block formula of a 2x2 lower inverse),

    two matmuls per level, ceil(log2 C) levels. Every factor is a true sub-inverse or a block
    of ``a``, so nothing grows; the power series sum (-a)^p (the earlier form here) builds
    entries up to C(C-1, p) |a|^p for strongly correlated keys and cancels away all precision
    even in float32. Blocks are told apart by i XOR j (s is a power of two): no division."""
    C = a.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    inverse = (row == col).astype(F32)
    block = jnp.bitwise_xor(row, col)  # < s  <=>  i and j share their aligned block of size s
    s = 1
    while s < C:
        lower = jnp.where((block >= s) & (block < 2 * s), a, 0.0)
        inverse = inverse - _dot(_dot(inverse, lower), inverse)
        s *= 2
    return inverse


def _decays(C: int, gates: Gates):
    """(D, Γ, λ, γ) of the module docstring."""
    seg = same_run(gates.r_col, gates.r_row)
    mask = and_mask(causal_mask(C, C), seg)
    b, r = gates.b, gates.r_col
    reads = None if r is None else r == 0
    writes = None if r is None else r == r[C - 1:, :]
    survives = None if r is None else r[C - 1:, :] == 0
    if b is None:
        one = lambda m, shape: jnp.ones(shape, F32) if m is None else m.astype(F32)
        return mask.astype(F32), one(reads, (C, 1)), one(writes, (C, 1)), one(survives, (1, 1))
    ok = lambda m, x: jnp.ones(x.shape, bool) if m is None else jnp.broadcast_to(m, x.shape)
    b_last = b[C - 1:, :]
    return (decay_matrix(b, gates.b_row, mask), masked_exp(b, ok(reads, b)),
            masked_exp(b_last - b, ok(writes, b)), masked_exp(b_last, ok(survives, b_last)))


def prepare(k: jax.Array, v: jax.Array, beta: jax.Array, gates: Gates) -> Prepared:
    """k [C, K], v [C, V], beta [C, 1] (float32) -> the chunk's state-independent terms."""
    C = k.shape[0]
    D, gamma, lam, carry = _decays(C, gates)
    kk = _dot_nt(k, k)
    T = inverse_unit_lower(jnp.where(_strict_lower(C), beta * kk * D, 0.0))
    return Prepared(D, gamma, lam, carry, kk, T, _dot(T, beta * v), _dot(T, beta * gamma * k))


def apply(p: Prepared, q: jax.Array, k: jax.Array, s0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(O unscaled [C, V], S1 [K, V]) from the entering state s0 [K, V]."""
    delta = p.U - _dot(p.W, s0)
    o = _dot(p.gamma * q, s0) + _dot(_dot_nt(q, k) * p.D, delta)
    return o, p.carry * s0 + _dot_tn(p.lam * k, delta)


def backward(q, k, v, beta, gates: Gates, s0, do, ds1):
    """Gradients of one chunk (do = scale * dO). Returns (dq, dk, dv, dbeta [C, 1],
    db_col [C, 1], db_row [1, C], ds0); db_col/db_row are zeros when ungated."""
    C = k.shape[0]
    p = prepare(k, v, beta, gates)
    delta = p.U - _dot(p.W, s0)
    qk = _dot_nt(q, k)
    P = qk * p.D
    lam_k = p.lam * k
    d_delta = _dot_tn(P, do) + _dot(lam_k, ds1)
    ds0 = _dot_tn(p.gamma * q, do) + p.carry * ds1 - _dot_tn(p.W, d_delta)
    dW = -_dot_nt(d_delta, s0)
    dRu, dRw = _dot_tn(p.T, d_delta), _dot_tn(p.T, dW)
    dA = -jnp.where(_strict_lower(C), _dot_nt(dRu, p.U) + _dot_nt(dRw, p.W), 0.0)
    dP = _dot_nt(do, delta)
    do_s = _dot_nt(do, s0)             # dO S0^T [C, K]
    delta_ds = _dot_nt(delta, ds1)     # Δ dS1^T [C, K]
    M = dA * beta * p.D
    dq = _dot(dP * p.D, k) + p.gamma * do_s
    dk = (_dot_tn(dP * p.D, q) + _dot(M, k) + _dot_tn(M, k) + beta * p.gamma * dRw
          + p.lam * delta_ds)
    dv = beta * dRu
    row_sum = lambda x: jnp.sum(x, axis=1, keepdims=True)
    dbeta = row_sum(dRu * v) + row_sum(dRw * p.gamma * k) + row_sum(dA * p.kk * p.D)
    if gates.b is None:
        return dq, dk, dv, dbeta, jnp.zeros((C, 1), F32), jnp.zeros((1, C), F32), ds0
    E = (dP * qk + dA * beta * p.kk) * p.D
    d_gamma = row_sum(q * do_s) + beta * row_sum(k * dRw)
    d_lam = p.lam * row_sum(k * delta_ds)
    d_last = jnp.sum(d_lam, keepdims=True).reshape(1, 1) + p.carry * jnp.sum(s0 * ds1)
    is_last = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
    db_col = row_sum(E) + p.gamma * d_gamma - d_lam + jnp.where(is_last, d_last, 0.0)
    db_row = -jnp.sum(E, axis=0, keepdims=True)
    return dq, dk, dv, dbeta, db_col, db_row, ds0
