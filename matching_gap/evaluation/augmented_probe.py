"""The ``augmented`` linear-probe protocol of DINO, MoCo v3 and MAE, resumable.

Every epoch streams random-resized-crop + flip views of the whole labelled training split
through the frozen encoder and trains linear heads on the features: SGD with momentum 0.9,
a cosine schedule to 0, weight decay 0 by default, learning rate ``base * batch / 256``,
one head per base learning rate, all in the same pass (the encoder runs once per view).
Each head starts as DINO's ``LinearClassifier`` (weights N(0, 0.01^2), zero bias).
MAE's BatchNorm without affine parameters before the head is an option.

Reported: ``top1``, the best head on the evaluation split after the final epoch (the summary
lists every head). DINO trains one head at one rate and scores it after every ``val_freq``-th
epoch, reporting the best epoch (``best_acc``): with ``eval.augmented_val_freq`` > 0 the heads
are scored after the same epochs (:func:`validated_epochs`) and ``top1_best_epoch`` is the
best of those, which with one learning rate is DINO's figure.

The heads, their optimiser, the BatchNorm statistics and the step are checkpointed in
``<workdir>/linear_eval/checkpoints`` (the scores after validated epochs in
``validation.json`` beside them): a run stopped by preemption (SIGTERM), by
``eval.augmented_run_steps`` or by a crash resumes where its last checkpoint was, and
since the batches and views are functions of ``(seed, step)`` it ends with the same heads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from matching_gap import augment, checkpointing, data, errors, metrics, schema, storage
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation.encoder import evaluated_graphdef
from matching_gap.evaluation.features import Features, SplitFeatures
from matching_gap.evaluation.linear_probe import head_correct, head_loss

BATCHNORM_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6)
BATCHNORM_MOMENTUM = 0.1  # PyTorch's default: running = 0.9 running + 0.1 batch
SGD_MOMENTUM = 0.9
HEAD_INIT_STD = 0.01  # DINO's LinearClassifier: weight.normal_(mean=0, std=0.01), bias.zero_()
PROBE_DIR = "linear_eval"  # the pretraining dataset's augmented probe, in the workdir
VALIDATION_FILE = "validation.json"  # {epoch: every head's top-1 after it}, in the probe's folder


@dataclasses.dataclass(frozen=True)
class AugmentedSettings:
    """The ``eval.augmented_*`` fields of a config (``schema.EvalConfig``), by their names here."""

    epochs: int
    batch_size: int
    learning_rates: tuple[float, ...]  # x batch / 256
    weight_decay: float
    batchnorm: bool
    crop_scale: tuple[float, float]  # DINO's RandomResizedCrop: (0.08, 1)
    checkpoint_every: int
    run_steps: int  # > 0: stop (with a checkpoint) after this many steps in this call
    val_freq: int  # > 0: score the heads after DINO's validated epochs (validated_epochs)

    @classmethod
    def from_eval(cls, e: schema.EvalConfig) -> AugmentedSettings:
        return cls(**{f.name: getattr(e, f"augmented_{f.name}") for f in dataclasses.fields(cls)})

    def resumable_fields(self) -> dict:
        """What a checkpoint's heads depend on (``checkpoint_every`` and ``run_steps`` do not)."""
        out = dataclasses.asdict(self)
        del out["checkpoint_every"], out["run_steps"]
        return out


