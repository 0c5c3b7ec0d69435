"""Float64 NumPy oracle for the sparse attention tests (forward and gradients) and input helpers."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from kernel_utils import normal, random_segments


def allowed_matrix(mask, T: int, B: int, Hq: int, segment_ids=None) -> np.ndarray:
    """bool [B, Hq, T, T] from the mask's element values (host, small T only) and segments."""
    vals = np.asarray(mask.values(np.arange(T), np.arange(T)))
    allowed = np.broadcast_to(vals, (B, Hq, T, T)).copy()
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed &= (seg[:, :, None] == seg[:, None, :])[:, None]
    return allowed


def oracle(q, k, v, allowed, scale=None, cap=None, do=None):
    """Masked softmax attention in float64; with ``do`` also (dq, dk, dv). Empty rows give 0."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if cap is not None:
        t = np.tanh(s / cap)
        s = cap * t
    s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(-1, keepdims=True)
    P = p / np.where(l > 0, l, 1.0)
    o = np.einsum("bhqk,bkhd->bqhd", P, vr)
    if do is None:
        return o
    do = np.asarray(jnp.asarray(do, jnp.float32), np.float64)
    dP = np.einsum("bqhd,bkhd->bhqk", do, vr)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))
    if cap is not None:
        dS = dS * (1 - t * t)
    dq = np.einsum("bhqk,bkhd->bqhd", dS, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", dS, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", P, do)
    B, T, Hkv = k.shape[:3]
    dk = dk.reshape(B, T, Hkv, G, -1).sum(3)
    dv = dv.reshape(B, T, Hkv, G, -1).sum(3)
    return o, (dq, dk, dv)


def qkv(seed: int, B: int, T: int, Hq: int, Hkv: int, D: int, Dv: int | None = None, dtype=jnp.float32):
    """Fresh random q, k, v and an output cotangent."""
    ks = jax.random.split(jax.random.key(seed), 4)
    Dv = D if Dv is None else Dv
    return (normal(ks[0], (B, T, Hq, D), dtype), normal(ks[1], (B, T, Hkv, D), dtype),
            normal(ks[2], (B, T, Hkv, Dv), dtype), normal(ks[3], (B, T, Hq, Dv), dtype))


def segments(seed: int, B: int, T: int):
    return random_segments(jax.random.key(seed), B, T)
