"""Shared plumbing for every op: the implementation registry, backend facts, padding, input checks.

Each op (linear, delta, sparse) owns one ``Registry`` and chooses its implementation there and
nowhere else: ``impl="xla"`` is the plain-jnp path (also the fallback), ``impl="pallas"`` the
portable Pallas kernel (Mosaic on TPU, interpret mode on CPU), ``impl="mosaic_gpu"`` a Hopper
kernel where one is registered, and ``impl=None`` (auto) the first by priority that accepts the
call (each implementation says why it declines).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def platform() -> str:
    """The platform of the default backend: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def interpret_params() -> Any:
    """``interpret=`` argument for ``pl.pallas_call``: interpret on CPU, compile elsewhere."""
    return platform() == "cpu"


def _varying_axes(x: Any) -> set:
    """Mesh axes ``x`` is typed varying over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    if hasattr(aval, "manual_axis_type"):
        return set(aval.manual_axis_type.varying)
    return set(getattr(aval, "vma", ()))


def vary_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` typed varying over every mesh axis that ``like`` varies over.

    Under ``shard_map(check_vma=True)`` a scan's initial carry (a zero or user-given state) must
    have the type of what the scan body returns, which varies with the sharded inputs.
    Outside shard_map this returns ``x`` unchanged.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, size: int, axis: int, value: float | int = 0) -> jax.Array:
    """Pad ``x`` along ``axis`` at the end up to ``size`` with ``value`` (no-op if already there)."""
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of length {x.shape[axis]} down to {size}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or len(x.shape) != rank:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must have rank {rank} with layout {layout}, got shape {shape}")


def check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype (float32 or bfloat16), got {x.dtype}")


def check_shape(name: str, x: jax.Array, expected: Sequence[int], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({layout}), got {tuple(x.shape)}")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int, int]:
    """Validate [B, T, H, D] q/k/v with GQA (q heads a multiple of k/v heads).

    Returns (B, T, Hq, Hkv, K, V).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, "[batch, time, heads, head_dim]")
        check_float(name, x)
    B, T, Hq, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"q, k, v must share [batch, time]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != K:
        raise ValueError(f"q and k must share head_dim; got q {q.shape}, k {k.shape}")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv:
        raise ValueError(f"k and v must have the same number of heads; got k {k.shape}, v {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for GQA")
    return B, T, Hq, Hkv, K, v.shape[3]


def check_segment_ids(segment_ids: jax.Array | None, B: int, T: int) -> None:
    if segment_ids is None:
        return
    check_rank("segment_ids", segment_ids, 2, "[batch, time]")
    check_shape("segment_ids", segment_ids, (B, T), "[batch, time]")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be an integer array, got {segment_ids.dtype}")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run an op: ``accepts(*args, **kw)`` returns None or the reason it declines."""
    name: str
    run: Callable
    accepts: Callable[..., str | None]
    priority: int
    auto: bool = True  # False: runs only when asked for by name (e.g. a kernel not yet GPU-checked)


class Registry:
    """The one place an op chooses its implementation.

    ``impl=None`` (auto) tries implementations by ascending priority and runs the first whose
    ``accepts`` returns None (fail-closed: no silent fallback past a declining one's reason
    unless a later one accepts); ``impl="<name>"`` runs that one or raises with its reason.
    """

    def __init__(self, op_name: str):
        self.op_name = op_name
        self._impls: dict[str, Implementation] = {}

    def register(self, name: str, run: Callable, accepts: Callable[..., str | None], *,
                 priority: int, auto: bool = True) -> None:
        """Register (or replace) an implementation; lower ``priority`` is tried first by auto;
        ``auto=False``: only ``impl=name`` runs it (auto passes over it, saying so)."""
        self._impls[name] = Implementation(name, run, accepts, priority, auto)

    def names(self) -> list[str]:
        return [i.name for i in sorted(self._impls.values(), key=lambda i: i.priority)]

    def check_name(self, impl: str | None) -> None:
        if impl is not None and impl not in self._impls:
            raise ValueError(f"impl must be None (auto) or one of {self.names()}, got {impl!r}")

    def choose(self, impl: str | None, *args, **kwargs) -> Implementation:
        self.check_name(impl)
        if impl is not None:
            chosen = self._impls[impl]
            reason = chosen.accepts(*args, **kwargs)
            if reason is not None:
                raise ValueError(f"{self.op_name}: impl={impl!r} cannot run this call: {reason}")
            return chosen
        reasons = []
        for name in self.names():
            if not self._impls[name].auto:
                reasons.append(f"{name}: runs only when asked for (impl={name!r})")
                continue
            reason = self._impls[name].accepts(*args, **kwargs)
            if reason is None:
                return self._impls[name]
            reasons.append(f"{name}: {reason}")
        raise ValueError(f"no {self.op_name} implementation accepts this call: " + "; ".join(reasons))
