"""Oracles for the benchmarks' correctness gate: float32, HIGHEST precision, step by step.

Kept independent of the kernels under test (and of their own reference modules) so that a
benchmark judges every implementation, ours included, against the same plain math.
Layout [B, T, H, D]; state S [B, H, K, V].

* gated linear recurrence:  S_t = diag(exp(gk_t)) · exp(g_t) · S_{t-1} + k_tᵀ v_t,  o_t = scale · q_t S_t
* (gated) delta rule:       S_t = exp(g_t) · S_{t-1} + β_t · k_tᵀ (v_t − exp(g_t) · k_t S_{t-1}),
                            o_t = scale · q_t S_t
* masked softmax:           o_i = Σ_j softmax_j(scale · q_i·k_j, j ∈ mask(i)) v_j  (rows with no
                            visible key give zeros), computed one block of queries at a time.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST


def _f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def _time_major(x):
    return None if x is None else jnp.moveaxis(x, 1, 0)


@jax.jit
def gated_linear_reference(q, k, v, g=None, gk=None, scale=None):
    """Gated linear recurrence by a scan over time (see module docstring); returns o in float32."""
    q, k, v, g, gk = _f32(q, k, v, g, gk)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    g = jnp.zeros((B, T, H), jnp.float32) if g is None else g
    gk = jnp.zeros((B, T, H, K), jnp.float32) if gk is None else gk

    def step(S, x):
        qt, kt, vt, gt, gkt = x
        S = S * (jnp.exp(gt)[..., None, None] * jnp.exp(gkt)[..., None]) + kt[..., :, None] * vt[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", qt, S, precision=HI)

    S0 = jnp.zeros((B, H, K, V), jnp.float32)
    _, o = jax.lax.scan(step, S0, tuple(map(_time_major, (q, k, v, g, gk))))
    return jnp.moveaxis(o, 0, 1)


@jax.jit
def delta_rule_reference(q, k, v, beta, g=None, scale=None):
    """(Gated) delta rule by a scan over time (see module docstring); returns o in float32."""
    q, k, v, beta, g = _f32(q, k, v, beta, g)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    g = jnp.zeros((B, T, H), jnp.float32) if g is None else g

    def step(S, x):
        qt, kt, vt, bt, gt = x
        S = S * jnp.exp(gt)[..., None, None]
        u = vt - jnp.einsum("bhk,bhkv->bhv", kt, S, precision=HI)
        S = S + bt[..., None, None] * kt[..., :, None] * u[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", qt, S, precision=HI)

    S0 = jnp.zeros((B, H, K, V), jnp.float32)
    _, o = jax.lax.scan(step, S0, tuple(map(_time_major, (q, k, v, beta, g))))
    return jnp.moveaxis(o, 0, 1)


def softmax_reference(q, k, v, visible: Callable[[jax.Array, jax.Array], jax.Array], scale=None,
                      block_q: int = 512) -> jax.Array:
    """Masked softmax attention, ``visible(i [bq,1], j [1,T]) -> bool``; GQA by head groups; float32."""
    q, k, v = _f32(q, k, v)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    k = jnp.repeat(k, H // Hkv, axis=2)
    v = jnp.repeat(v, H // Hkv, axis=2)
    nq = -(-T // block_q)
    qp = jnp.pad(q, ((0, 0), (0, nq * block_q - T), (0, 0), (0, 0))).reshape(B, nq, block_q, H, D)
    kpos = jnp.arange(T)[None, :]

    @jax.jit
    def one_block(args):
        qb, i0 = args
        s = scale * jnp.einsum("bqhd,bkhd->bhqk", qb, k, precision=HI)
        mask = visible(i0 + jnp.arange(block_q)[:, None], kpos)
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom > 0, denom, 1.0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=HI)

    outs = jax.lax.map(one_block, (jnp.moveaxis(qp, 1, 0), jnp.arange(nq) * block_q))
    return jnp.moveaxis(outs, 0, 1).reshape(B, nq * block_q, H, -1)[:, :T]
