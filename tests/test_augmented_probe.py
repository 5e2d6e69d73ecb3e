"""The ``augmented`` probe's step learns as its references say: each head's update is
``optax.sgd(momentum=0.9)`` with PyTorch's weight decay and a cosine schedule, the BatchNorm
is MAE's ``BatchNorm1d(affine=False, eps=1e-6)``, and the heads learn a separable task."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from matching_gap import augment, config_lib, schema
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib
from matching_gap.evaluation import augmented_probe
from matching_gap.evaluation import linear_probe as probe_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")
NUM_STEPS, BATCH, CLASSES = 10, 16, 3


@pytest.fixture(scope="module")
def setup():
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py"), "smoke")
    config.eval.features = "pooled"
    config = schema.parse(config)
    mesh = sharding_lib.make_mesh(jax.devices()[:1])
    graphdef, state = state_lib.create_train_state(config, optax.identity())
    return config, mesh, graphdef, state.params


def _settings(**kw):
    defaults = augmented_probe.AugmentedSettings.from_eval(schema.EvalConfig())
    return dataclasses.replace(
        defaults, batch_size=BATCH, learning_rates=(0.5, 2.0), weight_decay=1e-2, **kw
    )


def _features(config, graphdef, params, settings, images, step):
    """The features the step trains on at ``step`` (its views, by the same key)."""
    aug = augmented_probe.probe_view_config(config, settings)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    views, _ = augment.make_views(key, images, aug)
    return nnx.merge(graphdef, params).encode(views[0], config.eval.features)


def _random_state(settings, dim, seed=0):
    key = augmented_probe.init_key(0)
    state = augmented_probe._init_state(len(settings.learning_rates), dim, CLASSES, key)
    rng = np.random.default_rng(seed)
    state["heads"] = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), state["heads"]
    )
    return state


def _batches(config, count, seed=1):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    images = rng.integers(0, 256, (count, BATCH, size, size, 1), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, (count, BATCH)).astype(np.int32)
    return images, labels


def test_the_heads_start_as_dinos_linear_classifier():
    """DINO's ``LinearClassifier``: ``weight.data.normal_(mean=0.0, std=0.01)``,
    ``bias.data.zero_()``, here from the run's seed. Catches: heads that start at zero (as they
    did), from a truncated normal (``truncated_normal(0.01)`` cuts at 2 sigma: std 0.0088, no
    tails), or from a key that is not the run's seed."""
    from scipy import stats

    heads, dim, classes = 4, 96, 100  # 38,400 weights
    state = augmented_probe._init_state(heads, dim, classes, augmented_probe.init_key(0))
    w, b = np.asarray(state["heads"]["w"]), np.asarray(state["heads"]["b"])
    # DINO's rule transcribed: as many draws of N(0, 0.01^2) (torch's normal_), a zero bias.
    dino_w = np.random.default_rng(0).normal(0.0, 0.01, size=w.size)
    assert stats.ks_2samp(w.ravel(), dino_w).pvalue > 1e-3
    np.testing.assert_allclose(w.std(), dino_w.std(), rtol=0.03)
    assert 0.035 < np.mean(np.abs(w) > 0.02) < 0.056  # a normal's two-sigma tails: 4.55%
    np.testing.assert_array_equal(b, np.zeros((heads, classes)))
    again = augmented_probe._init_state(heads, dim, classes, augmented_probe.init_key(0))
    other = augmented_probe._init_state(heads, dim, classes, augmented_probe.init_key(1))
    np.testing.assert_array_equal(np.asarray(again["heads"]["w"]), w)
    assert not np.allclose(np.asarray(other["heads"]["w"]), w)


def dino_best_acc(acc1, epochs, val_freq):
    """DINO's eval_linear.py, its loop transcribed: ``acc1[epoch]`` is the head's validation
    accuracy after training epoch ``epoch`` (counted from 0)."""
    best_acc = 0.0
    for epoch in range(0, epochs):
        # train(...); scheduler.step()
        if epoch % val_freq == 0 or epoch == epochs - 1:
            best_acc = max(best_acc, acc1[epoch])
    return best_acc


@pytest.mark.parametrize("epochs", [1, 2, 5, 7, 10])
@pytest.mark.parametrize("val_freq", [1, 2, 3, 4, 10])
def test_the_best_epoch_is_dinos_best_acc(epochs, val_freq):
    """DINO scores its head after epochs 0, val_freq, 2 val_freq, ... and the last (from 0)
    and reports the best. Catches: scoring epochs DINO skips (a peak it never sees), missing
    the last epoch, counting epochs from 1 in DINO's rule, or reporting the final epoch."""
    rng = np.random.default_rng(epochs * 100 + val_freq)
    for trial in range(20):
        acc1 = rng.uniform(0.0, 1.0, epochs)
        if trial == 0 and epochs > 2:
            acc1[1] = 2.0  # a peak after epoch 1 (from 0): DINO sees it only with val_freq 1
        validated = augmented_probe.validated_epochs(epochs, val_freq)
        history = {e: [acc1[e - 1]] for e in validated}  # epochs counted from 1 here
        epoch, head, top1 = augmented_probe.best_epoch(history)
        assert top1 == dino_best_acc(acc1, epochs, val_freq)
        assert head == 0 and acc1[epoch - 1] == top1 and epoch in validated
    assert augmented_probe.validated_epochs(epochs, 0) == []  # the final epoch's figure only


def test_the_best_epoch_is_the_best_over_heads_and_the_first_to_reach_it():
    history = {1: [0.2, 0.5], 3: [0.7, 0.6], 5: [0.4, 0.7]}
    assert augmented_probe.best_epoch(history) == (3, 0, 0.7)
    with pytest.raises(ValueError, match="no score"):
        augmented_probe.best_epoch({})


