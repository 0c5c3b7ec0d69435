"""Corpus preparation (command and function), embedded corpora, tokenizers, config errors."""
import base64
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from attnlab.data import build_train_iterator, default_data_config, prepare_corpus, vocab_size
from attnlab.data import corpora
from attnlab.data.byte_tokenizer import ByteTokenizer
from attnlab.data.pipeline import _document
from attnlab.data.tokenizers import make_tokenizer

def _records(directory):
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    source = grain.sources.ArrayRecordDataSource([os.path.join(directory, s) for s in meta["shards"]])
    return meta, [np.frombuffer(source[i], dtype=meta["dtype"]) for i in range(len(source))]


def _pydoc_texts():
    from pydoc_data import topics
    return [topics.topics[k] for k in sorted(topics.topics) if topics.topics[k].strip()]


def test_prepare_command_writes_shards_and_meta_then_reuses_them(tmp_path):
    out = tmp_path / "pydoc"
    command = [sys.executable, "-m", "attnlab.data.prepare", "--corpus=pydoc", f"--out={out}", "--max_bytes=30001"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    meta, records = _records(out)
    assert meta["source"] == "pydoc" and "PSF" in meta["licence"]
    assert (meta["tokenizer"], meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == ("byte", 258, 256, 257)
    assert meta["num_tokens"] == 30001 == sum(r.size for r in records)
    assert meta["num_documents"] == len(records) > 1
    texts = _pydoc_texts()
    for record, text in zip(records[:-1], texts):
        assert ByteTokenizer().decode(record) == text
    assert bytes(records[-1].astype(np.uint8)) == texts[len(records) - 1].encode()[:records[-1].size]
    mtime = os.stat(out / "meta.json").st_mtime_ns
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert os.stat(out / "meta.json").st_mtime_ns == mtime


def test_out_dir_holding_another_corpus_is_refused(tmp_path):
    config = default_data_config()
    config.corpus, config.max_bytes = "pydoc", 2000
    prepare_corpus(config, out_dir=str(tmp_path / "c"))
    config.max_bytes = 3000
    with pytest.raises(ValueError, match="holds something else"):
        prepare_corpus(config, out_dir=str(tmp_path / "c"))


def test_prepared_path_is_used_as_given(tmp_path):
    config = default_data_config()
    config.corpus, config.max_bytes = "pydoc", 5000
    directory = prepare_corpus(config, out_dir=str(tmp_path / "p"))
    config.path = directory
    assert prepare_corpus(config, str(tmp_path / "work")) == directory
    assert vocab_size(config) == 258
    batch = next(build_train_iterator(config, seq_len=16, batch_size=2, seed=0, workdir=str(tmp_path / "work")))
    assert batch["inputs"].shape == (2, 16)
    assert not os.path.exists(tmp_path / "work" / "data")


def test_stdlib_corpus_is_sorted_python_source_without_site_packages(tmp_path):
    paths = corpora._stdlib_files()
    assert len(paths) > 100 and paths == sorted(paths)
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in p.split(os.sep) for p in paths for part in ("site-packages", "test", "tests"))
    docs = list(corpora.iter_documents("stdlib", max_docs=4))
    assert len(docs) == 4 and all(d.strip() for d in docs)
    config = default_data_config()  # corpus="stdlib" is the default
    config.max_bytes = 20000
    meta, records = _records(prepare_corpus(config, out_dir=str(tmp_path / "stdlib")))
    assert meta["source"] == "stdlib" and "PSF" in meta["licence"] and meta["num_tokens"] == 20000
    assert ByteTokenizer().decode(records[0]) == docs[0]


def test_caps_count_documents_and_utf8_bytes():
    texts = _pydoc_texts()
    assert list(corpora.iter_documents("pydoc", max_docs=3)) == texts[:3]
    capped = list(corpora.iter_documents("pydoc", max_bytes=len(texts[0].encode()) + 10))
    assert capped == [texts[0], texts[1].encode()[:10].decode()]


def _missing_path(config, tmp_path):
    config.path = str(tmp_path / "nowhere")


@pytest.mark.parametrize("change, field", [
    (_missing_path, "data.path"),
    (lambda c, _: setattr(c, "corpus", "wikipedia"), "data.corpus"),
    (lambda c, _: setattr(c, "source", "images"), "data.source"),
    (lambda c, _: setattr(c, "tokenizer", "wordpiece"), "data.tokenizer"),
    (lambda c, p: setattr(c, "tokenizer", str(p / "missing.model")), "data.tokenizer"),
    (lambda c, p: setattr(c, "tokenizer", f"tiktoken:{p / 'missing.tiktoken'}"), "data.tokenizer"),
    (lambda c, _: setattr(c, "corpus", "files"), "data.files"),
    (lambda c, p: (setattr(c, "corpus", "files"), setattr(c, "files", str(p / "*.none"))), "data.files"),
    (lambda c, _: setattr(c, "max_bytes", -1), "data.max_bytes"),
    (lambda c, _: setattr(c, "seed_offset", -1), "data.seed_offset"),
])
def test_config_errors_name_the_field(tmp_path, change, field):
    config = default_data_config()
    change(config, tmp_path)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_train_iterator(config, seq_len=16, batch_size=2, seed=0, workdir=str(tmp_path / "work"))


def test_vocab_size_errors_name_the_field(tmp_path):
    config = default_data_config()
    config.path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"data\.path"):
        vocab_size(config)
    config.path, config.tokenizer = None, "nope"
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        vocab_size(config)


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = make_tokenizer("byte")
    text = "déjà vu — λx. x² 🙂\n\ttabs"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text
    assert tokenizer.vocab_size == 258


