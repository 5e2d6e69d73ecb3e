"""Evaluators on hand-made features whose answer is known."""

import numpy as np
import pytest

from matching_gap import evaluators
from matching_gap.evaluators import LabelledFeatures as LF


def _clusters(n_per_class, num_classes, dim, noise, seed):
    rng = np.random.default_rng(seed)
    centres = np.eye(num_classes, dim) * 5.0
    labels = np.repeat(np.arange(num_classes), n_per_class)
    feats = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return feats.astype(np.float32), labels.astype(np.int32)


def test_knn_separable_clusters_are_perfect():
    x, y = _clusters(30, 4, 8, 0.1, 0)
    xt, yt = _clusters(10, 4, 8, 0.1, 1)
    assert evaluators.knn_accuracy(LF(x, y, 4), LF(xt, yt, 4), k=5) == 1.0


def test_knn_hand_computed_vote():
    # Test point (1, 0): nearest neighbours are two of class 1 (cosine 1 and 0.8) and one of
    # class 0 at cosine 0.99: the weighted vote with k = 3 is decided by the weights.
    train = np.array([[1, 0], [0.8, 0.6], [0.99, 0.141], [-1, 0]], np.float32)
    labels = np.array([1, 1, 0, 0], np.int32)
    test = np.array([[1, 0]], np.float32)
    assert evaluators.knn_accuracy(LF(train, labels, 2), LF(test, np.array([1]), 2), k=3) == 1
    # With k = 1 only the exact match votes.
    assert evaluators.knn_accuracy(LF(train, labels, 2), LF(test, np.array([1]), 2), k=1) == 1
    # Random labels: chance level.
    x, _ = _clusters(100, 4, 8, 0.1, 2)
    y = np.random.default_rng(0).integers(0, 4, len(x)).astype(np.int32)
    xt, _ = _clusters(100, 4, 8, 0.1, 3)
    yt = np.random.default_rng(1).integers(0, 4, len(xt)).astype(np.int32)
    assert evaluators.knn_accuracy(LF(x, y, 4), LF(xt, yt, 4), k=10) < 0.4


def test_knn_weights_overturn_the_majority():
    # k = 3 neighbours of (1, 0): one of class 0 at cosine 1, two of class 1 at cosine 0.6.
    # A plain majority says class 1; exp(cos / 0.07) weights say class 0 (e^14.3 > 2 e^8.6).
    train = np.array([[1, 0], [0.6, 0.8], [0.6, -0.8], [-1, 0]], np.float32)
    labels = np.array([0, 1, 1, 1], np.int32)
    test = np.array([[1, 0]], np.float32)
    weighted = evaluators.knn_accuracy(LF(train, labels, 2), LF(test, np.array([0]), 2), k=3)
    assert weighted == 1.0
    # With a very high temperature the weights are nearly equal and the majority wins.
    flat = evaluators.knn_accuracy(LF(train, labels, 2), LF(test, np.array([1]), 2), k=3,
                                   temperature=1e3)  # fmt: skip
    assert flat == 1.0


def test_knn_needs_k_points():
    with pytest.raises(ValueError, match="at least k"):
        evaluators.knn_accuracy(LF(np.ones((3, 2)), np.zeros(3, int), 2),
                                LF(np.ones((1, 2)), np.zeros(1, int), 2), k=5)  # fmt: skip


def test_linear_probe_learns_a_linear_rule_and_fails_on_noise():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3))
    x = rng.normal(size=(2000, 6)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int32)
    xt = rng.normal(size=(500, 6)).astype(np.float32)
    yt = np.argmax(xt @ w, axis=1).astype(np.int32)
    settings = evaluators.ProbeSettings(epochs=30, batch_size=256, learning_rate=0.05)
    acc = evaluators.linear_probe_accuracy(LF(x, y, 3), LF(xt, yt, 3), settings)
    assert acc > 0.95
    shuffled = rng.permutation(yt)
    settings = evaluators.ProbeSettings(epochs=5, batch_size=256)
    acc = evaluators.linear_probe_accuracy(LF(x, y, 3), LF(xt, shuffled, 3), settings)
    assert acc < 0.5
