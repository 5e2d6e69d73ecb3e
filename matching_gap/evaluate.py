"""Evaluating encoders: the quick monitor run during and after training, the whole-split
protocols of ``--mode=evaluate``, :func:`load_encoder`, a trained run as a frozen feature
extractor, and :func:`export_workdir` (``--mode=export``), a trained run as timm or Hugging
Face files.

Both the monitor and ``--mode=evaluate`` compose the same small objects (as big_vision's
evaluators): a :class:`SplitFeatures` encodes the labelled splits once per parameters, and
each evaluator (:class:`KnnEvaluator`, :class:`LinearProbeEvaluator`,
:class:`AugmentedProbeEvaluator`) reads it in ``run(params)``, which yields ``(name,
value)`` pairs; :func:`run` gathers them under a prefix (``eval/``, ``eval/random_init_``,
``eval/raw_pixels_``). The algorithms live in ``matching_gap.evaluators`` (extraction,
k-NN, the ``features`` linear probe) and ``matching_gap.augmented_probe``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from matching_gap import (
    augment,
    augmented_probe,
    checkpointing,
    data,
    errors,
    evaluators,
    export,
    metrics,
    schema,
    state,
    storage,
)
from matching_gap import sharding as sharding_lib

SUMMARY_FILE = "evaluation.json"


def make_encode(
    config, graphdef, mesh=None, *, raw_pixels: bool = False
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``encode(params, images) -> features``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder; with ``raw_pixels``, the
    view's pixels flattened (``params`` unused: the bar a learned encoder should clear).
    With a ``mesh``, the features stay split over the devices like the images."""

    def encode(params, images):
        view = augment.center_view(images, config.augment)
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
        e.probe_learning_rates,
        e.probe_weight_decays,
        e.probe_holdout,
    )


class SplitFeatures:
    """The two labelled splits and their features, shared by the evaluators.

    ``data.eval_train_split`` is fitted on (:meth:`fit`) and ``data.eval_split`` reported on
    (:meth:`report`), each limited to ``data.eval_max_examples`` (the quick monitor) unless
    ``whole_splits``. Each split is encoded once for given parameters, however many
    evaluators read it, and kept until :meth:`clear`. In-memory sources are loaded once;
    streamed ones are read again at each extraction. ``raw_pixels``: the flattened
    evaluation view instead of an encoder (the parameters are ignored).
    """

    def __init__(
        self, config, graphdef, mesh, *, whole_splits: bool = False, raw_pixels: bool = False
    ):
        self._config = config
        self._mesh = mesh
        self._encode = make_encode(config, graphdef, mesh, raw_pixels=raw_pixels)
        self._max_examples = 0 if whole_splits else config.data.eval_max_examples
        self._splits = None
        self._params, self._cache = None, {}

    def splits(self) -> tuple[data.EvalSplit, data.EvalSplit]:
        """The two splits (missing or inconsistent data fails here)."""
        if self._splits is None:
            c = data_config = self._config.data
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
        return evaluators.extract(
            encode,
            split.batches(),
            num_batches=split.num_batches,
            num_classes=split.num_classes,
            mesh=self._mesh,
        )

    def fit(self, params) -> evaluators.Features:
        return self._get(0, params)

    def report(self, params) -> evaluators.Features:
        return self._get(1, params)

    def features(self, params) -> tuple[evaluators.Features, evaluators.Features]:
        """The features of both splits."""
        return self.fit(params), self.report(params)

    def clear(self, *, fit_only: bool = False) -> None:
        """Frees the kept features (those of the fitted split only: ``fit_only``)."""
        self._cache.pop(0, None)
        if not fit_only:
            self._params, self._cache = None, {}

    def _get(self, which: int, params) -> evaluators.Features:
        if params is not self._params:
            self.clear()
            self._params = params
        if which not in self._cache:
            self._cache[which] = self.extract(self.splits()[which], params)
        return self._cache[which]


class KnnEvaluator:
    """The weighted k-NN of ``eval.knn_k`` neighbours: yields ``knn_top1``."""

    def __init__(self, config, features: SplitFeatures):
        self.config, self.features = config, features
        self.summary = None  # the last run's settings and figures (evaluation.json)

    def run(self, params):
        top1, k = knn(self.features.fit(params), self.features.report(params), self.config)
        self.summary = {"k": k, "temperature": self.config.eval.knn_temperature, "top1": top1}
        yield "knn_top1", top1


class LinearProbeEvaluator:
    """The ``features`` probe: yields ``linear_probe_top1`` (nothing for a split too small)."""

    def __init__(self, config, features: SplitFeatures):
        self.config, self.features = config, features
        self.summary = None

    def run(self, params):
        result = linear_probe(self.features.fit(params), self.features.report(params), self.config)
        self.summary = None
        if result is not None:
            s = probe_settings(self.config)
            self.summary = {
                "epochs": s.epochs,
                "batch_size": s.batch_size,
                "holdout": s.holdout,
                **result._asdict(),
            }
            yield "linear_probe_top1", result.top1


