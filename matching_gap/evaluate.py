"""Evaluating encoders: the quick monitor run during and after training, the whole-split
protocols of ``--mode=evaluate``, :func:`load_encoder`, a trained run as a frozen feature
extractor, and :func:`export_workdir` (``--mode=export``), a trained run as timm or Hugging
Face files.

The algorithms live in ``matching_gap.evaluators`` (extraction, k-NN, the ``features``
linear probe) and ``matching_gap.augmented_probe`` (the ``augmented`` linear probe); this
module turns a parameter tree and the configured labelled splits into their results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from matching_gap import (
    augment,
    augmented_probe,
    checkpointing,
    config_lib,
    data,
    errors,
    evaluators,
    export,
    metrics,
    models,
    state,
    storage,
)
from matching_gap import sharding as sharding_lib

SUMMARY_FILE = "evaluation.json"


def make_encode(config, graphdef, mesh=None, *,
                raw_pixels: bool = False) -> Callable[[Any, jax.Array], jax.Array]:  # fmt: skip
    """Jitted ``encode(params, images) -> features``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder; with ``raw_pixels``, the
    view's pixels flattened (``params`` unused: the bar a learned encoder should clear).
    With a ``mesh``, the features stay split over the devices like the images."""
    aug_config = augment.AugmentConfig.from_config(config.augment)

    def encode(params, images):
        view = augment.center_view(images, aug_config)
        if raw_pixels:
            return view.reshape(view.shape[0], -1)
        model = nnx.merge(graphdef, params)
        return model.encode(view, config.eval.features)

    if mesh is None:
        return jax.jit(encode)
    return jax.jit(encode, out_shardings=sharding_lib.batch_sharding(mesh))


def probe_settings(config) -> evaluators.ProbeSettings:
    e = config.eval
    return evaluators.ProbeSettings(
        e.probe_epochs,
        e.probe_batch_size,
        tuple(float(x) for x in e.probe_learning_rates),
        tuple(float(x) for x in e.probe_weight_decays),
        float(e.probe_holdout),
    )


class Evaluator:
    """Features of the labelled splits and the k-NN / ``features`` probe on them.

    ``data.eval_train_split`` is fitted on and ``data.eval_split`` reported on, each limited
    to ``data.eval_max_examples`` (the quick monitor) unless ``whole_splits``. In-memory
    sources are loaded once and kept; streamed ones are read again at each evaluation.
    ``raw_pixels``: evaluate the flattened evaluation view instead of an encoder.
    """

    def __init__(self, config, graphdef, mesh, *, whole_splits: bool = False,
                 raw_pixels: bool = False):  # fmt: skip
        self._config = config
        self._mesh = mesh
        self._encode = make_encode(config, graphdef, mesh, raw_pixels=raw_pixels)
        self._max_examples = 0 if whole_splits else config.data.eval_max_examples
        self._splits = None

    def splits(self) -> tuple[data.EvalSplit, data.EvalSplit]:
        """The two splits (missing or inconsistent data fails here)."""
        if self._splits is None:
            c = self._config.data
            data_config = data.DataConfig.from_config(c)
            fit, report = (
                data.eval_split(
                    data_config,
                    split,
                    batch_size=self._config.eval.batch_size,
                    max_examples=self._max_examples,
                )
                for split in (c.eval_train_split, c.eval_split)
            )
            if fit.num_classes != report.num_classes:
                raise errors.DataError(
                    f"The evaluation splits {c.eval_train_split!r} and {c.eval_split!r} have "
                    f"{fit.num_classes} and {report.num_classes} classes; they need the same "
                    "classes (an image folder needs the same class sub-folders in every split)."
                )
            self._splits = fit, report
        return self._splits

    def extract(self, split: data.EvalSplit, params) -> evaluators.Features:
        encode = lambda images: self._encode(params, images)
        return evaluators.extract(encode, split.batches(), num_batches=split.num_batches,
                                  num_classes=split.num_classes, mesh=self._mesh)  # fmt: skip

    def features(self, params) -> tuple[evaluators.Features, evaluators.Features]:
        """The features of both splits."""
        fit, report = self.splits()
        return self.extract(fit, params), self.extract(report, params)

    def __call__(self, params, *, probe: bool) -> dict:
        """``{"eval/knn_top1": ...}`` and, with ``probe``, ``"eval/linear_probe_top1"``
        (absent when the split is too small for the probe)."""
        fit, report = self.features(params)
        out = {"eval/knn_top1": knn(fit, report, self._config)[0]}
        result = linear_probe(fit, report, self._config) if probe else None
        if result is not None:
            out["eval/linear_probe_top1"] = result.top1
        return out


def knn(fit, report, config) -> tuple[float, int]:
    """``(top-1, k)``: the weighted k-NN with ``eval.knn_k`` neighbours, or every training
    example when there are fewer (said in one line)."""
    e = config.eval
    k = min(e.knn_k, fit.num_examples)
    if k < e.knn_k:
        metrics.log(f"k-NN: {fit.num_examples} training examples, fewer than eval.knn_k = "
                    f"{e.knn_k}; voting with all {k}.")  # fmt: skip
    return evaluators.knn_accuracy(fit, report, k=k, temperature=e.knn_temperature), k


def linear_probe(fit, report, config) -> evaluators.ProbeResult | None:
    """The ``features`` probe, or None (said in one line) for a split too small for it."""
    try:
        return evaluators.linear_probe(fit, report, probe_settings(config), seed=config.seed)
    except evaluators.TooFewExamplesError as e:
        metrics.log(f"Linear probe skipped: {e}.")
        return None


def print_summary(results: dict) -> None:
    lines = ["", "Linear probe and k-NN top-1 on the evaluation split:"]
    for kind in ("linear_probe_top1", "knn_top1", "augmented_probe_top1"):
        trained = results.get(f"eval/{kind}")
        random_init = results.get(f"eval/random_init_{kind}")
        raw_pixels = results.get(f"eval/raw_pixels_{kind}")
        if trained is None:
            continue
        line = f"  {kind:<20} trained {100 * trained:6.2f}%"
        if random_init is not None:
            line += f" | random init {100 * random_init:6.2f}%"
        if raw_pixels is not None:
            line += f" | raw pixels {100 * raw_pixels:6.2f}%"
        lines.append(line)
    metrics.log("\n".join(lines))


def evaluate_workdir(config, workdir: str) -> dict:
    """``--mode=evaluate``: the protocols of ``eval.protocols`` on the whole evaluation
    splits, for the newest checkpoint of ``workdir`` (no training).

    The figures go to ``metrics.jsonl`` (at the checkpoint's step) and, with each protocol's
    settings, to ``<workdir>/evaluation.json`` (entries of earlier calls for other protocols
    are kept). Returns that summary.
    """
    protocols = config_lib.parse_protocols(config.eval.protocols)
    mesh = sharding_lib.make_mesh()
    graphdef, params, step = state.restore_encoder(config, workdir, mesh)
    evaluator = Evaluator(config, graphdef, mesh, whole_splits=True)
    fit_split, report_split = evaluator.splits()
    metrics.log(
        f"Evaluating the checkpoint at step {step} ({config.eval.features} features): "
        f"{', '.join(protocols)} on {fit_split.num_examples} training and "
        f"{report_split.num_examples} evaluation images."
    )
    report = evaluator.extract(report_split, params)
    fit = evaluator.extract(fit_split, params) if {"knn", "features"} & set(protocols) else None
    e = config.eval
    results, entries = {}, {}
    common = {
        "step": step,
        "features": e.features,
        "train_examples": fit_split.num_examples,
        "eval_examples": report_split.num_examples,
    }
    if "knn" in protocols:
        top1, k = knn(fit, report, config)
        results["eval/knn_top1"] = top1
        entries["knn"] = {**common, "k": k, "temperature": e.knn_temperature, "top1": top1}
    probe = linear_probe(fit, report, config) if "features" in protocols else None
    if probe is not None:
        settings = probe_settings(config)
        results["eval/linear_probe_top1"] = probe.top1
        entries["features"] = {
            **common,
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "holdout": settings.holdout,
            **probe._asdict(),
        }
    del fit
    if "augmented" in protocols:
        summary = augmented_probe.run(config, graphdef, params, report, workdir)
        if summary["finished"]:
            results["eval/augmented_probe_top1"] = summary["top1"]
        entries["augmented"] = {**common, **summary}
    if results:
        writer = metrics.create_writer(workdir)
        writer.write_scalars(step, results)
        writer.close()
    _write_summary(workdir, entries)
    print_summary(results)
    return entries


def export_workdir(config, workdir: str) -> list[str]:
    """``--mode=export``: the evaluated encoder of the newest checkpoint of ``workdir`` (the EMA
    teacher's when the run had one; with no checkpoint, ``model.init_from``'s) as
    ``export.format`` files in ``export.dir`` (``matching_gap.export``). Returns their paths.
    """
    settings = export.ExportConfig.from_config(config.export)
    model_config = models.ModelConfig.from_config(config.model)
    export.check_exportable(model_config, settings.format)  # before restoring anything
    if not settings.dir:
        raise errors.ConfigError("--mode=export writes into export.dir: set "
                                 "--config.export.dir=OUT.")  # fmt: skip
    checkpointing.check_workdir(workdir, config)
    _, params, step = state.restore_encoder(config, workdir)
    encoder = jax.device_get(params["encoder"])
    paths = []
    if jax.process_index() == 0:
        paths = export.write_encoder(encoder, model_config, settings.format, settings.dir,
                                     preprocessing=export.preprocessing(config))  # fmt: skip
        which = "EMA teacher" if config.teacher.ema else "encoder"
        metrics.log(f"Wrote the {which} of step {step} as {settings.format} files: "
                    f"{', '.join(paths)}.")  # fmt: skip
    return paths


def _write_summary(workdir: str, entries: dict) -> None:
    """Merges ``entries`` (protocol -> figures) into ``<workdir>/evaluation.json``."""
    if jax.process_index() != 0:
        return
    path = storage.path(workdir, SUMMARY_FILE)
    summary = {}
    if path.exists():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            path.replace(path.parent / f"{path.name}.unreadable")  # kept, not lost
    summary.update(entries)
    storage.write_text(path, json.dumps(summary, indent=2))
    metrics.log(f"Wrote {path}.")


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
    path = storage.path(workdir, "config.json")
    if not path.exists():
        raise errors.WorkdirError(
            f"{path} not found: is {workdir} the --workdir of a training run?"
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        config.model.attention = "xla"  # the same function of the same parameters
    graphdef, params, _ = state.restore_encoder(config, workdir)
    size, channels = config.data.image_size, config.data.channels
    _encode = make_encode(config, graphdef)

    def encode(images) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise ValueError(f"encode expects images [N, {size}, {size}, {channels}] (the size "
                             f"the model was trained on), got {images.shape}.")  # fmt: skip
        return _encode(params, images)

    return encode, config
