"""Block-sparse softmax layers with content-based block selection: MoBA-style and NSA-style.

Keys are cut into blocks of ``block_size`` tokens, summarised by their mean k̄_j (and v̄_j).
Query block i (tokens i*bs .. i*bs+bs-1) picks its key blocks with its first query q_a, the
block's anchor, so the choice never depends on a later token and decoding reproduces it
(``pallas_kernels.sparse.select_blocks`` scores with the mean query of the block, which reads
later tokens of the block; the layers therefore make their own causal choice):

  MoBA (Lu et al. 2025):  score_hij = q_a,h . k̄_j for complete earlier blocks j < i (same
      document); the top_k blocks per head plus block i itself (causal inside) are attended:
      o_t = softmax attention of q_t over the keys of those blocks.
  NSA  (Yuan et al. 2025): three branches mixed by learned gates, y_t = sum_c sigmoid(x_t W_c) o_c:
      compressed  o_cmp_t = softmax attention of q_t over (k̄_j, v̄_j) for complete blocks,
                  (j+1)*bs <= t+1;
      selected    top_k blocks by the compressed-attention probabilities of the anchor, summed
                  over the heads of a GQA group (one choice per group), plus block i;
      window      softmax attention over the last ``window`` keys.
Both apply RoPE to q and k. The selected and window branches run ``flash_attention`` with a
device ``BlockSparse`` (kernel blocks = ``block_size``) and ``Local`` mask; the compressed
branch is plain jnp over T x T/bs scores. Packed documents stay separate when every document
starts on a block boundary (blocks are scored only within the anchor's document).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import sparse as sparse_ops

from attnlab.layers.common import default_positions, dense
from attnlab.layers.registry import register_attention
from attnlab.layers.softmax import (SoftmaxAttention, append_kv_cache, attend_kv_cache,
                                    causal_mask, decode_positions)


def block_means(x: jax.Array, block_size: int) -> jax.Array:
    """Mean over each block of ``block_size`` steps: [B, T, H, D] -> [B, ceil(T/bs), H, D] f32
    (a last partial block is averaged over the steps it has)."""
    B, T = x.shape[:2]
    nb = -(-T // block_size)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block_size - T), (0, 0), (0, 0)))
    count = jnp.minimum(block_size, T - jnp.arange(nb) * block_size).astype(jnp.float32)
    return xp.reshape(B, nb, block_size, *x.shape[2:]).sum(2) / count[:, None, None]


def block_scores(q: jax.Array, k_means: jax.Array, scale: float) -> jax.Array:
    """scale * q . k̄_j for q [B, n, H, D] and k̄ [B, nb, Hkv, D] (GQA) -> [B, H, n, nb] f32."""
    B, n, H, D = q.shape
    hkv = k_means.shape[2]
    qg = q.astype(jnp.float32).reshape(B, n, hkv, H // hkv, D)
    return jnp.einsum("bnhgd,bjhd->bhgnj", qg, k_means).reshape(B, H, n, -1) * scale


def masked_softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``allowed``; rows with nothing allowed give 0."""
    s = jnp.where(allowed, scores, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def top_blocks(scores: jax.Array, allowed: jax.Array, top_k: int) -> jax.Array:
    """Indices [..., min(top_k, nb)] of the best allowed blocks; -1 where fewer are allowed."""
    vals, idx = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), min(top_k, scores.shape[-1]))
    return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32)


