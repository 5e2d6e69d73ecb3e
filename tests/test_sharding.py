"""One device and four simulated devices give the same training; grouped OT stays local."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from matching_gap import config_lib, losses, metrics, objectives, train
from matching_gap import sharding as sharding_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(name, arg=None):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", name), arg)


def test_four_simulated_devices_are_present():
    assert jax.device_count() == 4


def _final_params(workdir, step):
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "default"))
    return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]


@pytest.mark.parametrize(
    "group_size,fsdp",
    [
        pytest.param(0, False, marks=pytest.mark.slow),
        pytest.param(4, False, marks=pytest.mark.slow),
        (4, True),
    ],
)
def test_one_and_four_devices_train_the_same_model(tmp_path, monkeypatch, group_size, fsdp):
    # The smoke model's arrays are all small: lower the size under which FSDP replicates.
    monkeypatch.setattr(sharding_lib, "FSDP_MIN_SIZE", 256)
    config = load("default.py", "smoke")
    config.loss.group_size = group_size
    config.train.fsdp = fsdp
    config.train.final_eval = False
    config.train.knn_every = 0
    runs = {}
    for n in (1, 4):
        workdir = str(tmp_path / f"devices{n}")
        with tfds.testing.mock_data(num_examples=64):
            train.train_and_evaluate(config, workdir, devices=jax.devices()[:n])
        runs[n] = workdir
    losses_1 = [r["train/loss"] for r in metrics.read_metrics(runs[1])]
    losses_4 = [r["train/loss"] for r in metrics.read_metrics(runs[4])]
    np.testing.assert_allclose(losses_1, losses_4, rtol=1e-5)
    for a, b in zip(_final_params(runs[1], 3), _final_params(runs[4], 3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _loop_collectives(hlo: str) -> list[str]:
    """Collective ops inside while-loop bodies and conditions (recursively) of an HLO module."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    called = lambda body: re.findall(
        r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", "\n".join(body)
    )
    todo = [
        n
        for body in computations.values()
        for n in re.findall(r"while\(.*?(?:body|condition)=%?([\w.\-]+)", "\n".join(body))
    ]
    todo += [
        n
        for body in computations.values()
        for n in re.findall(r"condition=%?([\w.\-]+)", "\n".join(body))
    ]
    seen, found = set(), []
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        body = computations[name]
        found += [
            op
            for line in body
            for op in re.findall(
                r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)\b", line
            )
        ]
        todo += called(body)
    return found


def _compiled_loss_hlo(config, mesh, loss_fn=None):
    loss_fn = loss_fn or objectives.make_objective(config, mesh)
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P(None, sharding_lib.DATA_AXIS)))
    grad_fn = jax.jit(jax.value_and_grad(lambda s: loss_fn(s, s)[0]))
    return grad_fn, sharded, grad_fn.lower(sharded).compile().as_text()


def test_grouped_ot_has_no_cross_device_traffic_inside_sinkhorn():
    config = load("default.py", "smoke")
    config.loss.group_size = 4  # 16 items on 4 devices: one group per device
    mesh = sharding_lib.make_mesh()
    grad_fn, x, hlo = _compiled_loss_hlo(config, mesh)
    assert "while" in hlo
    assert _loop_collectives(hlo) == []
    # The check can fail: the same groups vmapped over sharded embeddings (no shard_map)
    # all-reduce the stopping test across devices at every Sinkhorn iteration.
    plain = functools.partial(objectives.ssl_loss, config.loss, ema=False)
    _, _, plain_hlo = _compiled_loss_hlo(config, mesh, plain)
    assert "all-reduce" in _loop_collectives(plain_hlo)
    # Same value as the single-device grouped loss on the gathered embeddings.
    value, _ = grad_fn(x)
    expected, _ = losses.matching_gap(
        x[1], x[0], epsilon=config.loss.epsilon, normalize=True, group_size=4
    )
    np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.slow
def test_global_ot_on_sharded_embeddings_equals_single_device():
    config = load("default.py", "smoke")
    config.loss.group_size = 0
    mesh = sharding_lib.make_mesh()
    grad_fn, x, _ = _compiled_loss_hlo(config, mesh)
    (value, grad) = grad_fn(x)
    single = jax.value_and_grad(lambda s: objectives.make_objective(config)(s, s)[0])
    expected_value, expected_grad = single(jnp.asarray(np.asarray(x)))
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_fsdp_shardings_split_large_arrays_over_devices():
    mesh = sharding_lib.make_mesh()
    tree = {"big": jnp.zeros((64, 512)), "odd": jnp.zeros((3, 5, 4097)), "small": jnp.zeros(8)}
    shardings = sharding_lib.fsdp_shardings(tree, mesh)
    assert shardings["big"].spec == jax.P(None, "data")
    assert shardings["small"].spec == jax.P()
    assert shardings["odd"].spec == jax.P()  # no dimension divisible by 4
    placed = jax.device_put(tree["big"], shardings["big"])
    assert placed.addressable_shards[0].data.shape == (64, 128)
