"""Evaluating encoders: the evaluators run during and after training, ``--mode=evaluate`` on
a workdir, and :func:`load_encoder`, a trained run as a frozen feature extractor.

The algorithms (weighted k-NN, linear probe) live in ``matching_gap.evaluators`` and take
features; this module turns a parameter tree and a labelled split into those features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from matching_gap import augment, checkpointing, data, errors, evaluators, metrics
from matching_gap import sharding as sharding_lib


def make_encode(config, graphdef) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``encode(params, images) -> features``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder."""
    aug_config = augment.AugmentConfig.from_config(config.augment)

    @jax.jit
    def encode(params, images):
        model = nnx.merge(graphdef, params)
        return model.encode(augment.center_view(images, aug_config), config.eval.features)

    return encode


class Evaluator:
    """``evaluator(params, probe=...) -> {"eval/knn_top1": ..., "eval/linear_probe_top1": ...}``.

    The labelled splits (``data.eval_train_split`` to fit on, ``data.eval_split`` to report
    on, each limited to ``data.eval_max_examples``) are loaded on first use and kept.
    """

    def __init__(self, config, graphdef):
        self._config = config
        self._encode = make_encode(config, graphdef)
        self._splits = None

    def splits(self) -> tuple[data.Dataset, data.Dataset]:
        if self._splits is None:
            c = self._config.data
            data_config = data.DataConfig.from_config(c)
            fit = data.load_split(data_config, c.eval_train_split, c.eval_max_examples)
            report = data.load_split(data_config, c.eval_split, c.eval_max_examples)
            if fit.num_classes != report.num_classes:
                raise errors.DataError(
                    f"The evaluation splits {c.eval_train_split!r} and {c.eval_split!r} have "
                    f"{fit.num_classes} and {report.num_classes} classes; they need the same "
                    "classes (an image folder needs the same class sub-folders in every split)."
                )
            self._splits = fit, report
        return self._splits

    def __call__(self, params, *, probe: bool) -> dict:
        e = self._config.eval
        train_set, test_set = self.splits()
        encode_fn = lambda images: self._encode(params, images)
        fit = evaluators.extract_features(encode_fn, train_set, batch_size=e.batch_size)
        report = evaluators.extract_features(encode_fn, test_set, batch_size=e.batch_size)
        knn_n = e.knn_train_examples or len(fit.labels)
        knn_fit = fit._replace(features=fit.features[:knn_n], labels=fit.labels[:knn_n])
        out = {"eval/knn_top1": evaluators.knn_accuracy(knn_fit, report, k=e.knn_k,
                                                        temperature=e.knn_temperature)}  # fmt: skip
        if probe:
            settings = evaluators.ProbeSettings(e.probe_epochs, e.probe_batch_size, e.probe_lr,
                                                e.probe_weight_decay)  # fmt: skip
            out["eval/linear_probe_top1"] = evaluators.linear_probe_accuracy(
                fit, report, settings, seed=self._config.seed
            )
        return out


def print_summary(results: dict) -> None:
    lines = ["", "Linear probe and k-NN top-1 on the evaluation split:"]
    for kind in ("linear_probe_top1", "knn_top1"):
        trained = results.get(f"eval/{kind}")
        random_init = results.get(f"eval/random_init_{kind}")
        if trained is None:
            continue
        line = f"  {kind:<18} trained {100 * trained:6.2f}%"
        if random_init is not None:
            line += f" | random init {100 * random_init:6.2f}%"
        lines.append(line)
    metrics.log("\n".join(lines))


def encoder_params(config, state) -> Any:
    """The evaluated encoder: the EMA teacher when there is one (as DINO), else the student."""
    return state.teacher if config.teacher.ema else state.params


def restore_encoder(config, workdir: str) -> tuple[Any, Any, int]:
    """``(graphdef, params, step)``: the evaluated encoder of the newest checkpoint of
    ``workdir`` (the EMA teacher's when the run had one), restored without training."""
    from matching_gap import train

    mesh = sharding_lib.make_mesh()
    optimizer, _ = train.make_optimizer(config, 2, 1)
    graphdef, abstract, _ = train.abstract_train_state(config, optimizer, mesh)
    if not checkpointing.has_checkpoints(workdir):
        raise errors.WorkdirError(f"No checkpoint in {workdir}/checkpoints: train there first, "
                                  "or point --workdir at a training run.")  # fmt: skip
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    state = ckpt.restore_latest(abstract)
    ckpt.close()
    return graphdef, encoder_params(config, state), int(state.step)


def evaluate_workdir(config, workdir: str) -> dict:
    """Runs the final evaluators on the newest checkpoint of ``workdir`` (no training)."""
    graphdef, params, step = restore_encoder(config, workdir)
    results = Evaluator(config, graphdef)(params, probe=True)
    writer = metrics.create_writer(workdir)
    writer.write_scalars(step, results)
    writer.close()
    print_summary(results)
    return results


def load_encoder(workdir: str) -> tuple[Callable[[Any], jax.Array], ml_collections.ConfigDict]:
    """The newest checkpoint of a training run as a frozen feature extractor.

    Reads the config the run saved (``<workdir>/config.json``), restores the newest
    checkpoint and returns ``(encode, config)``. ``encode(images)`` maps images
    ``[N, H, W, C]`` (uint8, or floats in [0, 1]) of the stored size
    ``config.data.image_size`` to features ``[N, D]``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder (the EMA teacher's when the
    run had one), as the k-NN and linear-probe evaluators see them. A run trained with
    ``model.attention='cudnn'`` is read with XLA's attention on a machine without a GPU.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise errors.WorkdirError(
            f"{path} not found: is {workdir} the --workdir of a training run?"
        )
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        config.model.attention = "xla"  # the same function of the same parameters
    graphdef, params, _ = restore_encoder(config, workdir)
    size, channels = config.data.image_size, config.data.channels
    _encode = make_encode(config, graphdef)

    def encode(images) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise ValueError(f"encode expects images [N, {size}, {size}, {channels}] (the size "
                             f"the model was trained on), got {images.shape}.")  # fmt: skip
        return _encode(params, images)

    return encode, config
