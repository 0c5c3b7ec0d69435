"""Command line: tokenize a corpus into ArrayRecord shards plus meta.json.

    python -m attnlab.data.prepare --corpus=stdlib --out=DIR [--tokenizer=byte]
        [--files='docs/**/*.txt'] [--max_docs=0] [--max_bytes=4000000]

Running it again with the same settings reuses DIR; a DIR holding another corpus is refused.
"""
from __future__ import annotations

import json

from absl import app, flags

from attnlab.data.config import default_data_config
from attnlab.data.corpus_store import load_meta, prepare_corpus

_DEFAULTS = default_data_config()
_CORPUS = flags.DEFINE_string("corpus", _DEFAULTS.corpus, "stdlib | pydoc | files")
_OUT = flags.DEFINE_string("out", None, "directory to write the shards and meta.json into", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", _DEFAULTS.tokenizer,
                                 "byte | <sentencepiece>.model | tiktoken:<file or name>")
_FILES = flags.DEFINE_string("files", None, "glob of text files for --corpus=files")
_MAX_DOCS = flags.DEFINE_integer("max_docs", _DEFAULTS.max_docs, "keep at most this many documents (0 = all)")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", _DEFAULTS.max_bytes, "keep at most this many bytes of text (0 = all)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data_config = default_data_config()
    data_config.corpus = _CORPUS.value
    data_config.tokenizer = _TOKENIZER.value
    data_config.files = _FILES.value
    data_config.max_docs = _MAX_DOCS.value
    data_config.max_bytes = _MAX_BYTES.value
    directory = prepare_corpus(data_config, out_dir=_OUT.value)
    meta = load_meta(directory, field="--out")
    summary = {k: meta[k] for k in ("source", "tokenizer", "vocab_size", "num_documents", "num_tokens", "shards")}
    print(json.dumps({"out": directory, **summary}, indent=2))


if __name__ == "__main__":
    app.run(main)
