"""Shared pieces of the Hopper (Mosaic GPU, ``plgpu.kernel``) kernels of every op family.

* ``pl`` / ``plgpu``: the Pallas front ends (None where this jax has no Mosaic GPU);
* ``tiled_smem``: a shared-memory tile laid out for TMA and ``wgmma`` (bf16 (8, 64) tiles,
  128-byte swizzle);
* ``products``: ``init + a @ b`` for several (a, b) operand pairs on the tensor cores (``a``
  in shared memory or ``Registers``), with the fallback the CPU GPU-interpreter needs;
* ``summed_products``: the same with several products summed into each accumulator;
* ``wgmma_zeros``: a float32 zero array in the ``wgmma`` register layout;
* ``load_transposed``: a shared-memory tile read transposed into that layout;
* ``store_split``: a float32 array written to shared memory as bf16 hi (+ lo) parts, so that
  tensor-core products with the parts, summed, read it to ~float32 accuracy;
* ``warpgroup_index``, ``carry_state``, ``TileRing`` and ``launch_walk``: the frame of the walk
  kernels (linear, GLA, delta), whose warpgroups each carry a float32 state block through a
  chunk loop fed by a ring of TMA-loaded tile slots;
* ``is_hopper`` and ``hopper_accepts``: the common part of every Hopper kernel's ``accepts``.

CPU check: ``interpret=plgpu.InterpretGPUParams()`` (jax >= 0.12) runs these kernels on CPU.
The interpreter has no ``run_state`` and no register-operand wgmma, so under it each product
goes to a fresh accumulator that is added afterwards; compiled, the products accumulate in place.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

try:  # the Mosaic GPU front end of Pallas; its API moves between jax versions
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
    pl = plgpu = None

SWIZZLE = 128  # bytes: 64 bf16 per swizzled row segment

# The Hopper kernels auto dispatch may choose: a kernel's name goes here once its
# experiments/check_mosaic_*.py has passed on an H100 with the current code. The others run
# only when asked for (impl="mosaic_gpu", ...): no unchecked kernel is picked silently.
# "delta": the forward walk on the transposed state (392ba9f, 062cb4e): check_mosaic_delta's cases
# 0, 2-6 passed on the H100 (experiments/results/h100_2026-11-24_s7_call1, _s7_call2); with the
# sequence split and exp as ex2.approx (d685502) cases 3 and 8-10 (split into 4 and 8 pieces:
# gate, none, initial state, segments) passed (h100_2026-12-06_s8_call1), and so did every
# bench_delta case's built-in check (T = 4k .. 64k, _s8_call1, _s8_call2). Since then the delta
# kernels only take their transpose / broadcast / gate-reading helpers from shared code (the
# same operations; interpret-checked) and gained the off-by-default mosaic_gpu_ws forward.
# "linear" (scalar gate / no gate): all ten of check_mosaic_linear's none / g cases passed on the
# H100 at commit d04e928 (experiments/results/h100_2026-11-23_s4_call1; T = 512 .. 65536,
# padding, initial state, segments, the anchor), 0.22 vs 3.4-3.7 ms (XLA) forward at the anchor.
# "sparse": all six check_mosaic_softmax correctness cases passed on the current code (one CTA
# per item in L2-sized head groups: h100_2026-11-23_s5_call3 at b0084e9). The op registers it
# after cuDNN, so auto takes cuDNN where cuDNN has the mask and this kernel for the rest
# (segments, sparse / two-sided / chunked masks), where the alternative is the dense XLA path.
# "linear_gk" (GLA): with the rebuilt prepass kernel (ae29792) check_mosaic_linear's gk anchor case
# (h100_2026-12-06_s8_call1) and its three small gk cases (padding, K = 64 + initial state,
# segments; _s8_call2, at f192c93) passed; forward 0.94 ms, fwd+bwd 13.1 ms at the anchor, against
# the XLA path's 6.0 / 24.0 ms (h100_2026-11-23_s3_call4), so auto takes it for gk calls. Its
# backward's pullback kernel (with the gate gradient's chunk-local sums, 6f26316) passed the same
# three cases (dg <= 5e-5) and the bench_linear checks at 4k and 16k (h100_2026-12-06_s9_call2);
# since then only the first step's zero gate gradient is written as a select (interpret-checked).
# Session 10 rebuilt the backward (q~, k^ from a new kernel, gk_decays; the pullback kernel
# with one symmetric product per level, 32 channels a CTA); at dad7ddf check_mosaic_linear's
# three small gk cases passed again (dg <= 4.5e-5) and bench_linear's gk check at 4k, on an
# H100 (h100_2026-12-07_s11_call1): forward 0.900 ms, fwd+bwd 4.467 ms (jla 0.823 / 4.168).
# With dA formed in the pullback kernel (603da27) the three cases passed again (dg <= 4.5e-5)
# and bench_linear's gk checks at T = 1k, 4k, 16k, 64k (h100_2026-12-07_s12_call1).
# With the prepass and pullback in three forms, one per call (78f292a: bounded, per chunk, exact),
# bench_linear's gk checks passed at T = 1k (forward and backward) and 16k (forward), gates bounded
# (h100_2026-12-07_s14_call1), and at 4k and 64k forward (s15_call3, s15_call1); at 6d501c8 the
# fwd+bwd checks at 4k, 16k, 64k (s16_call1), check_mosaic_linear's gk case 10 (bounded, dg 3e-5)
# and at 4k (s16_call3) the per-chunk and exact forms forced with FIXED_FORM, forward and fwd+bwd,
# plus the chosen form with strong gates (still bounded) and steep ones (the choice took exact).
GPU_CHECKED: frozenset[str] = frozenset({"delta", "linear", "linear_gk", "sparse"})


def tiled_smem(shape: Sequence[int], dtype: Any, swizzle: int = SWIZZLE) -> Any:
    """SMEM tile laid out for TMA and wgmma: (8, ``swizzle`` bytes) tiles ((8, 64) of bf16,
    (8, 32) of float32 at the default 128) with that swizzle; rows narrower than 128 bytes
    (a [64, 32] bf16 operand) take the 64- or 32-byte one."""
    tile = (8, swizzle // jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(tuple(shape), dtype,
                      transforms=(plgpu.TilingTransform(tile), plgpu.SwizzleTransform(swizzle)))


def wgmma_zeros(shape: Sequence[int]) -> jax.Array:
    """float32 zeros in the wgmma accumulator register layout."""
    return plgpu.layout_cast(jnp.zeros(tuple(shape), jnp.float32), plgpu.Layout.WGMMA)


def transposes_swizzled_tiles() -> bool:
    """Whether this jax's Mosaic GPU reads and writes swizzled SMEM tiles transposed to and
    from registers (``load_transposed``; jax >= 0.11)."""
    return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def load_transposed(ref: Any) -> jax.Array:
    """The [R, C] SMEM tile ``ref`` read transposed into registers: [C, R] in the WGMMA layout
    (needs ``transposes_swizzled_tiles()``)."""
    return plgpu.layout_cast(ref.transpose((1, 0))[...], plgpu.Layout.WGMMA)


def transposed(ref: Any) -> Any:
    """The [C, R] transposed view of a 2-D SMEM ref (a wgmma operand read transposed)."""
    return ref.transpose((1, 0))


def per_row(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A per-row factor [R] broadcast over the columns of an [R, C] array."""
    return jax.lax.broadcast_in_dim(x, tuple(shape), [0])


