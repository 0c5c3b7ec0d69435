"""MQAR: synthetic multi-query associative recall (Zoology-style), infinite and file-free.

One example per row, ``L = 2P + 2Q`` tokens then padding (token 0, segment 0):

    k_1 v_1 k_2 v_2 ... k_P v_P | q_1 a_1 q_2 a_2 ... q_Q a_Q | 0 0 ...

Keys are P distinct tokens from ``[1, V/2)``, values are drawn from ``[V/2, V)``; each query
``q_j`` is one of the keys (distinct when Q <= P) and its answer ``a_j`` is that key's value.
The loss counts only the answer targets: ``loss_mask[t] = 1`` exactly at the positions of the
queries ``t = 2P + 2j``, whose next token is ``a_j``. Example ``i`` of a seed is drawn from
``numpy.random.default_rng([seed, i])``, so the stream is reproducible and resumable by index.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

import grain
import numpy as np

from attnlab.data.config import check_int

PAD_ID = 0
_PREFETCH_BATCHES = 8  # grain's default read-ahead of 500 elements is far too much for whole batches


def mqar_shape(mqar_config: Any, seq_len: int) -> tuple[int, int, int]:
    """``(vocab_size, num_pairs, num_queries)`` after checking they fit ``seq_len``."""
    vocab = check_int("data.mqar.vocab_size", mqar_config.vocab_size, 4)
    pairs = check_int("data.mqar.num_pairs", mqar_config.num_pairs, 1)
    queries = mqar_config.num_queries
    queries = pairs if queries is None else check_int("data.mqar.num_queries", queries, 1)
    if pairs > vocab // 2 - 1:
        raise ValueError(f"data.mqar.num_pairs={pairs} needs that many distinct keys, but "
                         f"data.mqar.vocab_size={vocab} has only {vocab // 2 - 1} key tokens")
    needed = 2 * pairs + 2 * queries
    if seq_len < needed:
        raise ValueError(f"data.mqar.num_pairs={pairs} and data.mqar.num_queries={queries} need "
                         f"seq_len >= 2*num_pairs + 2*num_queries = {needed}, got seq_len={seq_len}")
    return vocab, pairs, queries


def mqar_example(index: int, *, seed: int, vocab_size: int, num_pairs: int, num_queries: int,
                 seq_len: int) -> dict[str, np.ndarray]:
    """Example ``index`` of ``seed`` as one row of the train-batch dict (see the module docstring)."""
    rng = np.random.default_rng([seed, index])
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
    values = rng.integers(half, vocab_size, size=num_pairs)
    asked = rng.choice(num_pairs, size=num_queries, replace=num_queries > num_pairs)
    length = 2 * (num_pairs + num_queries)
    tokens = np.full(seq_len + 1, PAD_ID, np.int32)
    tokens[0:2 * num_pairs:2], tokens[1:2 * num_pairs:2] = keys, values
    tokens[2 * num_pairs:length:2], tokens[2 * num_pairs + 1:length:2] = keys[asked], values[asked]
    inside = np.arange(seq_len) < length
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[2 * num_pairs:length:2] = 1.0
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": inside.astype(np.int32),
        "positions": np.where(inside, np.arange(seq_len), 0).astype(np.int32),
        "loss_mask": loss_mask,
    }


def mqar_batches(mqar_config: Any, *, seq_len: int, batch_size: int, seed: int, process_index: int,
                 process_count: int) -> grain.IterDataset:
    """Infinite stream of MQAR batches; process ``p`` of ``n`` gets the example indices ``p, p+n, ...``.

    Batched before ``to_iter_dataset`` (a random-access batch is several times cheaper per row).
    """
    vocab, pairs, queries = mqar_shape(mqar_config, seq_len)
    make = functools.partial(mqar_example, seed=seed, vocab_size=vocab, num_pairs=pairs,
                             num_queries=queries, seq_len=seq_len)
    indices = grain.MapDataset.range(sys.maxsize)[process_index::process_count]
    batches = indices.map(make).batch(batch_size, drop_remainder=True)
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=_PREFETCH_BATCHES))
