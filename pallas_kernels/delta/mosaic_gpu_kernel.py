"""The Hopper (Mosaic GPU) walk kernels of the chunkwise (gated) delta rule.

Per batch row and head, state S [K, V] float32, log gate g_t <= 0 per step (or none), chunks of
C = 64 steps; b_i = sum_{s <= i in the chunk} g_s the chunk-local cumulative log gate (<= 0, so
every exponent below is <= 0 and nothing overflows), and per chunk

    D_ij = e^{b_i - b_j} [j <= i],  Γ_i = e^{b_i},  λ_i = e^{b_{C-1} - b_i},  γ = e^{b_{C-1}}.

The WY / UT prepass (``mosaic_gpu_prepass``, chunk-parallel, independent of the state) hands
every chunk its T_β = T diag(β) [C, C], T = (I + A)^-1, A = strictly-lower(diag(β) K K^T ⊙ D)
(and, for the backward, W = T diag(β Γ) K [C, K]). What is left is the sequential part: the
walks below, one CTA per (V blocks, head, batch row), chunks in order, the f32 state block
[K, 64] of each warpgroup in registers (two warpgroups share a CTA's q/k tiles for V = 128,
except at small B·H: ``default_groups``).

``forward`` (chunks first to last), S the state entering the chunk; with U = T_β V and
W = T_β diag(Γ) K the WY form Δ = U - W S is T_β (V - Γ ⊙ (K S)), formed here so that W and U
never travel through HBM (the walk reads T_β, 8 KB a chunk, instead of W and U, 32 KB at
K = V = 128; one more round of products on the sequential path). Each warpgroup carries its
block *transposed*, S^T [64, K], so that on the sequential path S -> Y -> Δ -> S_next every
product takes its left operand from registers (no shared-memory round trip, no fence):

    Y^T      = v^T - (S^T k^T) ⊙ Γ                         wgmma 1: S^T k^T (also S^T q^T, q k^T)
    Δ^T      = Y^T T_β^T                                   wgmma 2 (meanwhile A -> SMEM)
    o^T      = scale (S^T q^T) ⊙ Γ + Δ^T A^T,  A = scale (q k^T ⊙ D)      wgmma 3: Δ^T A^T
    S_next^T = γ S^T + (Δ^T ⊙ λ) k                           wgmma 3: (Δ^T λ) k

(Γ, λ along the columns, which are time here.) v^T is read from its [C, 64] tile transposed,
o^T written into its [C, 64] tile transposed; s0 and the final state cross the kernel boundary
as [B, H, V, K] (``walk`` transposes them).

``reverse`` (chunks last to first) carries R, the cotangent of the state *leaving* the chunk
(from the final state's cotangent), with dO the output's cotangent:

    dΔ     = scale ((k q^T) ⊙ D^T) dO + λ ⊙ (k R)            wgmma 1: k q^T, k R;  2: A' dO
    R_prev = γ R + q^T (scale Γ ⊙ dO) - W^T dΔ             wgmma 2: q^T (Γ dO); 3: W^T (-dΔ)

and after chunk 0 holds the initial state's cotangent.

Both walks read q, k [C, K] and the chunk's matrix M (T_β [C, C] forward, W [C, K] reverse),
shared by the warpgroups, one [C, 64] tile per warpgroup (v forward, dO reverse) and b; they
arrive by TMA, double-buffered (warpgroup 0 issues the copies; a slot is refilled once every
warpgroup is done reading it). The products run on the tensor cores (bf16 operands, f32
accumulators); the reverse walk reads a bf16 copy of its carry from shared memory.
``save_states`` writes the bf16 carry at the start of each chunk to an output [B, N, H, K, V]
(forward: the state entering chunk n, stored transposed into a [K, 64] tile; reverse: the
cotangent of the state leaving it), which the chunk-parallel backward reads.

``piece_maps`` (the sequence split's extra pass, ``Walk.maps``): both walks are affine in
their carry, carry_out = M carry_in + E, so one launch over V + K carried columns gives both
parts: the first V columns from zero with x (E), the last K from the identity with x taken as
zero (M; their warpgroups read x's last block and scale it by 0). The forward map pass forms
neither the scores nor o (no q tile, no output).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu_common import (Registers, TileRing, carry_state, kernel_name,
                                              launch_walk, load_transposed, num_sms, per_col,
                                              per_row, pl, plgpu, products, tiled_smem,
                                              transposed, warpgroup_index, wgmma_zeros)

CHUNK = 64          # steps per chunk (the wgmma M of one warpgroup)
V_BLOCK = 64        # value columns per warpgroup
STAGES = 2          # TMA buffering depth of the per-chunk tiles
HEAD_DIMS = (64, 128)
WARP_SPECIALIZED = False  # the forward's two-warpgroup form (mosaic_gpu_ws): not yet GPU-checked


@dataclasses.dataclass(frozen=True)
class Walk:
    """Static configuration of one kernel launch."""
    chunks: int
    scale: float
    gated: bool
    reverse: bool
    has_s0: bool
    save_states: bool
    groups: int          # warpgroups per CTA, each with its own V block of 64 columns
    interpret: bool
    maps: bool = False   # the piece-map pass: value columns past x's are the identity's


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One chunk's shared-memory operands, as seen by warpgroup ``w``."""
    q: Any          # [C, K] bf16 (TMA slot)
    k: Any          # [C, K]
    m: Any          # [C, C] T_β (forward) or [C, K] W (reverse)
    x: Any          # [C, 64] v (forward) or dO (reverse), this warpgroup's columns
    state: Any      # [K, 64] bf16 copy of the carried state
    a: Any          # [C, C] masked, decayed scores
    y1: Any         # [C, 64] Δ then o (forward), scale Γ dO (reverse)
    y2: Any         # [C, 64] -dΔ (reverse)
    stage: tuple = (None, None, None)  # interpret mode: the forward's register operands' tiles


