"""The decisions that define the method: which views are paired, where gradients stop, and
how the EMA teacher moves. Each is checked against a hand-written expectation."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matching_gap import config_lib, losses, objectives, schema, train
from matching_gap import state as state_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(arg):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"), arg)


@pytest.mark.parametrize(
    "num_student,num_global,directed,expected",
    [
        # Shared weights, two global views: the one unordered pair (the losses are symmetric).
        (2, 2, False, [(1, 0)]),
        # A teacher: each student view against the teacher's other view.
        (2, 2, True, [(0, 1), (1, 0)]),
        # Local crops meet every global view; targets are global views only (DINO).
        (4, 2, True, [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]),
        (4, 2, False, [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]),
        (3, 3, False, [(1, 0), (2, 0), (2, 1)]),
        (3, 3, True, [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]),
    ],
)
def test_pairing_table(num_student, num_global, directed, expected):
    assert objectives.view_pairs(num_student, num_global, directed=directed) == expected


def _embeddings(v, k, n=8, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(v, n, d)), jnp.float32),
        jnp.asarray(rng.normal(size=(k, n, d)), jnp.float32),
    )


def _loss_config(name, **overrides):
    config = load("")
    config.loss.name = name
    config.loss.update(overrides)
    return config.loss


OT = {
    "epsilon": 0.2,
    "normalize": True,
    "relative_epsilon": None,
    "group_size": None,
    "sinkhorn_options": {"threshold": 1e-3, "max_iterations": 2000},
}


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("local", [0, 2])
@pytest.mark.parametrize("name", ["matching_gap", "info_nce", "byol"])
def test_pairwise_losses_average_the_table(name, local, ema):
    student, targets = _embeddings(2 + local, 2)
    loss_fn = functools.partial(objectives.ssl_loss, _loss_config(name), ema=ema)
    value, _ = jax.jit(loss_fn)(student, targets)
    one = {
        "matching_gap": lambda x, y: losses.matching_gap(x, y, cost="sqeuclidean", **OT)[0],
        "info_nce": lambda x, y: losses.info_nce(x, y, temperature=0.1)[0],
        "byol": lambda x, y: losses.byol_loss(x, y)[0],
    }[name]
    pairs = objectives.view_pairs(2 + local, 2, directed=ema or name == "byol")
    expected = np.mean([jax.jit(one)(student[a], targets[b]) for a, b in pairs])
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_m3g_without_teacher_is_one_problem_over_the_views():
    student, _ = _embeddings(3, 3)
    value, _ = objectives.ssl_loss(_loss_config("m3g"), student, student, ema=False)
    expected, _ = losses.multi_marginal_matching_gap(student, **OT)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_m3g_with_teacher_puts_each_student_view_with_the_teachers_other_views():
    student, targets = _embeddings(3, 3)
    value, _ = objectives.ssl_loss(_loss_config("m3g"), student, targets, ema=True)
    terms = [
        losses.multi_marginal_matching_gap(
            jnp.stack([student[a]] + [targets[m] for m in range(3) if m != a]), **OT
        )[0]
        for a in range(3)
    ]
    np.testing.assert_allclose(value, np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize("name", ["matching_gap", "info_nce", "m3g", "byol"])
def test_targets_get_no_gradient_from_a_teacher(name):
    student, targets = _embeddings(2, 2)
    loss_config = _loss_config(name)
    grad_fn = jax.jit(
        jax.grad(lambda s, t: objectives.ssl_loss(loss_config, s, t, ema=True)[0], (0, 1))
    )
    grad_student, grad_targets = grad_fn(student, targets)
    assert np.all(np.asarray(grad_targets) == 0)
    assert np.any(np.asarray(grad_student) != 0)
    # With shared weights the symmetric pairwise losses train through both sides (M3G then
    # solves one problem over the student's views, BYOL stops the targets' gradient).
    if name in ("matching_gap", "info_nce"):
        shared = jax.jit(
            jax.grad(lambda t: objectives.ssl_loss(loss_config, student, t, ema=False)[0])
        )
        assert np.any(np.asarray(shared(targets)) != 0)


def test_one_step_moves_the_teacher_to_the_momentum_average():
    config = load("smoke,byol")
    config.teacher.momentum = 0.9  # far from 1, so that a missing update is visible
    config = schema.parse(config)
    optimizer, schedules = state_lib.make_optimizer(config, 10, 5)
    graphdef, state = state_lib.create_train_state(config, optimizer)
    # A teacher that differs from the student, so that both terms of the average show.
    state = state.replace(teacher=jax.tree.map(lambda t: t + 0.5, state.teacher))
    step = jax.jit(train.make_train_step(config, graphdef, optimizer, schedules))
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    new, _ = step(state, images)
    m = float(schedules["momentum"](0))
    assert m == pytest.approx(0.9)
    moved = jax.tree.map(lambda t, p: m * t + (1 - m) * p, state.teacher, new.params)
    for a, b in zip(jax.tree.leaves(new.teacher), jax.tree.leaves(moved), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    pairs = zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
    assert any(np.any(a != b) for a, b in pairs)  # the student moved: the average is new
    assert int(new.step) == 1
