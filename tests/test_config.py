"""Configs: the shipped config files load, bad fields get errors that name them, and the
README's test command is the one CI runs."""
import importlib.util
import pathlib
import re

import jax
import pytest
from ml_collections import ConfigDict

from attnlab.train.loop import resolve_config, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str) -> ConfigDict:
    """``get_config()`` of ``configs/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(pattern: str = "S", **train_overrides) -> ConfigDict:
    """configs/tiny.py shrunk to a model and batch that train in seconds on one CPU core."""
    config = load_config("tiny")
    config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=48,
                        pattern=pattern)
    config.train.update(seq_len=32, batch_size=8, steps=4, warmup_steps=1, log_every=1,
                        checkpoint_every=2)
    config.mesh.update(data=1, fsdp=1)
    config.train.update(**train_overrides)
    return config


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")))
def test_shipped_configs_resolve(name):
    config = resolve_config(load_config(name))
    assert config.model.vocab_size > 0
    assert config.train.batch_size > 0 and config.train.steps > 0


@pytest.mark.parametrize("field, value, message", [
    ("model.pattern", "SX", r"unknown attention 'X'"),
    ("model.pattern", "SSS", r"model.pattern 'SSS' has 3 entries, which does not divide model.num_layers=2"),
    ("train.batch_size", 4, r"train.batch_size=4 is not divisible by the mesh's data\*fsdp = 8"),
    ("mesh.fsdp", 3, r"mesh.fsdp=3 does not divide the 8 devices"),
    ("train.steps", 0, r"train.steps must be >= 1"),
    ("train.warmup_steps", 10, r"train.warmup_steps=10 must lie in \[0, train.steps=4\]"),
    ("data.path", "/no/such/corpus", r"data.path='/no/such/corpus' is not a prepared corpus"),
])
def test_bad_field_is_named(tmp_path, field, value, message):
    config = tiny_config()
    config.mesh.data = -1  # all 8 test devices
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=message):
        train(config, str(tmp_path))


def test_sequence_length_the_data_cannot_give(tmp_path):
    config = tiny_config()
    config.data.source = "mqar"
    config.data.mqar.update(vocab_size=64, num_pairs=8, num_queries=8)
    config.train.seq_len = 16
    with pytest.raises(ValueError, match=r"train.seq_len=16.*need seq_len >= .* = 32"):
        train(config, str(tmp_path), devices=jax.devices()[:1])


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c.strip() for c in re.findall(r"```(?:bash|sh)?\n(.*?)\n```", text, re.S)]


def test_ci_runs_the_readme_test_commands():
    """The suite (jax 0.10 / Python 3.11) and the Mosaic GPU interpret tests (jax 0.12)."""
    suite, mosaic = readme_commands()[1:3]
    assert "pytest" in suite and "[test]" in suite
    assert "pytest" in mosaic and "jax>=0.12" in mosaic and "mosaic_gpu" in mosaic
    ci = (ROOT / ".ci" / "run").read_text()
    for command in (suite, mosaic):
        assert command in ci, "the README's test commands and .ci/run have drifted apart"
