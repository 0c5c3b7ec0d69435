"""The gated linear recurrence ops: input checks and the one place where an implementation runs.

Implementations live in ``REGISTRY`` (``pallas_kernels.common.Registry``); a third one
(e.g. a Mosaic GPU kernel for Hopper) plugs in with

    REGISTRY.register("mosaic_gpu", run, accepts, priority=0)

Both callables take ``(q, k, v, *, g, gk, scale, initial_state, segment_ids, chunk_size)`` with
inputs checked, heads equal (GQA already expanded), ``scale`` a float and ``chunk_size`` an int
or None (the implementation's default); ``accepts`` returns None or the reason it declines and
``run`` returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_common as cc
from pallas_kernels import common
from pallas_kernels.linear.pallas_op import pallas_accepts, pallas_gated_linear_attention
from pallas_kernels.linear.chunk_xla import chunk_gated_linear_xla
from pallas_kernels.linear.reference import gated_linear_reference
from pallas_kernels.mosaic_gpu_common import GPU_CHECKED

REGISTRY = common.Registry("gated linear attention")


REGISTRY.register("pallas", pallas_gated_linear_attention, pallas_accepts, priority=10)
REGISTRY.register("xla", chunk_gated_linear_xla, lambda *a, **kw: None, priority=100)


def _check(q, k, v, g, gk, initial_state, segment_ids, scale, chunk_size):
    """Validate inputs; return (q, k, v with k/v heads expanded to q heads, scale as float)."""
    B, T, H, Hkv, K, V = common.check_qkv(q, k, v)
    if g is not None:
        common.check_rank("g", g, 3, "[batch, time, heads]")
        common.check_float("g", g)
        common.check_shape("g", g, (B, T, H), "[batch, time, heads] with q's heads")
    if gk is not None:
        common.check_rank("gk", gk, 4, "[batch, time, heads, key_dim]")
        common.check_float("gk", gk)
        common.check_shape("gk", gk, (B, T, H, K), "[batch, time, heads, key_dim] with q's heads")
    if initial_state is not None:
        common.check_rank("initial_state", initial_state, 4, "[batch, heads, key_dim, value_dim]")
        common.check_float("initial_state", initial_state)
        common.check_shape("initial_state", initial_state, (B, H, K, V),
                           "[batch, heads, key_dim, value_dim]")
    common.check_segment_ids(segment_ids, B, T)
    cc.check_chunk_size(chunk_size)
    if H != Hkv:  # GQA: each q head carries its own state over the shared k/v head
        k, v = jnp.repeat(k, H // Hkv, axis=2), jnp.repeat(v, H // Hkv, axis=2)
    return q, k, v, K ** -0.5 if scale is None else float(scale)


def chunk_gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                 g: jax.Array | None = None, gk: jax.Array | None = None,
                                 scale: float | None = None,
                                 initial_state: jax.Array | None = None,
                                 output_final_state: bool = False,
                                 segment_ids: jax.Array | None = None,
                                 chunk_size: int | None = None, impl: str | None = None
                                 ) -> tuple[jax.Array, jax.Array | None]:
    """Chunkwise gated linear attention, per batch row and head with state S [K, V]:

        S_t = diag(exp(gk_t)) exp(g_t) S_{t-1} + k_t^T v_t,      o_t = scale · q_t S_t

    q, k [B, T, H(kv), K], v [B, T, Hkv, V] (GQA: H a multiple of Hkv); log gates (<= 0,
    optional) g [B, T, H] per head and gk [B, T, H, K] per key channel — none: linear
    attention; constant g: RetNet / Lightning; data-dependent g: Mamba2-SSD style; gk: GLA.
    ``initial_state`` [B, H, K, V]; the state resets where ``segment_ids`` [B, T] changes;
    ``scale`` defaults to K^-1/2; ``chunk_size`` the within-chunk length (any T works);
    ``impl`` None (auto) or a registered name ("pallas", "xla", ...).
    Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 if
    ``output_final_state`` else None).
    """
    q, k, v, scale = _check(q, k, v, g, gk, initial_state, segment_ids, scale, chunk_size)
    kwargs = dict(g=g, gk=gk, scale=scale, initial_state=initial_state,
                  segment_ids=segment_ids, chunk_size=chunk_size)
    o, state = REGISTRY.choose(impl, q, k, v, **kwargs).run(q, k, v, **kwargs)
    return o, state if output_final_state else None


def recurrent_gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                     g: jax.Array | None = None, gk: jax.Array | None = None,
                                     scale: float | None = None,
                                     initial_state: jax.Array | None = None,
                                     output_final_state: bool = False,
                                     segment_ids: jax.Array | None = None,
                                     chunk_size: int | None = None, impl: str | None = None
                                     ) -> tuple[jax.Array, jax.Array | None]:
    """Step-by-step gated linear attention (decode: one token at a time), same math and
    arguments as ``chunk_gated_linear_attention``: one scan over time for every ``impl``
    (``impl`` is validated; ``chunk_size`` accepted for a uniform signature and unused).
    Returns (o in q's dtype, float32 state or None)."""
    q, k, v, scale = _check(q, k, v, g, gk, initial_state, segment_ids, scale, chunk_size)
    REGISTRY.check_name(impl)
    o, state = gated_linear_reference(q, k, v, g=g, gk=gk, scale=scale,
                                      initial_state=initial_state, segment_ids=segment_ids)
    return o.astype(q.dtype), state.astype(jnp.float32) if output_final_state else None


# The Hopper kernel (Mosaic GPU; scalar gate or none, bf16): on H100/H200 auto picks it for the
# calls it supports once it is in GPU_CHECKED (until then only impl="mosaic_gpu" runs it); it
# declines everything else (off Hopper too).
from pallas_kernels.linear.mosaic_gpu import (mosaic_gpu_accepts,  # noqa: E402
                                              mosaic_gpu_gated_linear_attention)

REGISTRY.register("mosaic_gpu", mosaic_gpu_gated_linear_attention, mosaic_gpu_accepts, priority=0,
                  auto="linear" in GPU_CHECKED)

# The Hopper GLA kernel (Mosaic GPU; per-channel gates gk, with or without g, bf16): it accepts
# only calls with gk, which the scalar-gate kernel above declines.
from pallas_kernels.linear.mosaic_gpu_gk import (mosaic_gpu_gk_accepts,  # noqa: E402
                                                 mosaic_gpu_gk_gated_linear_attention)

REGISTRY.register("mosaic_gpu_gk", mosaic_gpu_gk_gated_linear_attention, mosaic_gpu_gk_accepts,
                  priority=0, auto="linear_gk" in GPU_CHECKED)