def _forward_chunk(cfg: Walk, t: Tiles, state_t, gate, keep):
    """One forward chunk (module docstring) on the transposed state S^T [64, K] (float32
    registers, also the bf16 left operand of the tensor-core products, so the sequential path
    S -> Y -> Δ -> S_next never passes through shared memory); returns (S_next^T, o^T [64, C]),
    and in the piece-map pass (``cfg.maps``: no q, no o; v scaled by ``keep``) (S_next^T, None)."""
    C, Vb = t.a.shape[0], state_t.shape[0]
    dtype = t.k.dtype
    s_lo = Registers(state_t.astype(dtype), t.stage[0])
    if cfg.maps:
        (ks_t,) = products((wgmma_zeros((Vb, C)),), ((s_lo, transposed(t.k)),), cfg.interpret)
    else:
        ks_t, qs_t, scores = products(
            (wgmma_zeros((Vb, C)), wgmma_zeros((Vb, C)), wgmma_zeros((C, C))),
            ((s_lo, transposed(t.k)), (s_lo, transposed(t.q)), (t.q, transposed(t.k))),
            cfg.interpret)
    causal = gate.row >= gate.col
    if cfg.gated:
        ks_t = ks_t * per_col(jnp.exp(gate.b_row), (Vb, C))
    v_t = load_transposed(t.x).astype(jnp.float32)
    y_t = (v_t if keep is None else v_t * keep) - ks_t

    def store_scores():  # A = scale (q k^T ⊙ D), masked, while the tensor cores form Δ
        decayed = scores * jnp.exp(jnp.where(causal, gate.diff(), 0.0)) if cfg.gated else scores
        t.a[...] = jnp.where(causal, decayed * cfg.scale, 0.0).astype(t.a.dtype)
        plgpu.commit_smem()

    (delta_t,) = products((wgmma_zeros((Vb, C)),),
                          ((Registers(y_t.astype(dtype), t.stage[1]), transposed(t.m)),),
                          cfg.interpret, during=None if cfg.maps else store_scores)
    delta_last = delta_t
    if cfg.gated:
        delta_last = delta_t * per_col(jnp.exp(gate.b_last - gate.b_row), (Vb, C))
        state_t = state_t * jnp.exp(gate.b_last)
    if cfg.maps:
        (state_t,) = products((state_t,), ((Registers(delta_last.astype(dtype), t.stage[1]),
                                             t.k),), cfg.interpret)
        return state_t, None
    qs_t = qs_t * (per_col(cfg.scale * jnp.exp(gate.b_row), (Vb, C)) if cfg.gated else cfg.scale)
    state_t, o_t = products(
        (state_t, qs_t),
        ((Registers(delta_last.astype(dtype), t.stage[1]), t.k),
         (Registers(delta_t.astype(dtype), t.stage[2]), transposed(t.a))), cfg.interpret)
    return state_t, o_t


