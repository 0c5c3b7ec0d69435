"""Text pipeline: packing, masks, determinism, epochs, process sharding, Orbax resume."""
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnlab.data import build_train_iterator, default_data_config, vocab_size
from attnlab.data.byte_tokenizer import ByteTokenizer
from attnlab.data.pipeline import _window_to_example

BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id
NUM_DOCS, SEQ_LEN, BATCH = 23, 37, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """23 files; file i holds "<iii>" then random letters, 4..120 of them: (config, workdir, texts)."""
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(7)
    texts = {}
    for i in range(NUM_DOCS):
        body = "".join(rng.choice(list("abcdefghij é\n"), size=int(rng.integers(4, 121))))
        texts[i] = f"<{i:03d}>{body}"
        (root / f"doc{i:03d}.txt").write_text(texts[i], encoding="utf-8")
    config = default_data_config()
    config.corpus = "files"
    config.files = str(root / "*.txt")
    config.shuffle_window = 1  # the stream tests read rows in order; see the window-shuffle test
    return config, str(tmp_path_factory.mktemp("workdir")), texts


def _iterator(corpus, seed=0, **kwargs):
    config, workdir, _ = corpus
    return build_train_iterator(config, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed, workdir=workdir, **kwargs)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _stream(batches):
    """The packed token stream: every row's window is inputs + the last target."""
    return np.concatenate([np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
                           for b in batches for r in range(b["inputs"].shape[0])])


def _documents(stream):
    """Complete documents (BOS ... EOS) of a stream, decoded; the leading partial one is dropped."""
    starts = np.flatnonzero(stream == BOS)
    docs = []
    for a, b in zip(starts[:-1], starts[1:]):
        assert stream[b - 1] == EOS, "every document ends with EOS right before the next BOS"
        docs.append(ByteTokenizer().decode(stream[a + 1:b - 1]))
    return docs


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_shapes_dtypes_and_vocab(corpus):
    batch = next(_iterator(corpus))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                       ("positions", np.int32), ("loss_mask", np.float32)]:
        assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype, key
    assert vocab_size(corpus[0]) == 258
    assert batch["inputs"].max() < 258 and batch["inputs"].min() >= 0


def test_targets_segments_positions_and_mask_follow_the_tokens(corpus):
    batches = _take(_iterator(corpus), 12)
    for b in batches:
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        for inputs, targets, seg, pos, mask in zip(b["inputs"], b["targets"], b["segment_ids"],
                                                   b["positions"], b["loss_mask"]):
            # Independent derivation: a BOS opens a new document; a row starts in document 1.
            is_bos = inputs == BOS
            expected_seg = np.cumsum(is_bos) + (0 if is_bos[0] else 1)
            starts = np.where(is_bos | (np.arange(SEQ_LEN) == 0), np.arange(SEQ_LEN), 0)
            expected_pos = np.arange(SEQ_LEN) - np.maximum.accumulate(starts)
            np.testing.assert_array_equal(seg, expected_seg)
            np.testing.assert_array_equal(pos, expected_pos)
            # A target counts unless it is the next document's BOS (no padding in a text stream).
            np.testing.assert_array_equal(mask, (targets != BOS).astype(np.float32))
    assert any((b["segment_ids"] > 1).any() for b in batches), "test must see packed rows"


def test_window_shuffle_permutes_rows_within_each_window(corpus):
    config, workdir, _ = corpus
    shuffled = config.copy_and_resolve_references()
    shuffled.shuffle_window = 4 * BATCH
    rows = lambda batches: [tuple(r) for b in batches for r in b["inputs"]]
    plain = rows(_take(_iterator(corpus), 8))
    mixed = rows(_take(build_train_iterator(shuffled, seq_len=SEQ_LEN, batch_size=BATCH, seed=0,
                                            workdir=workdir), 8))
    for w in range(2):
        window = slice(w * 4 * BATCH, (w + 1) * 4 * BATCH)
        assert sorted(mixed[window]) == sorted(plain[window]), "a window holds the same rows"
    assert mixed != plain, "rows are reordered"


@pytest.mark.parametrize("window", [1, 5])
def test_state_survives_a_json_round_trip_mid_window(corpus, window):
    # Orbax stores the iterator state as JSON (tuples come back as lists).
    import json
    config, workdir, _ = corpus
    config = config.copy_and_resolve_references()
    config.shuffle_window = window
    make = lambda: build_train_iterator(config, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, workdir=workdir)
    for skip in (1, 7):
        iterator = make()
        _take(iterator, skip)
        state = json.loads(json.dumps(iterator.get_state()))
        expected = _take(iterator, 6)
        restored = make()
        restored.set_state(state)
        _assert_batches_equal(_take(restored, 6), expected)


