"""Forward Pallas kernel of block-sparse flash attention (online softmax over visited key blocks).

Grid (B, Hq, nq, fwd_width); the visit axis is sequential. For query block i the kernel walks
the key blocks j listed in the block map (scalar prefetch: the BlockSpec index maps fetch only
those), keeping per row

    m' = max(m, max_k s),   l' = e^(m - m') l + sum_k p,   acc' = e^(m - m') acc + p v,
    p  = e^(s - m') on allowed pairs, 0 elsewhere,

and finally o = acc / l (0 where l = 0: nothing allowed) and lse = m + log l (+inf where l = 0).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse.kernel_util import (MASK_VALUE, KernelConfig, forward_coords, kv_side_spec,
                                               logits, mask_inputs, q_side_spec, split_mask_refs,
                                               visit_block)


def _forward_kernel(index_ref, kind_ref, tile_index_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig):
    q_seg_ref, k_seg_ref, tile_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = split_mask_refs(cfg, list(refs))
    b, h, i, j = (pl.program_id(a) for a in range(4))
    c = forward_coords(cfg, b, h, i, j, index_ref)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(mask):
        s, _ = logits(cfg, q_ref[...], k_ref[...])
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = alpha * acc_scr[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_scr[...] = m_new

    visit_block(cfg, kind_ref[c.slot], i, c.k_block, tile_ref, q_seg_ref, k_seg_ref, update)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_scr[...]
        seen = l > 0
        o_ref[...] = jnp.where(seen, acc_scr[...] / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def forward(cfg: KernelConfig, q: jax.Array, k: jax.Array, v: jax.Array, q_seg, k_seg,
            maps: tuple) -> tuple[jax.Array, jax.Array]:
    """o [B, Hq, Tp, Dv] (q's dtype) and lse [B, Hq, Tp, 1] float32 from [B, H, Tp, D] inputs."""
    fwd_index, fwd_kind, fwd_tile, _, _, _, tiles = maps
    B, Hq, Tp, D = q.shape
    Dv = v.shape[-1]
    bq = cfg.meta.block_q
    extra_specs, extra = mask_inputs(cfg, forward_coords, q_seg, k_seg, tiles)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, Hq, cfg.num_q_blocks, cfg.fwd_width),
        in_specs=[q_side_spec(cfg, forward_coords, D), kv_side_spec(cfg, forward_coords, D),
                  kv_side_spec(cfg, forward_coords, Dv), *extra_specs],
        out_specs=[q_side_spec(cfg, forward_coords, Dv), q_side_spec(cfg, forward_coords, 1)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, Dv), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, Hq, Tp, Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
    )(fwd_index.reshape(-1), fwd_kind.reshape(-1), fwd_tile.reshape(-1), q, k, v, *extra)
