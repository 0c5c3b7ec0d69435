"""Registry of attention layers, looked up by name or by a one-letter pattern code.

Every registered layer is a Flax NNX module with one call contract:

    layer = make_attention(name, d_model=..., num_heads=..., rngs=nnx.Rngs(0), **options)
    y = layer(x, segment_ids=None, positions=None)          # x, y: [B, T, d_model]
    cache = layer.init_cache(batch_size, max_len)            # decode cache (pytree of arrays)
    y, cache = layer.decode(x, cache, positions=None)        # x: [B, t, d_model], t >= 1 new tokens

``segment_ids`` [B, T] int marks packed documents (attention and recurrent state stop at a
change of id); ``positions`` [B, T] int is the position inside the document (RoPE).
A model's layer pattern such as "LLLS" maps each letter to a registered name through ``code``.
A layer class whose behaviour depends on its depth sets the class attribute
``uses_layer_depth = True`` and accepts ``layer_index`` (0-based) and ``num_layers``; the model
passes them (``uses_layer_depth(name)``).
"""
from __future__ import annotations

from typing import Any, Callable

_BY_NAME: dict[str, Callable[..., Any]] = {}
_BY_CODE: dict[str, str] = {}


def register_attention(name: str, code: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: register an attention module under ``name`` (and a one-letter ``code``)."""

    def wrap(cls: Callable[..., Any]) -> Callable[..., Any]:
        if name in _BY_NAME and _BY_NAME[name] is not cls:
            raise ValueError(f"attention name {name!r} is already registered")
        if code is not None:
            if len(code) != 1:
                raise ValueError(f"pattern code must be one character, got {code!r}")
            if _BY_CODE.get(code, name) != name:
                raise ValueError(f"pattern code {code!r} already used by {_BY_CODE[code]!r}")
            _BY_CODE[code] = name
        _BY_NAME[name] = cls
        return cls

    return wrap


def available_attention() -> dict[str, str | None]:
    """Registered names mapped to their pattern codes (None where a layer has no code)."""
    codes = {n: c for c, n in _BY_CODE.items()}
    return {n: codes.get(n) for n in sorted(_BY_NAME)}


def attention_name(name_or_code: str) -> str:
    """Resolve a registered name or one-letter code to the registered name; clear error otherwise."""
    if name_or_code in _BY_NAME:
        return name_or_code
    if name_or_code in _BY_CODE:
        return _BY_CODE[name_or_code]
    known = ", ".join(f"{n} ({c})" if c else n for n, c in available_attention().items())
    raise ValueError(f"unknown attention {name_or_code!r}; registered: {known or 'none'}")


def make_attention(name_or_code: str, **kwargs: Any) -> Any:
    """Build the registered attention module ``name_or_code`` with ``kwargs``."""
    return _BY_NAME[attention_name(name_or_code)](**kwargs)


def uses_layer_depth(name_or_code: str) -> bool:
    """Whether the registered layer takes ``layer_index`` and ``num_layers`` from the model."""
    return bool(getattr(_BY_NAME[attention_name(name_or_code)], "uses_layer_depth", False))


def expand_pattern(pattern: str, num_layers: int) -> list[str]:
    """Layer names for ``num_layers`` layers from a repeating ``pattern``.

    ``pattern`` is either letters ("LLLS": one code per layer) or comma-separated names
    ("linear,linear,softmax"). Its length must divide ``num_layers``.
    """
    items = [p.strip() for p in pattern.split(",")] if "," in pattern else list(pattern)
    if not items or any(not p for p in items):
        raise ValueError(f"model.pattern must be non-empty, got {pattern!r}")
    if num_layers % len(items):
        raise ValueError(
            f"model.pattern {pattern!r} has {len(items)} entries, which does not divide "
            f"model.num_layers={num_layers}")
    names = [attention_name(p) for p in items]
    return names * (num_layers // len(items))