def test_window_with_padding_masks_padding_and_boundaries():
    window = {"tokens": np.array([5, 6, 7, 8, 9, 0, 0]),
              "tokens_segment_ids": np.array([1, 1, 2, 2, 2, 0, 0]),
              "tokens_positions": np.array([3, 4, 0, 1, 2, 0, 0])}
    example = _window_to_example(window)
    np.testing.assert_array_equal(example["inputs"], [5, 6, 7, 8, 9, 0])
    np.testing.assert_array_equal(example["targets"], [6, 7, 8, 9, 0, 0])
    np.testing.assert_array_equal(example["segment_ids"], [1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(example["positions"], [3, 4, 0, 1, 2, 0])
    np.testing.assert_array_equal(example["loss_mask"], [1, 0, 1, 1, 0, 0])


def test_documents_round_trip_and_each_epoch_is_a_new_permutation(corpus):
    texts = corpus[2]
    docs = _documents(_stream(_take(_iterator(corpus), 60)))
    ids = [int(d[1:4]) for d in docs]
    assert all(d == texts[i] for d, i in zip(docs, ids)), "decoded documents equal the files"
    assert len(ids) >= 2 * NUM_DOCS + 1
    # The stream starts with a BOS, so docs[0] is the first document of epoch 1.
    epoch1, epoch2 = ids[:NUM_DOCS], ids[NUM_DOCS:2 * NUM_DOCS]
    assert sorted(epoch1) == sorted(epoch2) == list(range(NUM_DOCS))
    assert epoch1 != epoch2 and epoch1 != list(range(NUM_DOCS))


def test_deterministic_for_a_seed_and_different_for_another(corpus):
    first = _take(_iterator(corpus, seed=3), 4)
    _assert_batches_equal(first, _take(_iterator(corpus, seed=3), 4))
    other = next(_iterator(corpus, seed=4))
    assert not np.array_equal(first[0]["inputs"], other["inputs"])
    config, workdir, _ = corpus
    shifted = config.copy_and_resolve_references()
    shifted.seed_offset = 1
    moved = next(build_train_iterator(shifted, seq_len=SEQ_LEN, batch_size=BATCH, seed=3, workdir=workdir))
    np.testing.assert_array_equal(moved["inputs"], other["inputs"])


def test_two_processes_get_disjoint_documents(corpus):
    seen = []
    for process_index in (0, 1):
        batches = _take(_iterator(corpus, process_index=process_index, process_count=2), 20)
        seen.append({int(d[1:4]) for d in _documents(_stream(batches))})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_DOCS))


def test_get_state_set_state_resumes(corpus):
    iterator = _iterator(corpus)
    _take(iterator, 5)
    state = iterator.get_state()
    expected = _take(iterator, 3)
    fresh = _iterator(corpus)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


def test_resume_mid_epoch_through_orbax_equals_uninterrupted(corpus, tmp_path):
    uninterrupted = _take(_iterator(corpus, seed=11), 9)
    iterator = _iterator(corpus, seed=11)
    _take(iterator, 4)  # 12 rows: mid-epoch, mid-document
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    resumed = _iterator(corpus, seed=11)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        assert manager.latest_step() == 4
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_batches_equal(_take(resumed, 5), uninterrupted[4:])


def test_prepared_once_into_workdir_and_reused(corpus):
    config, workdir, _ = corpus
    next(_iterator(corpus))
    prepared = os.listdir(os.path.join(workdir, "data"))
    assert len(prepared) == 1
    meta = os.path.join(workdir, "data", prepared[0], "meta.json")
    mtime = os.stat(meta).st_mtime_ns
    next(_iterator(corpus, seed=5))
    assert os.listdir(os.path.join(workdir, "data")) == prepared and os.stat(meta).st_mtime_ns == mtime


def test_worker_process_gives_the_same_stream(corpus):
    config, workdir, _ = corpus
    with_worker = config.copy_and_resolve_references()
    with_worker.num_workers = 1
    iterator = build_train_iterator(with_worker, seq_len=SEQ_LEN, batch_size=BATCH, seed=2, workdir=workdir)
    _assert_batches_equal(_take(iterator, 3), _take(_iterator(corpus, seed=2), 3))


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq_len=0), "seq_len"), (dict(batch_size=0), "batch_size"),
    (dict(process_index=2, process_count=2), "process_index")])
def test_bad_iterator_arguments_name_the_argument(corpus, kwargs, field):
    config, workdir, _ = corpus
    args = dict(seq_len=SEQ_LEN, batch_size=BATCH, seed=0, workdir=workdir) | kwargs
    with pytest.raises(ValueError, match=field):
        build_train_iterator(config, **args)