def test_missing_optional_package_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    model = tmp_path / "m.model"
    model.write_bytes(b"x")
    with pytest.raises(ImportError, match="sentencepiece"):
        make_tokenizer(str(model))


@pytest.mark.parametrize("bos_id, expected_bos, expected_vocab", [(1, 1, 300), (-1, 300, 301)])
def test_sentencepiece_model_tokenizes_the_corpus(tmp_path, bos_id, expected_bos, expected_vocab):
    spm = pytest.importorskip("sentencepiece")
    model = tmp_path / "tiny.model"
    lines = "\n".join(_pydoc_texts()[:40]).splitlines()
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=300,
                                       model_type="bpe", bos_id=bos_id, minloglevel=2)
    tokenizer = make_tokenizer(str(model))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (expected_bos, 2, expected_vocab)
    text = "The assert statement checks a condition."
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]) == text
    config = default_data_config()
    config.shuffle_window = 1  # the first row then starts the stream, with a BOS
    config.corpus, config.max_docs, config.tokenizer = "pydoc", 5, str(model)
    assert vocab_size(config) == expected_vocab
    batch = next(build_train_iterator(config, seq_len=64, batch_size=2, seed=0, workdir=str(tmp_path)))
    assert batch["inputs"][0, 0] == expected_bos and batch["inputs"].max() < expected_vocab
    meta, records = _records(os.path.join(tmp_path, "data", os.listdir(tmp_path / "data")[0]))
    assert meta["tokenizer_name"] == "sp-tiny" and meta["vocab_size"] == expected_vocab
    assert records[0].tolist() == tokenizer.encode(_pydoc_texts()[0])


def test_tiktoken_rank_file_tokenizes(tmp_path):
    pytest.importorskip("tiktoken")
    merges = [b"th", b"he", b"the", b" the", b"in", b"ing"]
    ranks = [bytes([i]) for i in range(256)] + merges
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tokenizer = make_tokenizer(f"tiktoken:{path}")
    assert tokenizer.vocab_size == len(ranks) + 1 and tokenizer.bos_id == tokenizer.eos_id == len(ranks)
    text = "the thing in the ring"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode()) and tokenizer.decode([tokenizer.bos_id, *ids]) == text
    config = default_data_config()
    config.shuffle_window = 1  # the first row then starts the stream, with a BOS
    config.corpus, config.max_docs, config.tokenizer = "pydoc", 3, f"tiktoken:{path}"
    batch = next(build_train_iterator(config, seq_len=32, batch_size=1, seed=0, workdir=str(tmp_path)))
    assert batch["inputs"][0, 0] == tokenizer.bos_id and vocab_size(config) == len(ranks) + 1


def test_document_gets_bos_and_an_eos_only_when_distinct():
    record = np.array([5, 6], "<u2").tobytes()
    np.testing.assert_array_equal(_document(record, dtype="<u2", bos_id=9, eos_id=9)["tokens"], [9, 5, 6])
    np.testing.assert_array_equal(_document(record, dtype="<u2", bos_id=9, eos_id=10)["tokens"], [9, 5, 6, 10])
