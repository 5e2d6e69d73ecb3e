"""Evaluation of frozen features: weighted k-NN (as DINO) and a linear probe.

Both take features already computed (``[n, d]`` arrays with integer labels), so they can be
tested on hand-made data and reused on any encoder. :func:`extract_features` runs an
encoder over a :class:`~matching_gap.data.Dataset`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from matching_gap import data as data_lib


def extract_features(
    encode_fn: Callable[[jax.Array], jax.Array], dataset: data_lib.Dataset, *, batch_size: int
) -> np.ndarray:
    """``encode_fn(images uint8 [b, h, w, c]) -> [b, d]`` over a whole split, in order."""
    features = []
    for batch in data_lib.eval_batches(dataset, batch_size=batch_size):
        out = np.asarray(encode_fn(batch["image"]), np.float32)
        features.append(out[batch["mask"]])
    return np.concatenate(features)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of the weighted cosine k-NN classifier of DINO (Wu et al., 2018).

    Each test point votes with its k most cosine-similar training points, weighted by
    ``exp(similarity / temperature)``.
    """
    if len(train_features) < k:
        raise ValueError(f"k-NN needs at least k = {k} training points, got {len(train_features)}.")
    train = _normalize(jnp.asarray(train_features))
    train_onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes)

    @jax.jit
    def predict(test):
        sims, idx = jax.lax.top_k(_normalize(test) @ train.T, k)
        weights = jnp.exp(sims / temperature)
        votes = jnp.einsum("bk,bkc->bc", weights, train_onehot[idx])
        return jnp.argmax(votes, axis=-1)

    correct = 0
    for start in range(0, len(test_features), chunk_size):
        chunk = test_features[start : start + chunk_size]
        pred = predict(jnp.asarray(_pad(chunk, chunk_size)))[: len(chunk)]
        correct += int(np.sum(np.asarray(pred) == test_labels[start : start + chunk_size]))
    return correct / len(test_features)


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int = 30,
    batch_size: int = 1024,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of a softmax-regression probe trained on frozen features.

    Features are standardised with the training statistics; the probe is trained with AdamW
    and a cosine learning-rate schedule on shuffled minibatches.
    """
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + 1e-6
    x_train = jnp.asarray((train_features - mean) / std)
    x_test = jnp.asarray((test_features - mean) / std)
    y_train = jnp.asarray(train_labels)
    n, d = x_train.shape
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
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
    for e in range(epochs):
        params, opt_state = epoch(params, opt_state, jax.random.fold_in(key, e))
    pred = jnp.argmax(x_test @ params["w"] + params["b"], axis=-1)
    return float(jnp.mean(pred == jnp.asarray(test_labels)))


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the first axis to ``size`` so that every chunk has one compiled shape."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])
