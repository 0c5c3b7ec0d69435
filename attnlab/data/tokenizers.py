"""Tokenizers behind ``data.tokenizer``: one protocol, three kinds, chosen by a string.

    "byte"               UTF-8 bytes + BOS/EOS (``byte_tokenizer.py``), vocab 258
    "<path>.model"       a SentencePiece model file (needs ``sentencepiece``)
    "tiktoken:<path>"    a ``.tiktoken`` rank file (base64 token, rank per line; needs ``tiktoken``),
                         split with tiktoken's GPT-2 pre-tokenizer pattern and one added special
                         token ``<|endoftext|>`` (id = number of ranks) used as BOS;
    "tiktoken:<name>"    a registered tiktoken encoding (e.g. ``gpt2``), from tiktoken's own cache.

Every tokenizer gives ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id`` and ``eos_id`` (equal when the tokenizer has a single separator token); a document
becomes ``[bos] + encode(text) (+ [eos] if eos != bos)``.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from typing import Any, Protocol, Sequence

from attnlab.data.byte_tokenizer import ByteTokenizer

TIKTOKEN_PREFIX = "tiktoken:"
_FIELD = "data.tokenizer"


class Tokenizer(Protocol):
    name: str
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _import_optional(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{_FIELD}={spec!r} needs the '{module}' package: "
                          f"pip install {module} (or attnlab[tokenizers])") from err


def _existing_file(path: str, spec: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ValueError(f"{_FIELD}={spec!r}: file {path!r} does not exist")
    return path


class SentencePieceTokenizer:
    """A SentencePiece model; BOS/EOS are the model's own, or new ids after its pieces if it has none."""

    def __init__(self, path: str, spec: str):
        spm = _import_optional("sentencepiece", spec)
        self._model = spm.SentencePieceProcessor(model_file=_existing_file(path, spec))
        self._num_pieces = int(self._model.get_piece_size())
        self.name = "sp-" + _stem(path)
        next_id = self._num_pieces
        self.bos_id = int(self._model.bos_id())
        if self.bos_id < 0:
            self.bos_id, next_id = next_id, next_id + 1
        self.eos_id = int(self._model.eos_id())
        if self.eos_id < 0:
            self.eos_id, next_id = next_id, next_id + 1
        self.vocab_size = next_id

    def encode(self, text: str) -> list[int]:
        return list(self._model.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.eos_id}
        return self._model.decode([int(i) for i in ids if int(i) < self._num_pieces and int(i) not in special])


class TiktokenTokenizer:
    """A tiktoken BPE; its end-of-text token is both BOS and EOS (one separator per document)."""

    def __init__(self, target: str, spec: str):
        tiktoken = _import_optional("tiktoken", spec)
        if os.path.isfile(os.path.expanduser(target)) or target.endswith(".tiktoken") or os.sep in target:
            path = _existing_file(target, spec)
            load = importlib.import_module("tiktoken.load")
            patterns = importlib.import_module("tiktoken_ext.openai_public")
            ranks = load.load_tiktoken_bpe(path)
            self.name = "tiktoken-" + _stem(path)
            self._encoding = tiktoken.Encoding(
                name=self.name, pat_str=patterns.r50k_pat_str, mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": len(ranks)})
        else:
            try:
                self._encoding = tiktoken.get_encoding(target)
            except Exception as err:  # tiktoken raises ValueError or a network error here
                raise ValueError(f"{_FIELD}={spec!r}: tiktoken cannot load encoding {target!r}: {err}") from err
            self.name = "tiktoken-" + target
        self.bos_id = self.eos_id = int(self._encoding.eot_token)
        self.vocab_size = int(self._encoding.n_vocab)

    def encode(self, text: str) -> list[int]:
        return list(self._encoding.encode_ordinary(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids if int(i) != self.eos_id])


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def make_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer`` (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{_FIELD} must be 'byte', a SentencePiece .model path or "
                         f"'tiktoken:<file or name>', got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith(TIKTOKEN_PREFIX):
        return TiktokenTokenizer(spec[len(TIKTOKEN_PREFIX):], spec)
    if spec.endswith(".model") or os.path.isfile(os.path.expanduser(spec)):
        return SentencePieceTokenizer(spec, spec)
    raise ValueError(f"{_FIELD}={spec!r} is unknown: use 'byte', a SentencePiece .model path or "
                     f"'tiktoken:<file or name>'")


def tokenizer_fingerprint(spec: str) -> str:
    """A string that changes when the tokenizer changes: the spec, plus a file's content hash."""
    path = spec[len(TIKTOKEN_PREFIX):] if spec.startswith(TIKTOKEN_PREFIX) else spec
    path = os.path.expanduser(path)
    if spec != "byte" and os.path.isfile(path):
        with open(path, "rb") as f:
            return f"{spec}#sha256={hashlib.sha256(f.read()).hexdigest()}"
    return spec