def _reverse_chunk(cfg: Walk, t: Tiles, carry, gate, keep):
    """One reverse chunk (module docstring); returns (the cotangent entering it, None). In the
    piece-map pass dO is scaled by ``keep`` (both of its products)."""
    C, Vb = t.a.shape[0], t.y1.shape[-1]
    layout = plgpu.Layout.WGMMA
    kq, kr = products((wgmma_zeros((C, C)), wgmma_zeros((C, Vb))),
                      ((t.k, transposed(t.q)), (t.k, t.state)), cfg.interpret)
    do = plgpu.layout_cast(t.x[...], layout).astype(jnp.float32)
    anti_causal = gate.row <= gate.col
    if cfg.gated:
        kq = kq * jnp.exp(jnp.where(anti_causal, -gate.diff(), 0.0))
        kr = kr * per_row(jnp.exp(gate.b_last - gate.b_col), (C, Vb))
        gdo = do * per_row(cfg.scale * jnp.exp(gate.b_col), (C, Vb))
        carry = carry * jnp.exp(gate.b_last)
    else:
        gdo = do * cfg.scale
    scale = cfg.scale if keep is None else cfg.scale * keep
    gdo = gdo if keep is None else gdo * keep
    t.a[...] = jnp.where(anti_causal, kq * scale, 0.0).astype(t.a.dtype)
    t.y1[...] = gdo.astype(t.y1.dtype)
    plgpu.commit_smem()
    d_delta, carry = products((kr, carry), ((t.a, t.x), (transposed(t.q), t.y1)), cfg.interpret)
    t.y2[...] = (-d_delta).astype(t.y2.dtype)
    plgpu.commit_smem()
    (carry,) = products((carry,), ((transposed(t.m), t.y2),), cfg.interpret)
    return carry, None


@dataclasses.dataclass(frozen=True)
class Gate:
    """The chunk's b in the two register layouts it is read in, its last value, and iotas."""
    b_col: Any
    b_row: Any
    b_last: Any
    row: Any
    col: Any

    @classmethod
    def read(cls, bc_smem: Any, br_smem: Any, slot: jax.Array, row: Any, col: Any) -> Gate:
        """The gate of the chunk in ring ``slot`` from b's two SMEM copies ([STAGES, C] each,
        one per register layout)."""
        layout = plgpu.Layout.WGMMA
        return cls(plgpu.layout_cast(bc_smem[slot], layout.reduce(1)),
                   plgpu.layout_cast(br_smem[slot], layout.reduce(0)),
                   bc_smem[slot, row.shape[0] - 1], row, col)

    def diff(self):
        """[C, C] b_i - b_j."""
        shape = self.row.shape
        return per_row(self.b_col, shape) - per_col(self.b_row, shape)


