"""Evaluation of frozen features: weighted k-NN (as DINO) and a linear probe.

Both take features already computed (:class:`LabelledFeatures`: ``[n, d]`` features with
integer labels), so they can be tested on hand-made data and reused on any encoder.
:func:`extract_features` runs an encoder over a :class:`~matching_gap.data.Dataset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from matching_gap import data as data_lib
from matching_gap.losses import l2_normalize


class LabelledFeatures(NamedTuple):
    features: np.ndarray  # float [n, d]
    labels: np.ndarray  # int [n], in [0, num_classes)
    num_classes: int


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """The linear probe's training (AdamW, cosine schedule, shuffled minibatches)."""

    epochs: int = 30
    batch_size: int = 1024
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4


# Test points scored per k-NN call: one compiled shape, bounded [chunk, n_train] similarities.
KNN_CHUNK = 1024


def extract_features(
    encode_fn: Callable[[jax.Array], jax.Array], dataset: data_lib.Dataset, *, batch_size: int
) -> LabelledFeatures:
    """``encode_fn(images uint8 [b, h, w, c]) -> [b, d]`` over a whole split, in order."""
    features = []
    for batch in data_lib.eval_batches(dataset, batch_size=batch_size):
        out = np.asarray(encode_fn(batch["image"]), np.float32)
        features.append(out[batch["mask"]])
    return LabelledFeatures(np.concatenate(features), dataset.labels, dataset.num_classes)


def knn_accuracy(
    train: LabelledFeatures, test: LabelledFeatures, *, k: int = 20, temperature: float = 0.07
) -> float:
    """Top-1 accuracy of the weighted cosine k-NN classifier of DINO (Wu et al., 2018).

    Each test point votes with its k most cosine-similar training points, weighted by
    ``exp(similarity / temperature)``.
    """
    if len(train.features) < k:
        raise ValueError(f"k-NN needs at least k = {k} training points, got {len(train.features)}.")
    train_unit = l2_normalize(jnp.asarray(train.features))
    train_onehot = jax.nn.one_hot(jnp.asarray(train.labels), train.num_classes)

    @jax.jit
    def predict(queries):
        sims, idx = jax.lax.top_k(l2_normalize(queries) @ train_unit.T, k)
        weights = jnp.exp(sims / temperature)
        votes = jnp.einsum("bk,bkc->bc", weights, train_onehot[idx])
        return jnp.argmax(votes, axis=-1)

    correct = 0
    for start in range(0, len(test.features), KNN_CHUNK):
        chunk = test.features[start : start + KNN_CHUNK]
        pred = predict(jnp.asarray(_pad(chunk, KNN_CHUNK)))[: len(chunk)]
        correct += int(np.sum(np.asarray(pred) == test.labels[start : start + KNN_CHUNK]))
    return correct / len(test.features)


def linear_probe_accuracy(
    train: LabelledFeatures, test: LabelledFeatures, settings=ProbeSettings(), *, seed: int = 0
) -> float:
    """Top-1 test accuracy of a softmax-regression probe trained on frozen features.

    Features are standardised with the training statistics; the probe is trained with AdamW
    and a cosine learning-rate schedule on shuffled minibatches.
    """
    mean = train.features.mean(axis=0)
    std = train.features.std(axis=0) + 1e-6
    x_train = jnp.asarray((train.features - mean) / std)
    x_test = jnp.asarray((test.features - mean) / std)
    y_train = jnp.asarray(train.labels)
    n, d = x_train.shape
    batch_size = min(settings.batch_size, n)
    steps_per_epoch = n // batch_size
    schedule = optax.cosine_decay_schedule(
        settings.learning_rate, settings.epochs * steps_per_epoch
    )
    optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
    c = train.num_classes
    params = {"w": jnp.zeros((d, c)), "b": jnp.zeros((c,))}
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        logits = x @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(params, opt_state, key):
        order = jax.random.permutation(key, n)[: steps_per_epoch * batch_size]

        def step(carry, idx):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        batches = order.reshape(steps_per_epoch, batch_size)
        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state

    key = jax.random.key(seed)
    for e in range(settings.epochs):
        params, opt_state = epoch(params, opt_state, jax.random.fold_in(key, e))
    pred = jnp.argmax(x_test @ params["w"] + params["b"], axis=-1)
    return float(jnp.mean(pred == jnp.asarray(test.labels)))


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the first axis to ``size`` so that every chunk has one compiled shape."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])
