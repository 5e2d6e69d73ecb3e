"""The pictures: transport plan, neighbours, embedding map, and the run that writes them."""

import glob
import os

import numpy as np
import pytest
import scipy.optimize
from PIL import Image

from matching_gap import losses, pictures
from tests.test_train import load, run


def _sinkhorn_numpy(cost, eps, iterations=20_000):
    """Plain float64 Sinkhorn with uniform marginals (an independent reference)."""
    n, m = cost.shape
    k = np.exp(-(cost - cost.min()) / eps)
    u, v = np.ones(n), np.ones(m)
    for _ in range(iterations):
        u = (1.0 / n) / (k @ v)
        v = (1.0 / m) / (k.T @ u)
    return u[:, None] * k * v[None, :]


def test_transport_plan_equals_a_float64_sinkhorn_and_has_uniform_marginals():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 12, 5))
    plan = np.asarray(
        losses.transport_plan(
            x, y, epsilon=0.5, normalize=True, sinkhorn_options={"threshold": 1e-7}
        )
    )
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    cost = ((unit(x)[:, None] - unit(y)[None]) ** 2).sum(-1)
    np.testing.assert_allclose(plan, _sinkhorn_numpy(cost, 0.5), atol=1e-5)
    np.testing.assert_allclose(plan.sum(1), np.full(12, 1 / 12), atol=1e-5)


def test_transport_plan_tends_to_the_optimal_assignment():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 10, 3))
    plan = np.asarray(
        losses.transport_plan(x, y, epsilon=1e-3, sinkhorn_options={"max_iterations": 20_000})
    )
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    assignment = np.zeros((10, 10))
    assignment[rows, cols] = 0.1
    np.testing.assert_allclose(plan, assignment, atol=1e-3)


def test_nearest_matches_a_brute_force_sort():
    rng = np.random.default_rng(2)
    queries, keys = rng.normal(size=(5, 7)), rng.normal(size=(40, 7))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    expected = np.argsort(-(unit(queries) @ unit(keys).T), axis=1)[:, :6]
    np.testing.assert_array_equal(pictures.nearest(queries, keys, 6), expected)


def test_confused_pairs_are_the_largest_off_diagonal_entries():
    plan = np.eye(4) * 0.5  # the true pairs hold the most mass: they must be skipped
    plan[0, 2], plan[3, 1], plan[1, 0] = 0.3, 0.1, 0.2
    pairs = pictures.confused_pairs(plan, 2)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2), (1, 0)]
    assert pairs[0][2] == pytest.approx(0.3 * 4)


def test_neighbour_grid_frames_same_class_green_and_other_class_red():
    queries = np.zeros((2, 4, 4, 1), np.uint8)
    train = np.full((3, 4, 4, 1), 200, np.uint8)
    grid = pictures.neighbour_grid(
        queries,
        np.array([0, 1]),
        train,
        np.array([0, 1, 1]),
        {"a": np.array([[0, 1], [1, 0]])},
        scale=1,
    )
    cell, gap, top = 4 + 4, 8, pictures._TEXT_HEIGHT
    frame = lambda row, col: tuple(grid[top + row * cell, cell + gap + col * cell])
    assert frame(0, 0) == pictures._GOOD and frame(0, 1) == pictures._BAD
    assert frame(1, 0) == pictures._GOOD and frame(1, 1) == pictures._BAD
    assert grid.shape == (top + 2 * cell, cell + gap + 2 * cell, 3)


def test_plan_picture_shows_the_plan_next_to_the_identity():
    plan = np.full((3, 3), 1 / 9)
    image = pictures.plan_picture(plan, scale=1)
    body = image[pictures._TEXT_HEIGHT :, :, 0]
    assert body.shape == (3, 3 + 4 + 3)
    np.testing.assert_array_equal(body[:, :3], np.round(255 * (1 - 1 / 3)))  # n * P = 1/3
    np.testing.assert_array_equal(body[:, 7:], 255 * (1 - np.eye(3)))


def test_a_run_writes_the_pictures_and_the_transport_plan_images(tmp_path):
    config = load("default.py", "smoke")
    config.train.update(pictures=True, plan_every=2, knn_every=0)
    outcome = run(config, tmp_path)
    assert outcome.finished
    for name in ("neighbours.png", "embedding.png", "transport_plan.png", "confused_pairs.png"):
        image = np.asarray(Image.open(tmp_path / "pictures" / name))
        assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(tmp_path, "tensorboard", "*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {(event.step, v.tag) for v in event.summary.value}
    assert {(2, "plan/transport_plan"), (2, "plan/confused_pairs")} <= tags