def group_pool(probs: jax.Array, num_kv_heads: int) -> jax.Array:
    """Sum [B, H, ...] over the q heads of each GQA group and give the sum to every head."""
    B, H = probs.shape[:2]
    pooled = probs.reshape(B, num_kv_heads, H // num_kv_heads, *probs.shape[2:]).sum(2)
    return jnp.repeat(pooled, H // num_kv_heads, axis=1)


def forward_anchors(q: jax.Array, segment_ids: jax.Array | None, block_size: int
                    ) -> tuple[jax.Array, jax.Array]:
    """Anchor queries [B, nq, H, D] (first query of each block) and the allowed key blocks
    [B, 1, nq, nb]: j < i and block j starts in the anchor's document."""
    B, T = q.shape[:2]
    nq = -(-T // block_size)
    i = jnp.arange(nq)
    allowed = (i[None, :] < i[:, None])[None, None]
    if segment_ids is not None:
        seg = segment_ids[:, ::block_size]
        allowed = allowed & (seg[:, None, None, :] == seg[:, None, :, None])
    return q[:, ::block_size], allowed


def decode_anchors(q: jax.Array, anchor: jax.Array, start: jax.Array, block_size: int,
                   num_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Anchors of t new tokens at slots start .. start+t-1: the new query at the block start if it
    is among them, else the cached ``anchor`` [B, H, D]. Returns (anchors [B, t, H, D], the
    allowed blocks j < p // bs [1, 1, t, nb], the anchor to cache)."""
    t = q.shape[1]
    p = start + jnp.arange(t)
    rel = (p // block_size) * block_size - start
    from_new = jnp.take(q, jnp.clip(rel, 0, t - 1), axis=1)
    anchors = jnp.where((rel >= 0)[None, :, None, None], from_new, anchor[:, None].astype(q.dtype))
    allowed = (jnp.arange(num_blocks)[None, :] < (p // block_size)[:, None])[None, None]
    return anchors, allowed, anchors[:, -1]


def selected_block_mask(selected: jax.Array, start: jax.Array, length: int,
                        block_size: int) -> jax.Array:
    """Cache-slot mask [B, H, t, max_len]: slot s is in a selected block or in the query's block."""
    t = selected.shape[2]
    q_block = (start + jnp.arange(t)) // block_size
    k_block = jnp.arange(length) // block_size
    hit = jnp.any(selected[..., None] == k_block, axis=-2)
    return hit | (k_block[None, :] == q_block[:, None])[None, None]


def block_sparse_mask(selected: jax.Array, block_size: int) -> Any:
    """flash-attention mask: the selected key blocks of each query block, plus its own (causal)."""
    B, H, nq, _ = selected.shape
    own = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[None, None, :, None], (B, H, nq, 1))
    blocks = jnp.concatenate([selected, own], axis=-1)
    return sparse_ops.BlockSparse(blocks, block_size, block_size) & sparse_ops.Causal()


class _BlockSelectAttention(SoftmaxAttention):
    """Shared parts of the block-selection layers: options, anchors in the cache, helpers."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, block_size: int = 64, top_k: int = 4,
                 **kwargs: Any):
        if block_size < 1 or top_k < 1:
            raise ValueError(f"block_size and top_k must be >= 1, got {block_size}, {top_k}")
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, **kwargs)
        self.block_size, self.top_k = block_size, top_k

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, Any]:
        """KV cache (max_len rounded up to whole blocks) and the current block's anchor query."""
        length = -(-max_len // self.block_size) * self.block_size
        return {"kv": super().init_cache(batch_size, length),
                "anchor": jnp.zeros((batch_size, self.num_heads, self.head_dim), self.dtype)}

    def _selection(self, scores: jax.Array, allowed: jax.Array) -> jax.Array:
        """Selected blocks from anchor scores [B, H, n, nb] (family rule)."""
        raise NotImplementedError

    def _selected_forward(self, q, k, v, segment_ids):
        anchors, allowed = forward_anchors(q, segment_ids, self.block_size)
        k_means = block_means(k, self.block_size)
        selected = self._selection(block_scores(anchors, k_means, self.head_dim ** -0.5), allowed)
        return sparse_ops.flash_attention(
            q, k, v, mask=block_sparse_mask(selected, self.block_size), segment_ids=segment_ids,
            logits_soft_cap=self.soft_cap, block_sizes=(self.block_size, self.block_size),
            impl=self.impl)

    def _selected_decode(self, q, kv, anchor, start):
        length = kv["k"].shape[1]
        k_means = block_means(kv["k"], self.block_size)
        anchors, allowed, anchor = decode_anchors(q, anchor, start, self.block_size,
                                                  k_means.shape[1])
        selected = self._selection(block_scores(anchors, k_means, self.head_dim ** -0.5), allowed)
        key_mask = selected_block_mask(selected, start, length, self.block_size)
        o = attend_kv_cache(q, kv, start, soft_cap=self.soft_cap, scale=self.head_dim ** -0.5,
                            key_mask=key_mask)
        return o, anchor

    def _decode_inputs(self, x, cache, positions):
        B, t, _ = x.shape
        start = cache["kv"]["index"]
        q, k, v = self._project(x, decode_positions(positions, start, B, t))
        return q, append_kv_cache(cache["kv"], k, v), start


@register_attention("moba", code="B")
class MoBAAttention(_BlockSelectAttention):
    """MoBA-style block attention: per head, the top_k earlier key blocks by anchor . mean key,
    plus the query's own block. Options: block_size (64), top_k (4), rope_theta,
    logits_soft_cap, impl."""

    def _selection(self, scores, allowed):
        return top_blocks(scores, allowed, self.top_k)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        B, T, _ = x.shape
        positions = default_positions(segment_ids, B, T) if positions is None else positions
        q, k, v = self._project(x, positions)
        return self._merge(self._selected_forward(q, k, v, segment_ids))

    def decode(self, x: jax.Array, cache: dict[str, Any], positions: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, Any]]:
        q, kv, start = self._decode_inputs(x, cache, positions)
        o, anchor = self._selected_decode(q, kv, cache["anchor"], start)
        return self._merge(o), {"kv": kv, "anchor": anchor}


@register_attention("nsa", code="N")
class NSAAttention(_BlockSelectAttention):
    """NSA-style attention: compressed + selected + sliding-window branches, sigmoid-gated per head.
    Options: block_size (64), top_k (4), window (128), rope_theta, logits_soft_cap, impl."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, window: int = 128, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **kwargs)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.branch_window = window
        self.gate_proj = dense(d_model, 3 * self.num_heads, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def _selection(self, scores, allowed):
        probs = group_pool(masked_softmax(scores, allowed), self.num_kv_heads)
        return top_blocks(probs, allowed, self.top_k)

    def _compressed(self, q, k_means, v_means, allowed):
        """Softmax attention of q [B, t, H, D] over block means, allowed [B|1, 1, t, nb]."""
        B, t, H, D = q.shape
        p = masked_softmax(block_scores(q, k_means, D ** -0.5), allowed)  # [B, H, t, nb]
        hkv = v_means.shape[2]
        pg = p.reshape(B, hkv, H // hkv, t, -1)
        return jnp.einsum("bhgtj,bjhd->bthgd", pg, v_means).reshape(B, t, H, D).astype(q.dtype)

    def _mix(self, x, o_cmp, o_sel, o_win):
        gates = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))
        gates = gates.reshape(*x.shape[:2], self.num_heads, 3, 1)
        o = sum(gates[:, :, :, c] * o.astype(jnp.float32)
                for c, o in enumerate((o_cmp, o_sel, o_win)))
        return self._merge(o.astype(self.dtype))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        B, T, _ = x.shape
        positions = default_positions(segment_ids, B, T) if positions is None else positions
        q, k, v = self._project(x, positions)
        bs = self.block_size
        t = jnp.arange(T)
        nb = -(-T // bs)
        allowed = (((jnp.arange(nb) + 1) * bs)[None, :] <= t[:, None] + 1)[None, None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, ::bs][:, None, None, :]
                                 == segment_ids[:, None, :, None])
        o_cmp = self._compressed(q, block_means(k, bs), block_means(v, bs), allowed)
        o_sel = self._selected_forward(q, k, v, segment_ids)
        o_win = sparse_ops.flash_attention(q, k, v, mask=causal_mask(self.branch_window),
                                           segment_ids=segment_ids,
                                           logits_soft_cap=self.soft_cap, impl=self.impl)
        return self._mix(x, o_cmp, o_sel, o_win)

    def decode(self, x: jax.Array, cache: dict[str, Any], positions: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, Any]]:
        q, kv, start = self._decode_inputs(x, cache, positions)
        bs = self.block_size
        k_means, v_means = block_means(kv["k"], bs), block_means(kv["v"], bs)
        p = start + jnp.arange(x.shape[1])
        allowed = (((jnp.arange(k_means.shape[1]) + 1) * bs)[None, :] <= p[:, None] + 1)[None, None]
        o_cmp = self._compressed(q, k_means, v_means, allowed)
        o_sel, anchor = self._selected_decode(q, kv, cache["anchor"], start)
        o_win = attend_kv_cache(q, kv, start, window=self.branch_window, soft_cap=self.soft_cap,
                                scale=self.head_dim ** -0.5)
        return self._mix(x, o_cmp, o_sel, o_win), {"kv": kv, "anchor": anchor}