def test_two_steps_equal_optax_sgd_with_momentum_per_head(setup):
    config, mesh, graphdef, params = setup
    settings = _settings()
    step_fn = augmented_probe._make_step(config, graphdef, settings, NUM_STEPS, mesh)
    images, labels = _batches(config, 2)
    dim = config.model.width
    state = _random_state(settings, dim)
    start = jax.tree.map(np.asarray, state["heads"])
    for t in range(2):
        state, _ = step_fn(state, params, jnp.asarray(images[t]), jnp.asarray(labels[t]))

    for h, base_lr in enumerate(settings.learning_rates):
        lr = optax.cosine_decay_schedule(base_lr * BATCH / 256, NUM_STEPS)
        mask = {"w": True, "b": False}  # PyTorch's weight decay on the weights only
        tx = optax.chain(
            optax.add_decayed_weights(settings.weight_decay, mask), optax.sgd(lr, momentum=0.9)
        )
        head = {"w": start["w"][h], "b": start["b"][h]}
        opt_state = tx.init(head)
        for t in range(2):
            x = _features(config, graphdef, params, settings, jnp.asarray(images[t]), t + 1)

            def loss(p, x=x, t=t):
                logits = x @ p["w"] + p["b"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels[t]).mean()

            updates, opt_state = tx.update(jax.grad(loss)(head), opt_state, head)
            head = optax.apply_updates(head, updates)
        np.testing.assert_allclose(state["heads"]["w"][h], head["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["heads"]["b"][h], head["b"], rtol=1e-5, atol=1e-6)


def test_the_step_encodes_in_eval_dtype_whatever_the_model_trained_in(setup):
    """DINO's eval_linear.py trains its head on float32 features of the frozen encoder.
    Catches: the probe's forward pass in the model's compute dtype (bfloat16): one step from
    a bfloat16-trained config equals the float32 model's step, and differs in bfloat16."""
    config, mesh, graphdef, params = setup
    settings = _settings()
    images, labels = _batches(config, 1)

    def one_step(cfg):
        graph = nnx.graphdef(nnx.eval_shape(lambda: state_lib.create_model(cfg)))
        step_fn = augmented_probe._make_step(cfg, graph, settings, NUM_STEPS, mesh)
        state = _random_state(settings, config.model.width)  # donated: a fresh one each
        state, loss = step_fn(state, params, jnp.asarray(images[0]), jnp.asarray(labels[0]))
        return np.asarray(state["heads"]["w"]), float(loss)

    want = one_step(config)
    bf16 = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16"))
    assert bf16.eval.dtype == "float32"
    got = one_step(bf16)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    low = one_step(dataclasses.replace(bf16, eval=dataclasses.replace(bf16.eval, dtype="bfloat16")))
    assert not np.allclose(low[0], want[0], rtol=1e-4, atol=1e-6)


def test_batchnorm_is_maes_batchnorm1d(setup):
    config, mesh, graphdef, params = setup
    settings = _settings(batchnorm=True)
    step_fn = augmented_probe._make_step(config, graphdef, settings, NUM_STEPS, mesh)
    images, labels = _batches(config, 2)
    dim = config.model.width
    state = _random_state(settings, dim)
    running_mean, running_var = np.zeros(dim), np.ones(dim)
    for t in range(2):
        heads = jax.tree.map(np.asarray, state["heads"])
        state, loss = step_fn(state, params, jnp.asarray(images[t]), jnp.asarray(labels[t]))
        x = np.asarray(
            _features(config, graphdef, params, settings, jnp.asarray(images[t]), t + 1),
            np.float64,
        )
        # torch.nn.BatchNorm1d(affine=False, eps=1e-6), training mode, momentum 0.1: the
        # batch is normalised by its biased variance, the running variance is unbiased.
        mean, var = x.mean(0), x.var(0)
        normed = (x - mean) / np.sqrt(var + 1e-6)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * x.var(0, ddof=1)
        logits = np.einsum("bd,hdc->hbc", normed, heads["w"]) + heads["b"][:, None]
        expected = np.mean(
            [optax.softmax_cross_entropy_with_integer_labels(z, labels[t]).mean() for z in logits]
        )
        np.testing.assert_allclose(loss, expected, rtol=1e-4)
    np.testing.assert_allclose(state["bn_mean"], running_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["bn_var"], running_var, rtol=1e-4, atol=1e-6)


def test_the_heads_learn_a_separable_task(setup):
    config, mesh, graphdef, params = setup
    # Dark and bright images: their classes survive any crop and flip.
    settings = dataclasses.replace(
        _settings(batchnorm=True), learning_rates=(1.0, 4.0), weight_decay=0.0
    )
    steps, classes = 30, 2
    step_fn = augmented_probe._make_step(config, graphdef, settings, steps, mesh)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    labels = np.arange(BATCH, dtype=np.int32) % classes
    levels = np.array([30, 225])[labels]
    noise = rng.integers(-20, 21, (BATCH, size, size, 1))
    images = np.clip(levels[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    state = augmented_probe._init_state(
        len(settings.learning_rates), config.model.width, classes, augmented_probe.init_key(0)
    )
    losses = []
    for _ in range(steps):
        state, loss = step_fn(state, params, jnp.asarray(images), jnp.asarray(labels))
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], losses
    aug = schema.parse(config).augment
    x = nnx.merge(graphdef, params).encode(augment.center_view(jnp.asarray(images), aug), "pooled")
    mean, std = augmented_probe._normaliser(state, True, x.shape[-1])
    correct = probe_lib.head_correct(
        state["heads"], x[None], jnp.asarray(labels)[None], jnp.ones((1, BATCH)), mean, std
    )
    assert np.all(np.asarray(correct) == BATCH), correct