def _kernel(cfg: Walk, q_ref, k_ref, m_ref, x_ref, b_ref, s0_ref, *refs):
    """One CTA: V blocks ``vb``, head ``h``, batch row ``bi``; warpgroup ``w`` owns the value
    columns of block ``vb * groups + w``."""
    refs = list(refs)
    o_ref = None if cfg.reverse or cfg.maps else refs.pop(0)
    states_ref = refs.pop(0) if cfg.save_states else None
    sf_ref, loaded, consumed, s0_loaded = refs
    vb, h, bi = (jax.lax.axis_index(n) for n in ("vblocks", "heads", "rows"))
    w = warpgroup_index(cfg.groups, h)
    K, C, Vb = k_ref.shape[-1], CHUNK, V_BLOCK
    cols = pl.ds((vb * cfg.groups + w) * Vb, Vb)
    dtype = k_ref.dtype
    scratch = [tiled_smem((STAGES, C, K), dtype) for _ in range(2)]            # q, k
    scratch += [tiled_smem((STAGES, C, m_ref.shape[-1]), dtype)]              # T_β or W
    scratch += [tiled_smem((cfg.groups, STAGES, C, Vb), dtype),                # U or dO
                plgpu.SMEM((STAGES, C), jnp.float32),                         # b, as a column
                plgpu.SMEM((STAGES, C), jnp.float32),                         # b, as a row
                tiled_smem((cfg.groups, K, Vb), dtype),                       # bf16 state
                tiled_smem((cfg.groups, C, C), dtype)]                        # A
    scratch += [tiled_smem((cfg.groups, C, Vb), dtype) for _ in range(2)]     # y1, y2
    if cfg.interpret and not cfg.reverse:  # staging of the register operands
        scratch += [tiled_smem((cfg.groups, Vb, K), dtype),
                    tiled_smem((cfg.groups, 2, Vb, C), dtype)]
    loop = functools.partial(_walk, cfg, (q_ref, k_ref, m_ref, x_ref, b_ref), o_ref, states_ref,
                             loaded, consumed, (bi, h, vb, w))
    # the forward carries S^T: its s0 and final state arrive and leave as [B, H, V, K]
    block = (lambda ref: ref.at[bi, h, :, cols]) if cfg.reverse else (
        lambda ref: ref.at[bi, h, cols, :])
    rows, columns = (K, Vb) if cfg.reverse else (Vb, K)
    carry_state(loop, scratch, groups=cfg.groups, w=w, rows=rows, cols=columns,
                s0_src=block(s0_ref) if cfg.has_s0 else None, s0_loaded=s0_loaded,
                sf_dst=block(sf_ref))


def _walk(cfg: Walk, in_refs, o_ref, states_ref, loaded, consumed, where, state,
          q_smem, k_smem, m_smem, x_smem, bc_smem, br_smem, s_smem, a_smem, y1_smem, y2_smem,
          *stage_smem):
    """The chunk loop of one warpgroup; returns its final carried state block."""
    q_ref, k_ref, m_ref, x_ref, b_ref = in_refs
    bi, h, vb, w = where
    C, Vb, N, G = CHUNK, V_BLOCK, cfg.chunks, cfg.groups
    cols = pl.ds((vb * G + w) * Vb, Vb)
    chunk_at = (lambda n: N - 1 - n) if cfg.reverse else (lambda n: n)
    layout = plgpu.Layout.WGMMA
    step = _reverse_chunk if cfg.reverse else _forward_chunk
    skip_q = int(cfg.maps and not cfg.reverse)
    x_blocks = x_ref.shape[-1] // Vb
    keep = ((vb * G + w < x_blocks).astype(jnp.float32) if cfg.maps else None)

    def issue_loads(n, slot):
        rows = pl.ds(chunk_at(n) * C, C)
        bar = loaded.at[slot]
        for ref, buf in ((q_ref, q_smem), (k_ref, k_smem), (m_ref, m_smem))[skip_q:]:
            plgpu.copy_gmem_to_smem(ref.at[bi, rows, h], buf.at[slot], bar)
        for g in range(G):  # the identity's columns (maps) read x's last block, times 0
            g_cols = pl.ds(jnp.minimum(vb * G + g, x_blocks - 1) * Vb, Vb)
            plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, h, g_cols], x_smem.at[g, slot], bar)
        if cfg.gated:  # b twice: one buffer per register layout it is read in
            for buf in (bc_smem, br_smem):
                plgpu.copy_gmem_to_smem(b_ref.at[bi, h, rows], buf.at[slot], bar)

    def store_state(state):
        """The bf16 copy of the carry: the reverse walk's product operand; the forward's
        (S^T in registers) only for ``save_states``, written transposed."""
        if cfg.reverse:
            s_smem[w] = state.astype(s_smem.dtype)
        elif cfg.save_states:
            transposed(s_smem.at[w])[...] = state.astype(s_smem.dtype)

    ring = TileRing(issue_loads, stages=STAGES, num_chunks=N, groups=G, w=w, consumed=consumed)
    ring.prefill()
    store_state(state)
    plgpu.commit_smem()
    row = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=layout)
    col = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=layout)

    def chunk_step(n, state):
        slot = jax.lax.rem(n, STAGES)
        chunk = chunk_at(n)
        plgpu.barrier_wait(loaded.at[slot])
        if cfg.save_states:
            plgpu.copy_smem_to_gmem(s_smem.at[w], states_ref.at[bi, chunk, h, :, cols])
        gate = (Gate.read(bc_smem, br_smem, slot, row, col) if cfg.gated
                else Gate(None, None, None, row, col))
        stage = ((stage_smem[0].at[w], stage_smem[1].at[w, 0], stage_smem[1].at[w, 1])
                 if stage_smem else (None,) * 3)
        tiles = Tiles(q_smem.at[slot], k_smem.at[slot], m_smem.at[slot], x_smem.at[w, slot],
                      s_smem.at[w], a_smem.at[w], y1_smem.at[w], y2_smem.at[w], stage)
        state, o = step(cfg, tiles, state, gate, keep)
        ring.release(n, slot)  # every read of this slot is done

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the saved state has left s_smem
        store_state(state)
        if o is not None:  # o^T [64, C] into the [C, 64] tile
            transposed(y1_smem.at[w])[...] = o.astype(y1_smem.dtype)
        plgpu.commit_smem()
        if o is not None:
            plgpu.copy_smem_to_gmem(y1_smem.at[w], o_ref.at[bi, pl.ds(chunk * C, C), h, cols])
        return state

    state = jax.lax.fori_loop(0, N, chunk_step, state)
    plgpu.wait_smem_to_gmem(0)
    return state


