"""MQAR: recall answers recoverable from the pairs, loss only on answers, stream properties."""
import numpy as np
import pytest

from attnlab.data import build_train_iterator, default_data_config, vocab_size


def _config(vocab=64, pairs=5, queries=None):
    config = default_data_config()
    config.source = "mqar"
    config.mqar.vocab_size, config.mqar.num_pairs, config.mqar.num_queries = vocab, pairs, queries
    return config


def _iterator(config, seq_len=29, batch_size=6, seed=0, **kwargs):
    return build_train_iterator(config, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                workdir="/nonexistent-workdir-unused-by-mqar", **kwargs)


@pytest.mark.parametrize("vocab, pairs, queries, seq_len", [(64, 5, None, 29), (40, 7, 3, 20), (16, 3, 6, 18)])
def test_answers_are_the_values_of_their_keys_and_only_answers_count(vocab, pairs, queries, seq_len):
    config = _config(vocab, pairs, queries)
    num_queries = pairs if queries is None else queries
    length = 2 * pairs + 2 * num_queries
    assert vocab_size(config) == vocab
    for batch in [next(_iterator(config, seq_len=seq_len, seed=s)) for s in (0, 1)]:
        assert batch["inputs"].shape == (6, seq_len) and batch["loss_mask"].dtype == np.float32
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for inputs, targets, seg, pos, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                                   batch["positions"], batch["loss_mask"]):
            keys, values = inputs[0:2 * pairs:2], inputs[1:2 * pairs:2]
            assert len(set(keys.tolist())) == pairs
            assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
            value_of = dict(zip(keys.tolist(), values.tolist()))
            answered = np.flatnonzero(mask)
            np.testing.assert_array_equal(answered, np.arange(2 * pairs, length, 2))
            assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
            for t in answered:
                assert targets[t] == value_of[int(inputs[t])]
            if num_queries <= pairs:
                assert len(set(inputs[answered].tolist())) == num_queries, "queries are distinct keys"
            np.testing.assert_array_equal(seg, (np.arange(seq_len) < length).astype(np.int32))
            np.testing.assert_array_equal(pos, np.where(seg == 1, np.arange(seq_len), 0))
            assert (inputs[length:] == 0).all()


def test_deterministic_seed_dependent_and_resumable():
    config = _config()
    a, b = _iterator(config, seed=4), _iterator(config, seed=4)
    for _ in range(3):
        np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
    assert not np.array_equal(next(_iterator(config, seed=4))["inputs"], next(_iterator(config, seed=5))["inputs"])
    state = a.get_state()
    expected = [next(a)["inputs"] for _ in range(2)]
    fresh = _iterator(config, seed=4)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)
    assert not np.array_equal(expected[0], expected[1])


def test_processes_split_the_example_indices():
    config = _config()
    rows = [next(_iterator(config, process_index=p, process_count=2))["inputs"] for p in (0, 1)]
    single = next(_iterator(config, batch_size=12))["inputs"]
    np.testing.assert_array_equal(rows[0], single[0::2])
    np.testing.assert_array_equal(rows[1], single[1::2])


@pytest.mark.parametrize("vocab, pairs, queries, seq_len, field", [
    (64, 8, None, 31, "data.mqar.num_pairs"),          # needs 2*8 + 2*8 = 32 > 31
    (64, 4, 9, 25, "data.mqar.num_queries"),           # needs 8 + 18 = 26 > 25
    (16, 8, 1, 64, "data.mqar.num_pairs"),             # only 7 key tokens in [1, 8)
    (2, 1, 1, 64, "data.mqar.vocab_size"),
    (64, 0, 1, 64, "data.mqar.num_pairs"),
])
def test_impossible_shapes_name_the_fields(vocab, pairs, queries, seq_len, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _iterator(_config(vocab, pairs, queries), seq_len=seq_len)
