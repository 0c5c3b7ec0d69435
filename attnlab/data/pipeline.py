"""The training iterator: prepared corpus (or MQAR) -> packed rows -> batches.

Text: documents ``[BOS] + tokens (+ [EOS])`` are read from the ArrayRecord shards, sliced per
process (``[process_index::process_count]``), shuffled with a new permutation each epoch,
repeated forever, concatenated and split into windows of ``seq_len + 1`` tokens (a document
can continue into the next row), and the rows shuffled within windows of ``data.shuffle_window``
rows so that a batch mixes many documents. A window ``w`` with segment ids ``s`` (documents numbered
from 1 within the row, 0 = padding) and positions ``p`` (restarting at 0 at each document
start in the row, and at the row start for a continued document) becomes

    inputs = w[:-1]   targets = w[1:]   segment_ids = s[:-1]   positions = p[:-1]
    loss_mask[t] = 1  iff  s[t] != 0 and s[t+1] == s[t]   (no target across a boundary)

Every batch is a dict of numpy arrays ``[batch, seq_len]``: int32 except float32 ``loss_mask``.
"""
from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np
from absl import flags

from attnlab.data.config import SOURCES, check_choice, check_int
from attnlab.data.corpus_store import load_meta, prepare_corpus, shard_paths
from attnlab.data.mqar import mqar_batches
from attnlab.data.tokenizers import make_tokenizer

_SEED_RANGE = 2**32


def vocab_size(data_config: Any) -> int:
    """The model's vocabulary for this data config (a prepared ``data.path`` says its own)."""
    source = check_choice("data.source", data_config.source, SOURCES)
    if source == "mqar":
        return check_int("data.mqar.vocab_size", data_config.mqar.vocab_size, 4)
    if data_config.path:
        return int(load_meta(data_config.path)["vocab_size"])
    return make_tokenizer(data_config.tokenizer).vocab_size


def _document(record: bytes, *, dtype: str, bos_id: int, eos_id: int) -> dict[str, np.ndarray]:
    tokens = np.frombuffer(record, dtype=np.dtype(dtype)).astype(np.int32)
    ends = [eos_id] if eos_id != bos_id else []
    return {"tokens": np.concatenate([[bos_id], tokens, ends]).astype(np.int32)}


def _window_to_example(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens, segments = window["tokens"], window["tokens_segment_ids"].astype(np.int32)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1],
        "positions": window["tokens_positions"][:-1].astype(np.int32),
        "loss_mask": ((segments[:-1] != 0) & (segments[1:] == segments[:-1])).astype(np.float32),
    }


def _text_batches(data_config: Any, *, seq_len: int, batch_size: int, seed: int, workdir: str,
                  process_index: int, process_count: int) -> grain.IterDataset:
    directory = prepare_corpus(data_config, workdir)
    meta = load_meta(directory)
    documents = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shard_paths(directory, meta)))
    if len(documents) < process_count:
        raise ValueError(f"the corpus in {directory!r} has {len(documents)} documents, fewer than "
                         f"the {process_count} processes; raise data.max_docs / data.max_bytes")
    decode = functools.partial(_document, dtype=meta["dtype"], bos_id=meta["bos_id"], eos_id=meta["eos_id"])
    documents = documents[process_index::process_count].shuffle(seed=seed).repeat().map(decode)
    rows = grain.experimental.ConcatThenSplitIterDataset(
        documents.to_iter_dataset(), length_struct={"tokens": seq_len + 1})
    window = check_int("data.shuffle_window", data_config.shuffle_window, 1)
    if window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=window, seed=seed)
    return rows.map(_window_to_example).batch(batch_size, drop_remainder=True)


def _tuples_in_remainder_slices(state: Any) -> Any:
    """Undo JSON's tuple -> list in ConcatThenSplit's ``remainder_slices``.

    Grain compares those slices with the tuple ``(-1, -1)``; after an Orbax (JSON) round trip
    they are lists, the comparison fails and a restore re-reads a remainder that does not exist.
    """
    if isinstance(state, dict):
        return {key: ({name: tuple(sl) for name, sl in value.items()} if key == "remainder_slices"
                      else _tuples_in_remainder_slices(value)) for key, value in state.items()}
    return state


class _RestorableIterator(grain.DatasetIterator):
    """The pipeline's iterator, restorable from a JSON round trip of its state."""

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_tuples_in_remainder_slices(state))


def build_train_iterator(data_config: Any, *, seq_len: int, batch_size: int, seed: int, workdir: str,
                         process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Infinite, deterministic, checkpointable iterator of this process's batches.

    ``batch_size`` is per process; ``seed + data.seed_offset`` fixes the shuffle order and the
    MQAR samples. Save/restore it with ``it.get_state()/set_state()`` or inside an Orbax save
    with ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)`` (same worker and
    process counts).
    """
    seq_len = check_int("seq_len", seq_len, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    process_count = check_int("process_count", process_count, 1)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    data_seed = (int(seed) + check_int("data.seed_offset", data_config.seed_offset, 0)) % _SEED_RANGE
    num_workers = check_int("data.num_workers", data_config.num_workers, 0)
    if check_choice("data.source", data_config.source, SOURCES) == "mqar":
        batches = mqar_batches(data_config.mqar, seq_len=seq_len, batch_size=batch_size, seed=data_seed,
                               process_index=process_index, process_count=process_count)
    else:
        batches = _text_batches(data_config, seq_len=seq_len, batch_size=batch_size, seed=data_seed,
                                workdir=workdir, process_index=process_index, process_count=process_count)
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: outside an absl app, the defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return _RestorableIterator(iter(batches))