def default_groups(batch_heads: int, V: int) -> int:
    """Warpgroups per CTA: two (sharing the q, k, T_β / W tiles, so each chunk's loads serve
    two V blocks) unless one CTA per V block still fits in one wave of the device's SMs (small
    B·H, long T), where twice the CTAs walk the sequence in parallel. Measured on the H100 with
    two per CTA: T = 64k, B = 1, H = 16 (16 CTAs on 132 SMs) ran the forward 2.4x slower than
    jax-linear-attention (one CTA per V block)."""
    blocks = V // V_BLOCK
    return 1 if blocks % 2 or batch_heads * blocks <= num_sms() else 2


def walk(q: jax.Array, k: jax.Array, m: jax.Array, x: jax.Array, b: jax.Array | None,
         s0: jax.Array | None, *, scale: float, reverse: bool = False,
         save_states: bool = False, groups: int | None = None,
         interpret: Any = None) -> tuple[jax.Array, ...]:
    """The kernel call. q, k [B, Tp, H, K], m (forward: T_β [B, Tp, H, CHUNK]; reverse: W
    [B, Tp, H, K]) and x [B, Tp, H, V] (v forward, dO reverse) bf16 with Tp a multiple of
    CHUNK; b [B, H, Tp] float32 chunk-local cumulative log gates or None; s0 [B, H, K, V]
    float32 the carry entering the walk (forward: the initial state; reverse: the final state's
    cotangent) or None (zeros). ``groups``: warpgroups (V blocks of 64) per CTA,
    default ``default_groups``.
    Returns forward (o [B, Tp, H, V] in q's dtype, final state [B, H, K, V] f32), reverse (the
    initial state's cotangent [B, H, K, V] f32,); with ``save_states`` one more output, the bf16
    carried state of every chunk [B, N, H, K, V] (module docstring)."""
    swap = lambda x: x if reverse else jnp.swapaxes(x, -1, -2)  # the forward carries S^T
    outs = _launch(q, k, m, x, b, None if s0 is None else swap(s0), scale=scale,
                   reverse=reverse, save_states=save_states, groups=groups, interpret=interpret)
    outs = outs[:-1] + (swap(outs[-1]),)
    if save_states:  # the final carry last, the per-chunk states after it
        outs = outs[:-2] + (outs[-1], outs[-2])
    return outs


