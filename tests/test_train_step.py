"""Mesh and FSDP sharding rule, mesh and batch errors, the learning-rate schedule, and one train
step on 8 devices == the same step on 1 device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from attnlab.train.sharding import (batch_sharding, check_batch_size, fsdp_spec, global_batch,
                                    make_mesh)
from attnlab.train.step import make_trainer
from test_config import tiny_config


def test_fsdp_spec_picks_largest_divisible_dim():
    assert fsdp_spec((6, 16), 4) == PartitionSpec(None, "fsdp")
    assert fsdp_spec((32, 12), 4) == PartitionSpec("fsdp", None)
    assert fsdp_spec((7, 12, 5), 4) == PartitionSpec(None, "fsdp", None)
    assert fsdp_spec((7, 5), 4) == PartitionSpec()
    assert fsdp_spec((), 4) == PartitionSpec()
    assert fsdp_spec((16, 16), 1) == PartitionSpec()


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
    mesh = make_mesh({"data": -1, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="mesh.fsdp=3 does not divide the 8 devices"):
        make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp = 2 \* 2 != 8"):
        make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(ValueError, match="mesh.data must be a positive size or -1"):
        make_mesh({"data": 0, "fsdp": 8})


def test_batch_must_divide_mesh_and_processes():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    assert check_batch_size(16, mesh, 2) == 8
    with pytest.raises(ValueError, match="train.batch_size=12 is not divisible by the mesh's data\\*fsdp = 8"):
        check_batch_size(12, mesh, 1)
    with pytest.raises(ValueError, match="train.batch_size=8 is not divisible by the 3 processes"):
        check_batch_size(8, make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]), 3)


def random_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    segment_ids = np.repeat(np.array([[1] * 9 + [2] * (seq - 9)], np.int32), batch, axis=0)
    positions = np.where(segment_ids == 1, np.arange(seq), np.arange(seq) - 9).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": (rng.random((batch, seq)) > 0.2).astype(np.float32)}


@pytest.mark.parametrize("pattern", ["SW"])
def test_train_step_on_8_devices_matches_1_device(pattern):
    config = tiny_config(pattern=pattern)
    config.model.vocab_size = 64
    batch = random_batch(8, 19, 64)
    results = []
    for mesh_shape, devices in (((1, 1), jax.devices()[:1]), ((2, 4), jax.devices())):
        mesh = make_mesh({"data": mesh_shape[0], "fsdp": mesh_shape[1]}, devices)
        trainer = make_trainer(config, mesh)
        with jax.set_mesh(mesh):
            state, rest = trainer.init()
            specs = [x.sharding.spec for x in jax.tree.leaves(state["params"])]
            assert any("fsdp" in spec for spec in specs) == (mesh_shape[1] > 1)
            state, metrics = trainer.jit_step()(state, rest, global_batch(batch, batch_sharding(mesh)))
            results.append(jax.device_get((state, metrics)))
    (one_state, one_metrics), (many_state, many_metrics) = results
    assert np.isfinite(one_metrics["loss"])
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(many_metrics[name], one_metrics[name], rtol=1e-5)
    sharded = [x for x in jax.tree.leaves(many_state["params"]) if np.ndim(x) >= 2]
    assert sharded, "no matrix parameters"
    # Adam's first update is about lr * sign(g): a gradient entry near zero may flip with the
    # reduction order, so parameters are compared to 1e-5 absolute (lr = 3e-3, weights ~ 2e-2).
    for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(many_state)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # The step changed the parameters, so equal results are not two untouched inits.
    fresh, _ = make_trainer(config, make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])).init()
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(fresh["params"]),
                                                     jax.tree.leaves(one_state["params"])))


@pytest.mark.parametrize("warmup", [0, 3, 10])
def test_learning_rate_schedule(warmup):
    from attnlab.train.optim import learning_rate_schedule
    steps, lr, ratio = 10, 2e-3, 0.1
    schedule = learning_rate_schedule({"lr": lr, "warmup_steps": warmup, "steps": steps, "min_lr_ratio": ratio})
    got = np.array([schedule(c) for c in range(steps)])  # update s = c + 1
    s = np.arange(1, steps + 1)
    p = np.clip((s - warmup) / max(steps - warmup, 1), 0, 1)
    expected = np.where(s <= warmup, lr * s / max(warmup, 1),
                        lr * ratio + lr * (1 - ratio) * 0.5 * (1 + np.cos(np.pi * p)))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] > 0 and np.isclose(got[-1], lr if warmup == steps else lr * ratio)
