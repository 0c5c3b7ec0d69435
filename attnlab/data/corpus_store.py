"""Prepared corpora on disk: tokenized documents as ArrayRecord shards plus ``meta.json``.

A directory holds ``tokens-NNNNN.array_record`` shards (one record per document: its token ids
as little-endian uint16, or uint32 when the vocabulary needs it, without BOS/EOS) and
``meta.json`` (tokenizer, vocabulary, BOS/EOS ids, dtype, counts, source, licence and the
settings that produced it). Preparation writes into a temporary sibling and renames it into
place, so concurrent preparers (several hosts, one shared workdir) never see half a corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from array_record.python import array_record_module

from attnlab.data import corpora
from attnlab.data.config import check_choice, check_int
from attnlab.data.tokenizers import make_tokenizer, tokenizer_fingerprint

FORMAT_VERSION = 1
META_FILE = "meta.json"
SHARD_BYTES = 64 << 20  # start a new shard after this many token bytes


def _settings(data_config: Any) -> dict[str, Any]:
    """Everything that determines a prepared corpus's content."""
    corpus = check_choice("data.corpus", data_config.corpus, corpora.CORPORA)
    files = data_config.files if corpus == "files" else None
    return {
        "format_version": FORMAT_VERSION,
        "corpus": corpus,
        "content": corpora.corpus_fingerprint(corpus, files),
        "tokenizer": tokenizer_fingerprint(data_config.tokenizer),
        "max_docs": check_int("data.max_docs", data_config.max_docs, 0),
        "max_bytes": check_int("data.max_bytes", data_config.max_bytes, 0),
    }


def cache_directory(data_config: Any, workdir: str) -> str:
    """``<workdir>/data/<corpus>-<tokenizer>-<hash of the settings>``."""
    settings = _settings(data_config)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    tag = make_tokenizer(data_config.tokenizer).name
    return os.path.join(workdir, "data", f"{settings['corpus']}-{tag}-{digest}")


def load_meta(directory: str, field: str = "data.path") -> dict[str, Any]:
    """The ``meta.json`` of a prepared corpus; a ValueError naming ``field`` if there is none."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{field}={directory!r} is not a prepared corpus (no {META_FILE}); "
                         "prepare one with `python -m attnlab.data.prepare --out=DIR` or leave "
                         f"{field} unset to prepare the embedded corpus automatically")
    with open(meta_path) as f:
        return json.load(f)


def shard_paths(directory: str, meta: dict[str, Any]) -> list[str]:
    return [os.path.join(directory, name) for name in meta["shards"]]


def prepare_corpus(data_config: Any, workdir: str | None = None, *, out_dir: str | None = None) -> str:
    """The directory of the prepared corpus for ``data_config``, preparing it if needed.

    ``out_dir`` given: prepare into it (reused when it already holds the same settings).
    Else ``data.path`` given: it must hold a prepared corpus (ValueError naming data.path).
    Else: prepared once into the cache directory under ``workdir`` and reused afterwards.
    """
    if out_dir is None and data_config.path:
        load_meta(data_config.path)
        return data_config.path
    if out_dir is None:
        if not workdir:
            raise ValueError("data.path is unset, so prepare_corpus needs a workdir to cache the corpus in")
        out_dir = cache_directory(data_config, workdir)
    settings = _settings(data_config)
    if _holds(out_dir, settings):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(staging, 0o755)
    try:
        _write(staging, data_config, settings)
        try:
            os.rename(staging, out_dir)  # atomic; replaces an empty directory
        except OSError:
            if not _holds(out_dir, settings):
                raise ValueError(f"{out_dir!r} already exists and holds something else than the "
                                 f"corpus asked for; remove it or choose another directory") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _holds(directory: str, settings: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(directory, META_FILE)) as f:
            return json.load(f).get("settings") == settings
    except (OSError, ValueError):
        return False


def _write(directory: str, data_config: Any, settings: dict[str, Any]) -> dict[str, Any]:
    tokenizer = make_tokenizer(data_config.tokenizer)
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
    shards: list[str] = []
    writer = None
    shard_size = num_docs = num_tokens = 0
    documents = corpora.iter_documents(settings["corpus"], files=data_config.files,
                                       max_docs=settings["max_docs"], max_bytes=settings["max_bytes"])
    for text in documents:
        tokens = np.asarray(tokenizer.encode(text), dtype=dtype)
        if tokens.size == 0:
            continue
        if writer is None or shard_size >= SHARD_BYTES:
            if writer is not None:
                writer.close()
            shards.append(f"tokens-{len(shards):05d}.array_record")
            writer = array_record_module.ArrayRecordWriter(os.path.join(directory, shards[-1]), "group_size:1")
            shard_size = 0
        writer.write(tokens.tobytes())
        shard_size += tokens.nbytes
        num_docs += 1
        num_tokens += tokens.size
    if writer is not None:
        writer.close()
    if num_docs == 0:
        raise ValueError(f"data.corpus={settings['corpus']!r} gave no documents "
                         f"(check data.files / data.max_docs / data.max_bytes)")
    meta = {
        "source": settings["corpus"],
        "licence": corpora.LICENCES[settings["corpus"]],
        "tokenizer": data_config.tokenizer,
        "tokenizer_name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.str,
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "shards": shards,
        "settings": settings,
    }
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
