"""The ``config.data`` block: defaults and the checks shared by the pipeline modules."""
from __future__ import annotations

from typing import Any, Sequence

from ml_collections import config_dict

SOURCES = ("text", "mqar")


def default_data_config() -> config_dict.ConfigDict:
    """Defaults of ``config.data``; every field can be overridden from the command line.

    source        "text" (a tokenized corpus, packed) or "mqar" (synthetic associative recall)
    corpus        "stdlib" (this interpreter's standard-library .py source) | "pydoc"
                  (``pydoc_data.topics`` prose) | "files" (the glob in ``files``)
    files         glob of user text files for corpus="files" (``**`` recurses)
    path          directory of prepared ArrayRecord shards; None = prepare the corpus once into
                  ``<workdir>/data/<corpus>-<tokenizer>-<settings hash>``
    tokenizer     "byte" | "<sentencepiece>.model" | "tiktoken:<file or name>"
    max_docs      keep at most this many documents (0 = all)
    max_bytes     keep at most this many UTF-8 bytes of text (0 = all); the default keeps the
                  CPU demo small (the whole stdlib source is about 12 MB)
    seed_offset   added to the train seed to give the data seed (shuffle order, MQAR samples)
    num_workers   Grain worker processes (0 = read in the training process)
    shuffle_window  packed rows are shuffled within windows of this many rows, so that a batch
                  mixes many documents instead of consecutive pieces of one (1 = no shuffle)
    mqar.*        vocab_size (keys from [1, V/2), values from [V/2, V), 0 = padding),
                  num_pairs, num_queries (None = num_pairs)
    """
    cfg = config_dict.ConfigDict()
    cfg.source = "text"
    cfg.corpus = "stdlib"
    cfg.files = config_dict.placeholder(str)
    cfg.path = config_dict.placeholder(str)
    cfg.tokenizer = "byte"
    cfg.max_docs = 0
    cfg.max_bytes = 4_000_000
    cfg.seed_offset = 0
    cfg.num_workers = 0
    cfg.shuffle_window = 1024
    cfg.mqar = config_dict.ConfigDict()
    cfg.mqar.vocab_size = 256
    cfg.mqar.num_pairs = 16
    cfg.mqar.num_queries = config_dict.placeholder(int)
    return cfg


def check_choice(field: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``field``."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is unknown; choose one of {', '.join(map(repr, choices))}")
    return value


def check_int(field: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)
