"""The delta-rule ops: input checks and the one place where an implementation is chosen.

Implementations are registered by name with a ``run`` and an ``accepts`` function:

    register_implementation("mosaic_gpu", run, accepts, priority=0)   # e.g. a Hopper kernel

``impl=None`` (auto) tries them by ascending priority and runs the first whose ``accepts``
returns None (fail-closed: a string is the reason it declines); ``impl="<name>"`` runs that one
or raises with its reason. Both take ``(q, k, v, beta, g, *, scale, initial_state, segment_ids,
chunk_size)`` with inputs checked, heads equal (GQA already expanded), ``scale`` a float and
``chunk_size`` an int or None (the implementation's own default); ``run`` returns
(o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.delta.chunk_xla import chunk_delta_rule_xla
from pallas_kernels.delta.chunking import chunk_for
from pallas_kernels.delta.pallas_op import pallas_accepts, pallas_chunk_delta_rule
from pallas_kernels.delta.reference import delta_rule_reference
from pallas_kernels.mosaic_gpu_common import GPU_CHECKED


REGISTRY = common.Registry("delta rule")


def register_implementation(name: str, run: Callable[..., tuple[jax.Array, jax.Array]],
                            accepts: Callable[..., str | None], *, priority: int,
                            auto: bool = True) -> None:
    """Register (or replace) an implementation; lower ``priority`` is tried first by auto
    (``auto=False``: only ``impl=name`` runs it)."""
    REGISTRY.register(name, run, accepts, priority=priority, auto=auto)


def implementations() -> list[str]:
    """Registered implementation names in auto order."""
    return REGISTRY.names()


def _xla_run(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size):
    o, state = chunk_delta_rule_xla(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids,
                                    chunk=chunk_for(q.shape[1], chunk_size))
    return o, state.astype(jnp.float32)


register_implementation("pallas", pallas_chunk_delta_rule, pallas_accepts, priority=10)
register_implementation("xla", _xla_run, lambda *a, **kw: None, priority=100)


def _check(q, k, v, beta, g, initial_state, segment_ids, scale):
    """Validate inputs; return (q, k, v with k/v heads expanded to q heads, scale as float)."""
    B, T, H, Hkv, K, V = common.check_qkv(q, k, v)
    if beta is None:
        raise ValueError("beta [batch, time, heads] is required")
    for name, x in (("beta", beta), ("g", g)):
        if x is None:
            continue
        common.check_rank(name, x, 3, "[batch, time, heads]")
        common.check_float(name, x)
        common.check_shape(name, x, (B, T, H), "[batch, time, heads] with q's heads")
    if initial_state is not None:
        common.check_float("initial_state", initial_state)
        common.check_shape("initial_state", initial_state, (B, H, K, V),
                           "[batch, heads, key_dim, value_dim]")
    common.check_segment_ids(segment_ids, B, T)
    if H != Hkv:  # GQA: each q head carries its own state over the shared k/v head
        k, v = jnp.repeat(k, H // Hkv, axis=2), jnp.repeat(v, H // Hkv, axis=2)
    return q, k, v, K ** -0.5 if scale is None else float(scale)


def chunk_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *,
                     g: jax.Array | None = None, scale: float | None = None,
                     initial_state: jax.Array | None = None, output_final_state: bool = False,
                     segment_ids: jax.Array | None = None, chunk_size: int | None = None,
                     impl: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Chunkwise (gated) delta rule, per batch row and head with state S [K, V]:

        S_t = exp(g_t) S_{t-1} + beta_t k_t ⊗ (v_t - exp(g_t) S_{t-1}^T k_t),   o_t = scale q_t S_t

    q, k [B, T, H(kv), K], v [B, T, Hkv, V] (GQA: H a multiple of Hkv), beta in (0, 1) and the
    log gate g <= 0 (None = DeltaNet, given = Gated DeltaNet) [B, T, H]; ``initial_state``
    [B, H, K, V]; the state resets at ``segment_ids`` [B, T] changes; ``scale`` defaults to
    K^-1/2; ``chunk_size`` the within-chunk length (any T works); ``impl`` None (auto) or a
    registered name ("pallas", "xla", ...). Returns (o [B, T, H, V] in q's dtype, final state
    [B, H, K, V] float32 if ``output_final_state`` else None).
    """
    q, k, v, scale = _check(q, k, v, beta, g, initial_state, segment_ids, scale)
    cc.check_chunk_size(chunk_size)
    kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                  chunk_size=chunk_size)
    chosen = REGISTRY.choose(impl, q, k, v, beta, g, **kwargs)
    o, state = chosen.run(q, k, v, beta, g, **kwargs)
    return o, state if output_final_state else None


def recurrent_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *,
                         g: jax.Array | None = None, scale: float | None = None,
                         initial_state: jax.Array | None = None, output_final_state: bool = False,
                         segment_ids: jax.Array | None = None, chunk_size: int | None = None,
                         impl: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Step-by-step delta rule (decode: one token at a time), same math and arguments as
    ``chunk_delta_rule``. One scan over time for every ``impl``; ``chunk_size`` is accepted for
    a uniform signature and unused. Returns (o in q's dtype, float32 state or None)."""
    q, k, v, scale = _check(q, k, v, beta, g, initial_state, segment_ids, scale)
    REGISTRY.check_name(impl)
    cc.check_chunk_size(chunk_size)
    o, state = delta_rule_reference(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids)
    return o.astype(q.dtype), state.astype(jnp.float32) if output_final_state else None


# The Hopper kernels (Mosaic GPU; bf16, K and V in {64, 128}): auto picks them on H100/H200 for
# the calls they support; they decline everything else (off Hopper too).
from pallas_kernels.delta.mosaic_gpu import (mosaic_gpu_accepts,  # noqa: E402
                                             mosaic_gpu_chunk_delta_rule)

register_implementation("mosaic_gpu", mosaic_gpu_chunk_delta_rule, mosaic_gpu_accepts, priority=0,
                        auto="delta" in GPU_CHECKED)
