"""Shared checks for kernel tests: relative error against a float64 reference, NaN never passes."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

# DESIGN.md thresholds (relative L2 error).
TOL_F32 = 1e-4
TOL_BF16 = 2e-2


def rel_err(out, ref, floor: float = 1e-30) -> float:
    """||out - ref|| / max(||ref||, floor); ``floor`` is the scale to judge against where the
    reference is (near) zero by construction."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {out.shape} vs {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / max(denom, floor))


def assert_close(out, ref, tol: float, what: str = "output", floor: float = 1e-30) -> None:
    err = rel_err(out, ref, floor)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def tol_for(dtype) -> float:
    return TOL_BF16 if jnp.dtype(dtype) == jnp.bfloat16 else TOL_F32


def normal(key, shape, dtype=jnp.float32, scale: float = 1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def log_gate(key, shape, low: float = -1.0, high: float = -0.01):
    """Random log-space gate values in [low, high] (<= 0)."""
    return jax.random.uniform(key, shape, jnp.float32, low, high)


def random_segments(key, B: int, T: int, max_docs: int = 4):
    """Sorted segment ids per row, starting at 0, with random boundaries."""
    cuts = jax.random.randint(key, (B, max_docs - 1), 1, max(T, 2))
    t = jnp.arange(T)
    return jnp.sum(t[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)
