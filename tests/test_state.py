"""The train state: the evaluated encoder restored from a checkpoint without the rest."""

import os

import jax
import numpy as np
import pytest
import tensorstore as ts

from matching_gap import checkpointing, config_lib, errors, schema
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _delete(checkpoint: str, *prefixes: str) -> None:
    """Deletes the arrays under ``prefixes`` (saved field names) from an Orbax checkpoint."""
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{checkpoint}/"}).result()
    for prefix in prefixes:
        start = prefix.encode()
        store.delete_range(ts.KvStore.KeyRange(start, start + b"\xff")).result()


@pytest.mark.parametrize("ema", [True, False])
def test_restore_encoder_reads_the_evaluated_parameters_only(tmp_path, monkeypatch, ema):
    monkeypatch.setattr(sharding_lib, "FSDP_MIN_SIZE", 256)  # FSDP shards the small model
    monkeypatch.setattr(checkpointing, "RESTORE_RETRY_SECONDS", 0.0)
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"), "smoke")
    config.teacher.ema = ema
    config.train.fsdp = True
    config = schema.parse(config)
    mesh = sharding_lib.make_mesh()
    optimizer, _ = state_lib.make_optimizer(config, 2, 1)
    _, abstract, shardings = state_lib.abstract_train_state(config, optimizer, mesh)
    state = state_lib.init_train_state(config, optimizer, shardings)
    if ema:  # a teacher unlike the student
        state = state.replace(teacher=jax.tree.map(lambda x: x + 1.0, state.params))
    state = state.replace(step=state.step + 3)
    ckpt = checkpointing.Checkpointer(str(tmp_path))
    ckpt.save(3, state, force=True)  # as training saves
    ckpt.close()

    full = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    expected = state_lib.encoder_params(config, full.restore_latest(abstract))
    full.close()
    _, params, step = state_lib.restore_encoder(config, str(tmp_path), mesh)
    assert step == 3
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == want.sharding  # FSDP as in training
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in jax.tree.leaves(params))

    # Without the optimiser state and the other model, the encoder still restores; a
    # full restore no longer can.
    _delete(
        str(tmp_path / "checkpoints" / "3" / "default"),
        "opt_state",
        "params." if ema else "teacher.",
    )
    _, again, step = state_lib.restore_encoder(config, str(tmp_path), mesh)
    assert step == 3
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    full = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(errors.WorkdirError):
        full.restore_latest(abstract)
    full.close()
