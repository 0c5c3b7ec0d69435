"""Backward Pallas kernels of block-sparse flash attention.

With the saved lse and delta = rowsum(do * o), every visited (query block, key block) tile gives

    p  = e^(s - lse) on allowed pairs, 0 elsewhere
    dp = do v^T,   ds = p (dp - delta) [ (1 - tanh^2(s_raw / c)) with a soft cap c ]
    dq += scale ds k,   dk += scale ds^T q,   dv += p^T do.

dq kernel: grid (B, Hq, nq, fwd_width), the forward block map. dk/dv kernel: grid
(B, Hkv, nk, groups * bwd_width), the transposed map; for GQA the q heads of a k/v head's group
are walked on the same sequential axis, so dk/dv are summed in VMEM, never repeated in HBM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse.kernel_util import (KernelConfig, dot_nt, dot_tn, forward_coords,
                                               kv_side_spec, logits, mask_inputs, q_side_spec,
                                               split_mask_refs, transposed_coords, visit_block)

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _probs_and_dscores(cfg: KernelConfig, mask, q, k, v, do, lse, delta):
    """(p, ds) of one tile, both [bq, bk] float32 (see the module docstring)."""
    s, t = logits(cfg, q, k)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dot_nt(do, v) - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dq_kernel(index_ref, kind_ref, tile_index_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, cfg: KernelConfig):
    q_seg_ref, k_seg_ref, tile_ref, (dq_ref, dq_scr) = split_mask_refs(cfg, list(refs))
    b, h, i, j = (pl.program_id(a) for a in range(4))
    c = forward_coords(cfg, b, h, i, j, index_ref)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def update(mask):
        k = k_ref[...]
        _, ds = _probs_and_dscores(cfg, mask, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                                   delta_ref[...])
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    visit_block(cfg, kind_ref[c.slot], i, c.k_block, tile_ref, q_seg_ref, k_seg_ref, update)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(index_ref, kind_ref, tile_index_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, cfg: KernelConfig):
    q_seg_ref, k_seg_ref, tile_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = split_mask_refs(cfg, list(refs))
    b, hk, kb, j = (pl.program_id(a) for a in range(4))
    c = transposed_coords(cfg, b, hk, kb, j, index_ref)

    @pl.when(j == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def update(mask):
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dscores(cfg, mask, q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...])
        dv_scr[...] += dot_tn(p.astype(do.dtype), do)
        dk_scr[...] += dot_tn(ds.astype(q.dtype), q)

    visit_block(cfg, kind_ref[c.slot], c.q_block, kb, tile_ref, q_seg_ref, k_seg_ref, update)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _q_side_inputs(cfg: KernelConfig, coords_fn, D: int, Dv: int) -> list[pl.BlockSpec]:
    """Specs of (q, k, v, do, lse, delta) for a grid walked by ``coords_fn``."""
    return [q_side_spec(cfg, coords_fn, D), kv_side_spec(cfg, coords_fn, D), kv_side_spec(cfg, coords_fn, Dv),
            q_side_spec(cfg, coords_fn, Dv), q_side_spec(cfg, coords_fn, 1), q_side_spec(cfg, coords_fn, 1)]


def backward(cfg: KernelConfig, q, k, v, q_seg, k_seg, maps: tuple, do, lse, delta):
    """(dq, dk, dv) in the dtypes of (q, k, v), all [B, H, Tp, D]."""
    fwd_index, fwd_kind, fwd_tile, bwd_index, bwd_kind, bwd_tile, tiles = maps
    B, Hq, Tp, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    bq, bk = cfg.meta.block_q, cfg.meta.block_k
    inputs = (q, k, v, do, lse, delta)

    specs, extra = mask_inputs(cfg, forward_coords, q_seg, k_seg, tiles)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, Hq, cfg.num_q_blocks, cfg.fwd_width),
            in_specs=_q_side_inputs(cfg, forward_coords, D, Dv) + specs,
            out_specs=q_side_spec(cfg, forward_coords, D),
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=cfg.interpret,
    )(fwd_index.reshape(-1), fwd_kind.reshape(-1), fwd_tile.reshape(-1), *inputs, *extra)

    specs, extra = mask_inputs(cfg, transposed_coords, q_seg, k_seg, tiles)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, Hkv, cfg.num_k_blocks, cfg.groups * cfg.bwd_width),
            in_specs=_q_side_inputs(cfg, transposed_coords, D, Dv) + specs,
            out_specs=[kv_side_spec(cfg, transposed_coords, D), kv_side_spec(cfg, transposed_coords, Dv)],
            scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, Dv), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=cfg.interpret,
    )(bwd_index.reshape(-1), bwd_kind.reshape(-1), bwd_tile.reshape(-1), *inputs, *extra)
    return dq, dk, dv
