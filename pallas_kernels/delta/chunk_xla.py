"""Chunkwise delta rule in plain jnp (the ``impl="xla"`` path): WY / UT form, one scan over chunks.

Within a chunk of C steps entered with state S_0, let G_i be the cumulative log gate from the
chunk start to step i and D[i, j] = exp(G_i - G_j) for j <= i in the same run (0 otherwise);
Γ_i = exp(G_i) when step i is still in the run of S_0 (0 after a reset). Writing the update
as S_i = a_i S_{i-1} + k_i δ_i^T gives δ_i = β_i (v_i - a_i S_{i-1}^T k_i), i.e. the unit
lower-triangular system

    (I + A) Δ = diag(β) V - diag(β Γ) K S_0,   A[i, j] = β_i (k_i · k_j) D[i, j]  (j < i)

so with U = (I + A)^-1 diag(β) V and W = (I + A)^-1 diag(β Γ) K (independent of S_0):

    Δ   = U - W S_0
    O   = scale · (diag(Γ) Q S_0 + (Q K^T ⊙ D) Δ)
    S_C = Γ_C S_0 + (K ⊙ D[C, :])^T Δ

U, W and the masks are computed for all chunks at once; only the state recursion is a scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.delta.chunking import pad_time, run_ids

_HP = jax.lax.Precision.HIGHEST


def chunk_masks(log_gate: jax.Array, run: jax.Array, entry_run: jax.Array):
    """Decay factors of one chunk layout, in log-gate dtype.

    log_gate [..., C] per-step log gates, run [..., C] run ids, entry_run [...] run id of the
    entering state. Returns (D [..., C, C] inclusive-lower decay, Γ [..., C] decay from the
    entering state, last [..., C] = D[C-1, :] decay of each step to the chunk end).
    """
    G = jnp.cumsum(log_gate, axis=-1)
    C = log_gate.shape[-1]
    lower = jnp.arange(C)[:, None] >= jnp.arange(C)[None, :]
    same = run[..., :, None] == run[..., None, :]
    diff = G[..., :, None] - G[..., None, :]
    D = jnp.exp(jnp.where(lower & same, diff, -jnp.inf))
    gamma = jnp.where(run == entry_run[..., None], jnp.exp(G), 0.0)
    return D, gamma, D[..., -1, :]


def chunk_delta_rule_xla(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                         g: jax.Array | None, *, scale: float, initial_state: jax.Array | None,
                         segment_ids: jax.Array | None, chunk_size: int
                         ) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``delta_rule_reference`` (heads already equal); o in q's dtype, state f32+."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    Tp = N * C
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype, jnp.float32)

    def to_chunks(x):  # [B, T, H, *] -> [B, H, N, C, *]
        x = pad_time(x.astype(dtype), Tp)
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    qc, kc, vc, bc = map(to_chunks, (q, k, v, beta))
    gc = to_chunks(jnp.zeros((B, T, H), dtype) if g is None else g)
    run = pad_time(run_ids(segment_ids, B, T), Tp, edge=True).reshape(B, 1, N, C)
    entry = jnp.concatenate([run[..., :1, 0], run[..., :-1, -1]], axis=-1)  # [B, 1, N]
    D, gamma, last = chunk_masks(gc, run, entry)

    kk = jnp.einsum("bhnik,bhnjk->bhnij", kc, kc, precision=_HP)
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    A = jnp.where(strict, bc[..., None] * kk * D, 0.0)
    rhs = jnp.concatenate([bc[..., None] * vc, (bc * gamma)[..., None] * kc], axis=-1)
    eye = jnp.eye(C, dtype=dtype)
    uw = jax.scipy.linalg.solve_triangular(eye + A, rhs, lower=True, unit_diagonal=True)
    U, W = uw[..., :V], uw[..., V:]
    P = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, precision=_HP) * D
    qg = gamma[..., None] * qc
    kl = last[..., None] * kc
    gamma_end = gamma[..., -1]

    def step(s, xs):  # s [B, H, K, V]
        U_n, W_n, P_n, qg_n, kl_n, ge_n = xs
        delta = U_n - jnp.einsum("bhck,bhkv->bhcv", W_n, s, precision=_HP)
        o = scale * (jnp.einsum("bhck,bhkv->bhcv", qg_n, s, precision=_HP)
                     + jnp.einsum("bhij,bhjv->bhiv", P_n, delta, precision=_HP))
        s = ge_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", kl_n, delta, precision=_HP)
        return s, o

    s0 = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
          else initial_state.astype(dtype))
    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(map(chunk_major, (U, W, P, qg, kl, gamma_end)))
    state, o = jax.lax.scan(step, s0, xs)  # o [N, B, H, C, V]
    o = jnp.moveaxis(o, 0, 2).reshape(B, H, Tp, V)[:, :, :T]
    return jnp.moveaxis(o, 1, 2).astype(q.dtype), state