def per_col(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A per-column factor [C] broadcast over the rows of an [R, C] array."""
    return jax.lax.broadcast_in_dim(x, tuple(shape), [1])


def store_split(parts: Sequence[Any], value: jax.Array) -> None:
    """Write float32 ``value`` to the bf16 SMEM refs ``parts`` (same shape): parts[0] <- hi =
    bf16(value) and, where a second ref is given, parts[1] <- lo = bf16(value - hi). A product
    with hi plus one with lo reads value to a relative error of ~2^-16 (bf16's 8 bits twice)
    instead of ~2^-8."""
    hi = value.astype(parts[0].dtype)
    parts[0][...] = hi
    if len(parts) > 1:
        parts[1][...] = (value - hi.astype(value.dtype)).astype(parts[1].dtype)


@dataclasses.dataclass(frozen=True)
class Registers:
    """A ``wgmma`` left operand held in registers: a bf16 array in the WGMMA layout (its rows
    are the accumulator's). The tensor cores read it without a round trip through shared
    memory, so a value computed on the sequential path of a walk feeds the next product at
    once. ``staging``: an SMEM tile of its shape, used only in interpret mode (the interpreter
    reads wgmma operands from refs), where the value is written there first."""
    value: jax.Array
    staging: Any = None


def products(inits: Sequence[jax.Array], operands: Sequence[tuple[Any, Any]],
             interpret: bool, during: Callable[[], None] | None = None) -> tuple[jax.Array, ...]:
    """``init + a @ b`` for each (init, (a, b)), the wgmmas issued back to back; returns the
    results once all are done. ``b`` is an SMEM ref (possibly a transposed view); ``a`` an SMEM
    ref or ``Registers``. ``during()``, if given, is traced after the wgmmas are issued and
    before they are awaited (CUDA-core work, e.g. SMEM stores of other tiles, in the shadow of
    the tensor cores; it must not write what the products read). Compiled, the results pass an
    optimization barrier when an operand is in registers: the accumulator's read lowers to a
    wait with no data dependence on the registers, which LLVM could otherwise schedule
    arithmetic ahead of."""
    shapes = [x.shape for x in inits]
    in_registers = any(isinstance(a, Registers) for a, _ in operands)
    if interpret:
        refs = []
        for a, _ in operands:
            if isinstance(a, Registers):
                a.staging[...] = a.value
                a = a.staging
            refs.append(a)
        if in_registers:
            plgpu.commit_smem()

        def body(*accs):
            for acc, a, (_, b) in zip(accs, refs, operands):
                plgpu.wgmma(acc, a, b)
            if during is not None:
                during()
            return tuple(acc[...] for acc in accs)
        fresh = pl.run_scoped(body, *[plgpu.ACC(s) for s in shapes])
        return tuple(x + f for x, f in zip(inits, fresh))

    def body(accs):
        for acc, (a, b) in zip(accs, operands):
            plgpu.wgmma(acc, a.value if isinstance(a, Registers) else a, b)
        if during is not None:
            during()
    out = pl.run_state(body)(tuple(plgpu.ACC.init(x) for x in inits))
    return jax.lax.optimization_barrier(out) if in_registers else out


def summed_products(inits: Sequence[jax.Array],
                    operands: Sequence[Sequence[tuple[Any, Any]]],
                    interpret: bool) -> tuple[jax.Array, ...]:
    """``init + sum_p a_p @ b_p`` for each (init, [(a_p, b_p), ...]): like ``products``, with
    several products accumulating into one register accumulator (no second accumulator to
    hold and add)."""
    if interpret:
        flat = [pair for pairs in operands for pair in pairs]
        zeros = [wgmma_zeros(x.shape) for x, pairs in zip(inits, operands) for _ in pairs]
        fresh = iter(products(zeros, flat, interpret))
        return tuple(x + sum(next(fresh) for _ in pairs) for x, pairs in zip(inits, operands))

    def body(accs):
        for acc, pairs in zip(accs, operands):
            for a, b in pairs:
                plgpu.wgmma(acc, a, b)
    return pl.run_state(body)(tuple(plgpu.ACC.init(x) for x in inits))


def warpgroup_index(groups: int, like: jax.Array) -> jax.Array:
    """This warpgroup's index along the kernel's "wg" thread axis (``groups`` > 1), else a
    traced 0 made from ``like`` (an int32 axis index): jax 0.12 cannot lower a literal that a
    loop body closes over."""
    return jax.lax.axis_index("wg") if groups > 1 else like * 0


def carry_state(loop: Callable[..., jax.Array], scratch: Sequence[Any] = (),
                scratch_kw: Mapping[str, Any] | None = None, *, groups: int, w: jax.Array,
                rows: int, s0_src: Any, s0_loaded: Any, sf_dst: Any, cols: int = 64) -> None:
    """Carry warpgroup ``w``'s float32 state block [rows, cols] through a walk:

        state = s0_src (a GMEM view, loaded by TMA on barrier ``s0_loaded.at[w]``) or zeros
        state = loop(state, *scratch refs, **scratch_kw refs)     (one scoped allocation)
        sf_dst <- state                                           (TMA store)

    The three phases are sequential scoped allocations (shared by the CTA's ``groups``
    warpgroups), so the loop's shared memory is reused for the float32 blocks; those use
    (8, 32) tiles with a 128-byte swizzle (conflict-free loads in the wgmma layout)."""
    f32_block = plgpu.SMEM((groups, rows, cols), jnp.float32,
                           transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
    shared = {"collective_axes": "wg"} if groups > 1 else {}  # one allocation for all

    def initial_state(buf):
        plgpu.copy_gmem_to_smem(s0_src, buf.at[w], s0_loaded.at[w])
        plgpu.barrier_wait(s0_loaded.at[w])
        return plgpu.layout_cast(buf[w], plgpu.Layout.WGMMA)

    state = (pl.run_scoped(initial_state, f32_block, **shared) if s0_src is not None
             else wgmma_zeros((rows, cols)))
    state = pl.run_scoped(lambda *refs, **kw_refs: loop(state, *refs, **kw_refs), *scratch,
                          **(scratch_kw or {}), **shared)

    def final_state(buf):
        buf[w] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf.at[w], sf_dst)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(final_state, f32_block, **shared)


class TileRing:
    """The TMA ring of a walk kernel: chunk n's tiles go to slot n % stages. Warpgroup 0 issues
    every copy (``issue_loads(n, slot)``); a slot is refilled with chunk n + stages once every
    warpgroup has signalled (barrier ``consumed``, one arrival per warpgroup) that it is done
    reading chunk n."""

    def __init__(self, issue_loads: Callable[[Any, Any], None], *, stages: int, num_chunks: int,
                 groups: int, w: jax.Array, consumed: Any):
        self.issue_loads, self.stages, self.num_chunks = issue_loads, stages, num_chunks
        self.groups, self.w, self.consumed = groups, w, consumed

    def _in_producer(self, fn: Callable[[], None]) -> None:
        if self.groups == 1:
            fn()
        else:
            pl.when(self.w == 0)(fn)

    def prefill(self) -> None:
        """Issue the first ``stages`` chunks."""
        for n in range(min(self.stages, self.num_chunks)):
            self._in_producer(lambda n=n: self.issue_loads(n, n))

    def release(self, n: jax.Array, slot: jax.Array) -> None:
        """This warpgroup is done reading ``slot`` (chunk n): signal it; warpgroup 0 refills the
        slot with chunk n + stages once every warpgroup has."""
        if self.groups > 1:
            plgpu.barrier_arrive(self.consumed.at[slot])

        @pl.when(n + self.stages < self.num_chunks)
        def _():
            def refill():
                if self.groups > 1:
                    plgpu.barrier_wait(self.consumed.at[slot])
                self.issue_loads(n + self.stages, slot)
            self._in_producer(refill)


def kernel_name(family: str, **flags: bool) -> str:
    """The name a kernel launch shows in profiles: ``family`` and the flags that are set, e.g.
    ``kernel_name("gla_walk", reverse=True, states=False)`` -> "gla_walk_reverse"."""
    return "_".join([family] + [flag for flag, on in flags.items() if on])


def launch_walk(body: Callable[..., None], args: Sequence[jax.Array], *, out_type: Sequence[Any],
                copies: int, stages: int, groups: int, grid: tuple[int, int, int],
                interpret: Any, name: str, approx_math: bool = False,
                barriers: Sequence[Any] = ()) -> tuple[jax.Array, ...]:
    """Run a walk kernel ``body(*in_refs, *out_refs, loaded, consumed, s0_loaded, *barriers)``
    over the grid (V blocks, heads, rows) with one thread per warpgroup and the walk frame's
    barriers: ``loaded`` (per ring slot, ``copies`` TMA arrivals), ``consumed`` (per slot, one
    arrival per warpgroup: ``TileRing``) and ``s0_loaded`` (per warpgroup, its initial-state
    block: ``carry_state``), then the kernel's own ``barriers`` (``plgpu.Barrier`` types).
    ``name``: the kernel's name in profiles (``kernel_name``).
    ``approx_math``: exp as ``ex2.approx`` of x log2(e) (relative error ~2^-22) instead of the
    accurate library call (tens of instructions a value, fully exposed with one warp per
    scheduler). Returns the outputs as a tuple."""
    outs = plgpu.kernel(
        body,
        out_type=tuple(out_type),
        scratch_types=[
            plgpu.Barrier(num_arrivals=copies, num_barriers=stages),       # tile slot loaded
            plgpu.Barrier(num_arrivals=groups, num_barriers=stages),       # slot read by all
            plgpu.Barrier(num_arrivals=1, num_barriers=groups),            # s0 block loaded
            *barriers,
        ],
        grid=grid,
        grid_names=("vblocks", "heads", "rows"),
        kernel_name=name,
        **({"num_threads": groups, "thread_name": "wg"} if groups > 1 else {}),
        compiler_params=plgpu.CompilerParams(approx_math=approx_math),
        **({} if interpret is None else {"interpret": interpret}),
    )(*args)
    return tuple(outs)


DEFAULT_SMS = 132  # H100 / H200 SXM; the device's own count is used when there is one


def piece_starts(local: jax.Array, s0: jax.Array | None, reverse: bool,
                 advance: Callable[[int, jax.Array], jax.Array]) -> jax.Array:
    """The states handed to the pieces of a sequence split (float32, XLA). A piece p maps the
    state entering it (in walk order) affinely, S_out = advance(p, S_in) + local_p, with local
    [B, P, H, ...] its walk's final state from zero and ``advance`` its linear part (a decay
    product for a gated linear recurrence, a [K, K] matrix for the delta rule). Walking the
    pieces in order (last to first if ``reverse``) from s0 (or zeros), returns every piece's
    S_in, [B, P, H, ...]."""
    P = local.shape[1]
    carry = jnp.zeros_like(local[:, 0]) if s0 is None else s0.astype(jnp.float32)
    starts = [None] * P
    for p in (reversed(range(P)) if reverse else range(P)):
        starts[p] = carry
        carry = advance(p, carry) + local[:, p]
    return jnp.stack(starts, axis=1)


def num_sms() -> int:
    """Streaming multiprocessors of the default device (DEFAULT_SMS off GPU)."""
    device = jax.devices()[0]
    return (int(getattr(device, "core_count", 0) or DEFAULT_SMS) if device.platform == "gpu"
            else DEFAULT_SMS)


def is_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def hopper_accepts() -> str | None:
    """None when a Mosaic GPU kernel can run here at all, else the reason it cannot."""
    if plgpu is None:
        return "this jax has no Pallas Mosaic GPU front end"
    if not is_hopper():
        return "the Mosaic GPU kernel needs a Hopper GPU (compute capability 9.x)"
    return None
