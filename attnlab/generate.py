"""Autoregressive generation (greedy or sampled) for any model with a decode cache.

The model is any Flax NNX module with

    cache = model.init_cache(batch_size, max_len)
    logits, cache = model.decode(tokens, cache)          # tokens [B, t] int -> logits [B, t, V]

(the attention layers' contract lifted to a language model). The prompt is prefilled in one
decode call, then tokens are drawn one at a time inside a ``lax.scan``:

    greedy  (temperature == 0):  x_{n+1} = argmax_v logits_n[v]
    sampled (temperature > 0):   x_{n+1} ~ softmax(logits_n / temperature), optionally restricted
                                 to the ``top_k`` largest logits.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def sample_token(logits: jax.Array, key: jax.Array | None, temperature: float,
                 top_k: int | None) -> jax.Array:
    """One token per row of ``logits`` [B, V] (greedy when temperature == 0)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: Any, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, rng: jax.Array | None = None,
             max_len: int | None = None) -> jax.Array:
    """Continue ``prompt`` [B, P] (int) by ``max_new_tokens`` tokens; returns [B, P + max_new_tokens].

    ``temperature`` 0 is greedy; > 0 samples with ``rng`` (a jax PRNG key, required then) and the
    optional ``top_k`` filter. ``max_len`` sizes the cache (default P + max_new_tokens).
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng, a jax PRNG key")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    B, P = prompt.shape
    total = P + max_new_tokens
    if max_len is not None and max_len < total:
        raise ValueError(f"max_len={max_len} is shorter than prompt + new tokens ({total})")
    graphdef, state = nnx.split(model)
    keys = (jax.random.split(rng, max_new_tokens) if rng is not None
            else jnp.zeros((max_new_tokens,), jnp.uint32))

    @jax.jit
    def run(state: Any, prompt: jax.Array, keys: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(B, max_len or total)
        logits, cache = m.decode(prompt, cache)

        def step(carry, key):
            last, cache = carry
            token = sample_token(last, key if rng is not None else None, temperature, top_k)
            logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
            return (logits[:, -1], cache), token

        _, tokens = jax.lax.scan(step, (logits[:, -1], cache), keys)
        return tokens.T

    return jnp.concatenate([prompt.astype(jnp.int32), run(state, prompt, keys)], axis=1)