def piece_maps(q: jax.Array, k: jax.Array, m: jax.Array, x: jax.Array, b: jax.Array | None, *,
               scale: float, reverse: bool = False,
               interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """The affine map of every walk, carry_out = M carry_in + E (walk order; arguments as in
    ``walk``, one batch row per piece of a sequence split): one walk over V + K columns, the
    first V from zero with x (E), the last K from the identity with x read as zero (M: the
    walk is linear in the carry, column j of the identity goes to column j of M). The forward
    map reads neither q nor writes o. Returns (M [B, H, K, K], E [B, H, K, V]) float32."""
    B, _, H, K = k.shape
    V = x.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K))
    s0 = jnp.concatenate([jnp.zeros((B, H, K, V), jnp.float32), eye], axis=-1)
    s0 = s0 if reverse else jnp.swapaxes(s0, -1, -2)
    (final,) = _launch(q, k, m, x, b, s0, scale=scale, reverse=reverse, save_states=False,
                       groups=None, interpret=interpret, maps=True)
    final = final if reverse else jnp.swapaxes(final, -1, -2)
    return final[..., V:], final[..., :V]


def _launch(q, k, m, x, b, s0, *, scale: float, reverse: bool, save_states: bool,
            groups: int | None, interpret: Any, maps: bool = False) -> tuple[jax.Array, ...]:
    """``walk``'s kernel launch, on the carry as the kernel holds it (forward: S^T, s0 and the
    final state [B, H, V', K]; reverse: [B, H, K, V']) with V' = V, or V + K for ``maps``.
    With ``WARP_SPECIALIZED`` the forward runs ``mosaic_gpu_ws`` (one V block per CTA)."""
    B, Tp, H, K = k.shape
    V = x.shape[-1]
    Vc = V + K if maps else V  # carried value columns
    N = Tp // CHUNK
    specialized = WARP_SPECIALIZED and not (reverse or maps)
    groups = 1 if specialized else default_groups(B * H, Vc) if groups is None else groups
    if Tp % CHUNK or Vc % (V_BLOCK * groups) or K not in HEAD_DIMS:
        raise ValueError(f"walk: T={Tp} must be a multiple of {CHUNK}, V={Vc} of "
                         f"{V_BLOCK}*groups={V_BLOCK * groups}, K={K} in {HEAD_DIMS}")
    m_shape = (B, Tp, H, K if reverse else CHUNK)
    if m.shape != m_shape:
        raise ValueError(f"walk: m has shape {m.shape}; the {'reverse' if reverse else 'forward'}"
                         f" walk reads {'W' if reverse else 'T_beta'} of shape {m_shape}")
    cfg = Walk(N, float(scale), b is not None, reverse, s0 is not None, save_states, groups,
               interpret is not None, maps)
    placeholder = lambda shape: jnp.zeros(shape, jnp.float32)  # never read
    b = b if cfg.gated else placeholder((1, 1, CHUNK))
    s0 = s0 if cfg.has_s0 else placeholder((1, 1, V_BLOCK, V_BLOCK))
    state_shape = (B, H, K, Vc) if reverse else (B, H, Vc, K)
    out_type = [] if reverse or maps else [jax.ShapeDtypeStruct((B, Tp, H, V), q.dtype)]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((B, N, H, K, V), k.dtype))
    out_type.append(jax.ShapeDtypeStruct(state_shape, jnp.float32))
    if specialized:
        from pallas_kernels.delta import mosaic_gpu_ws  # it builds on this module
        return mosaic_gpu_ws.launch(cfg, (q, k, m, x, b, s0), out_type, interpret)
    copies = 3 + groups + (2 if cfg.gated else 0) - (1 if maps and not reverse else 0)
    return launch_walk(functools.partial(_kernel, cfg), (q, k, m, x, b, s0), out_type=out_type,
                       copies=copies, stages=STAGES, groups=groups,
                       grid=(Vc // (V_BLOCK * groups), H, B), interpret=interpret,
                       approx_math=True, name=kernel_name("delta_walk", reverse=reverse,
                                                          maps=maps, saves=save_states))