def run(
    config,
    graphdef,
    params,
    test: Features,
    workdir: str,
    *,
    folder: str = PROBE_DIR,
) -> dict:
    """Trains the heads (resuming from ``<workdir>/<folder>``: one folder per evaluated
    dataset) and, when done, scores them on ``test`` (centre-crop features of the
    evaluation split).

    Returns a summary: ``finished``, ``step``, ``num_steps`` and, when finished, ``top1``
    (the best head after the final epoch), its ``learning_rate`` and ``heads`` (every head's
    top-1); with ``eval.augmented_val_freq``, also ``top1_best_epoch`` (:func:`best_epoch`),
    its ``best_epoch`` and ``learning_rate_best_epoch``, each head's best, and
    ``validation`` (every head's top-1 after each validated epoch).
    """
    settings = AugmentedSettings.from_eval(config.eval)
    mesh = test.mesh
    directory = storage.path(workdir, folder)
    data_config = dataclasses.replace(
        config.data,
        train_split=config.data.eval_train_split,
        max_examples=0,
    )
    dataset, num_examples = data.training_split(data_config)
    steps_per_epoch = num_examples // settings.batch_size
    if steps_per_epoch == 0:
        raise errors.DataError(
            f"the augmented probe's batch ({settings.batch_size}) exceeds the "
            f"{num_examples} training images; lower "
            "eval.augmented_batch_size"
        )
    num_steps = settings.epochs * steps_per_epoch
    _check_settings(directory, settings, config)
    ckpt = checkpointing.Checkpointer(directory, every=settings.checkpoint_every, keep=2)
    dim = test.features.shape[-1]
    fresh = jax.jit(
        lambda key: _init_state(len(settings.learning_rates), dim, test.num_classes, key),
        out_shardings=sharding_lib.replicated(mesh),
    )
    abstract = jax.eval_shape(fresh, init_key(config.seed))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_lib.replicated(mesh)),
        abstract,
    )
    state = ckpt.restore_latest(abstract)
    state = fresh(init_key(config.seed)) if state is None else state
    start = int(state["step"])
    validated = validated_epochs(settings.epochs, settings.val_freq)
    history = _read_validation(directory, start // steps_per_epoch, validated)
    step_fn = _make_step(config, graphdef, settings, num_steps, mesh)
    batches = data.train_iterator(
        data_config,
        dataset,
        batch_size=settings.batch_size,
        seed=config.seed,
        start_step=start,
        augment=probe_view_config(config, settings),
    )
    metrics.log(
        f"Augmented linear probe: {len(settings.learning_rates)} heads, "
        f"{settings.epochs} epochs of {steps_per_epoch} steps (batch "
        f"{settings.batch_size}, {num_examples} images), from step {start}."
    )
    tic, losses = time.time(), []
    with checkpointing.preemption_notice() as preempted:
        for step in range(start + 1, num_steps + 1):
            batch = next(batches)
            images = sharding_lib.model_inputs(batch, mesh)
            labels = sharding_lib.global_batch(batch["label"], mesh)
            state, loss = step_fn(state, params, images, labels)
            losses.append(loss)
            stop = step == num_steps or step - start == settings.run_steps or preempted(step)
            if step % steps_per_epoch == 0 or stop:
                mean_loss = float(np.mean(jax.device_get(losses)))
                losses = []
                rate = (step - start) * settings.batch_size / (time.time() - tic)
                metrics.log(
                    f"probe step {step}/{num_steps} (epoch {step / steps_per_epoch:.2f}) "
                    f"| mean loss per head {mean_loss:.4f} | {rate:.0f} images/s"
                )
                if not np.isfinite(mean_loss):
                    raise errors.UserError(
                        "The augmented probe's loss is not finite: lower "
                        "eval.augmented_learning_rates (or set eval.augmented_batchnorm=True); "
                        f"its last good checkpoint in {directory} is kept."
                    )
            if step % steps_per_epoch == 0 and step // steps_per_epoch in validated:
                top1 = _heads_top1(state, test, settings.batchnorm, dim)
                history[step // steps_per_epoch] = top1.tolist()
                _write_validation(directory, history)
            if stop or ckpt.due(step):
                state = ckpt.save(step, state, force=stop)
            if stop:
                break
    ckpt.close()
    summary = {
        "finished": int(state["step"]) == num_steps,
        "step": int(state["step"]),
        "num_steps": num_steps,
        **settings.resumable_fields(),
    }
    if not summary["finished"]:
        metrics.log(
            f"The augmented probe stopped at step {summary['step']} of {num_steps} with "
            "a checkpoint; rerun the same command to resume."
        )
        return summary
    top1 = _heads_top1(state, test, settings.batchnorm, dim)
    best = int(np.argmax(top1))
    rates = [lr * settings.batch_size / 256 for lr in settings.learning_rates]
    summary.update(
        top1=float(top1[best]),
        learning_rate=rates[best],
        heads=[{"learning_rate": lr, "top1": float(t)} for lr, t in zip(rates, top1, strict=True)],
    )
    if validated:
        epoch, head, value = best_epoch(history)
        summary.update(
            top1_best_epoch=value, best_epoch=epoch, learning_rate_best_epoch=rates[head]
        )
        for h, row in enumerate(summary["heads"]):
            row["best_epoch"], _, row["top1_best_epoch"] = best_epoch(
                {e: [scores[h]] for e, scores in history.items()}
            )
        summary["validation"] = [{"epoch": e, "top1": history[e]} for e in validated]
    return summary


def validated_epochs(epochs: int, val_freq: int) -> list[int]:
    """The epochs, counted from 1, after which DINO's ``eval_linear.py`` scores its head: its
    0-based ``epoch`` with ``epoch % val_freq == 0 or epoch == epochs - 1`` (so the first, every
    ``val_freq``-th after it, and the last). None when ``val_freq`` is 0."""
    if not val_freq:
        return []
    return [e + 1 for e in range(epochs) if e % val_freq == 0 or e == epochs - 1]


def best_epoch(history: dict[int, list[float]]) -> tuple[int, int, float]:
    """``(epoch, head, top1)`` of the best score in ``history`` (epoch -> every head's top-1):
    DINO's ``best_acc = max(best_acc, acc1)`` over the validated epochs, here over the heads
    too; the earliest epoch (and head) that reached it."""
    best = None
    for epoch in sorted(history):
        for head, top1 in enumerate(history[epoch]):
            if best is None or top1 > best[2]:
                best = epoch, head, top1
    if best is None:
        raise ValueError("no score in the history")
    return best


def _heads_top1(state, test: Features, batchnorm: bool, dim: int) -> np.ndarray:
    """Every head's top-1 on ``test`` (the evaluation split's centre-crop features)."""
    mean, std = _normaliser(state, batchnorm, dim)
    correct = head_correct(
        state["heads"], test.features, test.labels, test.mask.astype(jnp.float32), mean, std
    )
    return np.asarray(correct) / test.num_examples


def _read_validation(directory, done: int, validated: list[int]) -> dict[int, list[float]]:
    """The scores after the validated epochs up to ``done`` of a resumed probe (a later one,
    from a run that went past its last checkpoint, is scored again)."""
    path = storage.path(directory, VALIDATION_FILE)
    history = {}
    if validated and path.exists():
        history = {int(e): v for e, v in json.loads(path.read_text()).items() if int(e) <= done}
    missing = [e for e in validated if e <= done and e not in history]
    if missing:
        raise errors.WorkdirError(
            f"{path} lacks the scores after epochs {missing} of the augmented probe resumed "
            f"from {directory}: delete that folder to start the probe again."
        )
    return history


def _write_validation(directory, history: dict[int, list[float]]) -> None:
    if jax.process_index() == 0:
        path = storage.path(directory, VALIDATION_FILE)
        storage.write_text(path, json.dumps({str(e): v for e, v in sorted(history.items())}))


class AugmentedProbeEvaluator:
    """The ``augmented`` probe (:func:`run`, resumable in ``workdir``):
    yields ``augmented_probe_top1`` once it has finished."""

    def __init__(
        self, config, features: SplitFeatures, graphdef, workdir: str, *, folder: str = PROBE_DIR
    ):
        self.config, self.features = config, features
        self._graphdef, self._workdir, self._folder = graphdef, workdir, folder
        self.summary = None

    def run(self, params):
        report = self.features.report(params)
        self.features.clear(fit_only=True)  # not needed here: freed before the long probe
        self.summary = run(
            self.config, self._graphdef, params, report, self._workdir, folder=self._folder
        )
        if self.summary["finished"]:
            yield "augmented_probe_top1", self.summary["top1"]
            if "top1_best_epoch" in self.summary:
                yield "augmented_probe_top1_best_epoch", self.summary["top1_best_epoch"]


def _check_settings(directory, settings: AugmentedSettings, config) -> None:
    """Refuses to resume heads trained with other settings (the probe's, and ``eval.dtype``
    the encoder ran in); records them for a fresh start."""
    path = storage.path(directory, "settings.json")
    wanted = json.loads(json.dumps({**settings.resumable_fields(), "dtype": config.eval.dtype}))
    if path.exists():
        # A folder written before eval.dtype and augmented_val_freq existed ran the encoder
        # in model.dtype and scored its heads after the final epoch only.
        saved = {"dtype": config.model.dtype, "val_freq": 0, **json.loads(path.read_text())}
        if saved != wanted and checkpointing.has_checkpoints(directory):
            changed = [
                f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in wanted.items() if saved.get(k) != v
            ]
            raise errors.WorkdirError(
                f"{directory} holds an augmented probe trained with other settings "
                f"({'; '.join(changed)}). Delete that folder to start again, or use the "
                "settings it was trained with to resume."
            )
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps(wanted, indent=2))


def init_key(seed: int) -> jax.Array:
    """The key the heads start from: step 0 of the probe's stream (its steps' views are
    ``fold_in(key(seed), step)`` from step 1), so a function of the run's seed only."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def _init_state(num_heads: int, dim: int, num_classes: int, key: jax.Array) -> dict:
    """Fresh heads as DINO's ``LinearClassifier`` starts (weights N(0, 0.01^2), each drawn,
    zero bias), a zero momentum, PyTorch's BatchNorm start and step 0."""
    heads = {
        "w": HEAD_INIT_STD * jax.random.normal(key, (num_heads, dim, num_classes), jnp.float32),
        "b": jnp.zeros((num_heads, num_classes)),
    }
    return {
        "heads": heads,
        "momentum": jax.tree.map(jnp.zeros_like, heads),
        "bn_mean": jnp.zeros(dim),
        "bn_var": jnp.ones(dim),
        "step": jnp.int32(0),
    }


