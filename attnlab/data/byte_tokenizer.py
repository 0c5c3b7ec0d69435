"""Byte-level tokenizer: UTF-8 bytes are the tokens 0..255, then two special tokens.

    encode(text) = list(text.encode("utf-8"))        ids in [0, 256)
    BOS = 256 (begins every document), EOS = 257 (ends every document), vocab_size = 258

Needs no files and no training: the default tokenizer of the embedded corpora.
"""
from __future__ import annotations

from typing import Sequence

NUM_BYTES = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus BOS and EOS; ``decode`` drops special ids."""

    name = "byte"
    bos_id = NUM_BYTES
    eos_id = NUM_BYTES + 1
    vocab_size = NUM_BYTES + 2

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < NUM_BYTES).decode("utf-8", errors="replace")