class AugmentedProbeEvaluator:
    """The ``augmented`` probe (``matching_gap.augmented_probe``, resumable in ``workdir``):
    yields ``augmented_probe_top1`` once it has finished."""

    def __init__(self, config, features: SplitFeatures, graphdef, workdir: str):
        self.config, self.features = config, features
        self._graphdef, self._workdir = graphdef, workdir
        self.summary = None

    def run(self, params):
        report = self.features.report(params)
        self.features.clear(fit_only=True)  # not needed here: freed before the long probe
        self.summary = augmented_probe.run(
            self.config, self._graphdef, params, report, self._workdir
        )
        if self.summary["finished"]:
            yield "augmented_probe_top1", self.summary["top1"]


def monitor(config, features: SplitFeatures) -> list:
    """The training monitor's evaluators at the end of a run: k-NN and ``features`` probe."""
    return [KnnEvaluator(config, features), LinearProbeEvaluator(config, features)]


def run(suite: list, params, *, prefix: str = "eval/") -> dict:
    """``{prefix + name: value}`` of every evaluator on ``params`` (``eval/knn_top1``, ...);
    the features they shared are freed afterwards."""
    results = {}
    for evaluator in suite:
        results.update({prefix + name: value for name, value in evaluator.run(params)})
    for evaluator in suite:
        evaluator.features.clear()
    return results


def knn(fit, report, config) -> tuple[float, int]:
    """``(top-1, k)``: the weighted k-NN with ``eval.knn_k`` neighbours, or every training
    example when there are fewer (said in one line)."""
    e = config.eval
    k = min(e.knn_k, fit.num_examples)
    if k < e.knn_k:
        metrics.log_once(
            f"k-NN: {fit.num_examples} training examples, fewer than eval.knn_k = "
            f"{e.knn_k}; voting with all {k}."
        )
    return evaluators.knn_accuracy(fit, report, k=k, temperature=e.knn_temperature), k


def linear_probe(fit, report, config) -> evaluators.ProbeResult | None:
    """The ``features`` probe, or None (said in one line) for a split too small for it."""
    try:
        return evaluators.linear_probe(fit, report, probe_settings(config), seed=config.seed)
    except evaluators.TooFewExamplesError as e:
        metrics.log_once(f"Linear probe skipped: {e}.")
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
    config = schema.parse(config)
    protocols = config.eval.protocol_names()
    mesh = sharding_lib.make_mesh()
    schema.check_devices(config, mesh.size)
    graphdef, params, step = state.restore_encoder(config, workdir, mesh)
    features = SplitFeatures(config, graphdef, mesh, whole_splits=True)
    fit_split, report_split = features.splits()
    metrics.log(
        f"Evaluating the checkpoint at step {step} ({config.eval.features} features): "
        f"{', '.join(protocols)} on {fit_split.num_examples} training and "
        f"{report_split.num_examples} evaluation images."
    )
    chosen = {
        "knn": lambda: KnnEvaluator(config, features),
        "features": lambda: LinearProbeEvaluator(config, features),
        "augmented": lambda: AugmentedProbeEvaluator(config, features, graphdef, workdir),
    }
    chosen = {name: make() for name, make in chosen.items() if name in protocols}
    results = run(list(chosen.values()), params)
    common = {
        "step": step,
        "features": config.eval.features,
        "train_examples": fit_split.num_examples,
        "eval_examples": report_split.num_examples,
    }
    entries = {
        name: {**common, **evaluator.summary}
        for name, evaluator in chosen.items()
        if evaluator.summary is not None
    }
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
    config = schema.parse(config)
    settings, model_config = config.export, config.model
    export.check_exportable(model_config, settings.format)  # before restoring anything
    if not settings.dir:
        raise errors.ConfigError(
            "--mode=export writes into export.dir: set --config.export.dir=OUT."
        )
    checkpointing.check_workdir(workdir, config)
    _, params, step = state.restore_encoder(config, workdir)
    encoder = jax.device_get(params["encoder"])
    paths = []
    if jax.process_index() == 0:
        paths = export.write_encoder(
            encoder,
            model_config,
            settings.format,
            settings.dir,
            preprocessing=export.preprocessing(config),
        )
        which = "EMA teacher" if config.teacher.ema else "encoder"
        metrics.log(
            f"Wrote the {which} of step {step} as {settings.format} files: {', '.join(paths)}."
        )
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


def load_encoder(workdir: str) -> tuple[Callable[[Any], jax.Array], schema.Config]:
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
    config = schema.parse(json.loads(path.read_text()))
    if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
        # the same function of the same parameters
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, attention="xla")
        )
    graphdef, params, _ = state.restore_encoder(config, workdir)
    size, channels = config.data.image_size, config.data.channels
    _encode = make_encode(config, graphdef)

    def encode(images) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise ValueError(
                f"encode expects images [N, {size}, {size}, {channels}] (the size "
                f"the model was trained on), got {images.shape}."
            )
        return _encode(params, images)

    return encode, config