def _normaliser(state, batchnorm: bool, dim: int):
    """``(mean, std)`` the heads see features through at evaluation."""
    if not batchnorm:
        return jnp.zeros(dim), jnp.ones(dim)
    return state["bn_mean"], jnp.sqrt(state["bn_var"] + BATCHNORM_EPS)


def probe_view_config(config, settings: AugmentedSettings) -> augment.AugmentConfig:
    """The probe's training view: one random-resized crop (``eval.augmented_crop_scale``) +
    flip of the run's size and normalisation, nothing else: DINO's linear-evaluation
    transform, but for its scale (DINO's: 0.08 to 1) and its resample (torchvision's
    bilinear; the project resamples every view bicubic)."""
    return dataclasses.replace(
        config.augment,
        num_views=1,
        num_local_crops=0,
        flip=True,
        crop_scale=settings.crop_scale,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
        view_blur_probs=(),
        view_solarize_probs=(),
    )


def _make_step(config, graphdef, settings: AugmentedSettings, num_steps: int, mesh) -> Any:
    aug = probe_view_config(config, settings)
    lrs = jnp.array(settings.learning_rates, jnp.float32) * settings.batch_size / 256
    key = jax.random.key(config.seed)
    features_kind = config.eval.features
    graphdef = evaluated_graphdef(config, graphdef)  # eval.dtype, as the test features

    def step_fn(state, params, images, labels):
        step = state["step"] + 1
        views, _ = augment.views_for(jax.random.fold_in(key, step), images, aug)
        model = nnx.merge(graphdef, params)
        x = jax.lax.stop_gradient(model.encode(views[0], features_kind))
        bn_mean, bn_var = state["bn_mean"], state["bn_var"]
        if settings.batchnorm:
            mean, var = jnp.mean(x, 0), jnp.var(x, 0)
            x = (x - mean) / jnp.sqrt(var + BATCHNORM_EPS)
            n = x.shape[0]
            bn_mean = (1 - BATCHNORM_MOMENTUM) * bn_mean + BATCHNORM_MOMENTUM * mean
            bn_var = (1 - BATCHNORM_MOMENTUM) * bn_var + BATCHNORM_MOMENTUM * var * n / (n - 1)
        heads = state["heads"]
        loss, grads = jax.value_and_grad(head_loss)(heads, x, labels)
        # PyTorch's SGD: buf = momentum * buf + (grad + wd * w); w -= lr * buf.
        grads = {"w": grads["w"] + settings.weight_decay * heads["w"], "b": grads["b"]}
        buf = jax.tree.map(lambda m, g: SGD_MOMENTUM * m + g, state["momentum"], grads)
        scale = lrs * 0.5 * (1 + jnp.cos(jnp.pi * (step - 1) / num_steps))
        heads = {
            "w": heads["w"] - scale[:, None, None] * buf["w"],
            "b": heads["b"] - scale[:, None] * buf["b"],
        }
        new = {"heads": heads, "momentum": buf, "bn_mean": bn_mean, "bn_var": bn_var, "step": step}
        return new, loss / lrs.shape[0]

    replicated = sharding_lib.replicated(mesh)
    return jax.jit(step_fn, out_shardings=(replicated, replicated), donate_argnums=0)
