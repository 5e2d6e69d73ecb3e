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
import os
import re
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

SUMMARY_FILE = "evaluation.json"  # the pretraining dataset's evaluation
PROBE_DIR = "linear_eval"  # the pretraining dataset's augmented probe


def make_encode(
    config, graphdef, mesh=None, *, raw_pixels: bool = False, features: str | None = None
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``encode(params, images) -> features``: the evaluation view (centre crop,
    normalisation), then ``features`` of the encoder (default ``config.eval.features``, see
    ``schema.FEATURES``); with ``raw_pixels``, the view's pixels flattened (``params``
    unused: the bar a learned encoder should clear). With a ``mesh``, the features stay
    split over the devices like the images."""
    kind = config.eval.features if features is None else features

    def encode(params, images):
        view = augment.center_view(images, config.augment)
        if raw_pixels:
            return view.reshape(view.shape[0], -1)
        model = nnx.merge(graphdef, params)
        return model.encode(view, kind)

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
    ``whole_splits``. Each split is encoded once for given parameters and kind of features
    (``kind``, ``schema.FEATURES``; default ``eval.features``), however many evaluators read
    it, and kept until :meth:`clear`. In-memory sources are loaded once; streamed ones are
    read again at each extraction. ``raw_pixels``: the flattened evaluation view instead of
    an encoder (the parameters and the kind are ignored).
    """

    def __init__(
        self, config, graphdef, mesh, *, whole_splits: bool = False, raw_pixels: bool = False
    ):
        self._config = config
        self._mesh = mesh
        self._raw_pixels = raw_pixels
        self._make_encode = lambda kind: make_encode(
            config, graphdef, mesh, raw_pixels=raw_pixels, features=kind
        )
        self._encoders = {}  # kind of features -> jitted encode
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
                    crop_size=self._config.augment.crop_size,
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

    def extract(self, split: data.EvalSplit, params, kind: str | None = None):
        """The features of ``split`` (:class:`evaluators.Features`), not kept."""
        kind = self._kind(kind)
        if kind not in self._encoders:
            self._encoders[kind] = self._make_encode(kind)
        encode = lambda images: self._encoders[kind](params, images)
        return evaluators.extract(
            encode,
            split.batches(),
            num_batches=split.num_batches,
            num_classes=split.num_classes,
            mesh=self._mesh,
        )

    def fit(self, params, kind: str | None = None) -> evaluators.Features:
        return self._get(0, params, kind)

    def report(self, params, kind: str | None = None) -> evaluators.Features:
        return self._get(1, params, kind)

    def features(
        self, params, kind: str | None = None
    ) -> tuple[evaluators.Features, evaluators.Features]:
        """The features of both splits."""
        return self.fit(params, kind), self.report(params, kind)

    def clear(self, *, fit_only: bool = False) -> None:
        """Frees the kept features (those of the fitted split only: ``fit_only``)."""
        for key in [k for k in self._cache if k[0] == 0]:
            del self._cache[key]
        if not fit_only:
            self._params, self._cache = None, {}

    def _kind(self, kind: str | None) -> str:
        if self._raw_pixels:
            return "raw_pixels"
        return self._config.eval.features if kind is None else kind

    def _get(self, which: int, params, kind: str | None) -> evaluators.Features:
        if params is not self._params:
            self.clear()
            self._params = params
        key = (which, self._kind(kind))
        if key not in self._cache:
            self._cache[key] = self.extract(self.splits()[which], params, key[1])
        return self._cache[key]


class KnnEvaluator:
    """The weighted k-NN of ``eval.knn_k`` neighbours on ``eval.knn_features`` (by default
    the probes' ``eval.features``): yields ``knn_top1``."""

    def __init__(self, config, features: SplitFeatures):
        self.config, self.features = config, features
        self.summary = None  # the last run's settings and figures (evaluation.json)

    def run(self, params):
        kind = self.config.eval.knn_feature_name()
        fit, report = self.features.features(params, kind)
        top1, k = knn(fit, report, self.config)
        self.summary = {
            "features": kind,
            "k": k,
            "temperature": self.config.eval.knn_temperature,
            "top1": top1,
        }
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

    def __init__(
        self, config, features: SplitFeatures, graphdef, workdir: str, *, folder: str = PROBE_DIR
    ):
        self.config, self.features = config, features
        self._graphdef, self._workdir, self._folder = graphdef, workdir, folder
        self.summary = None

    def run(self, params):
        report = self.features.report(params)
        self.features.clear(fit_only=True)  # not needed here: freed before the long probe
        self.summary = augmented_probe.run(
            self.config, self._graphdef, params, report, self._workdir, folder=self._folder
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


def print_summary(results: dict, prefix: str = "eval/") -> None:
    lines = ["", "Linear probe and k-NN top-1 on the evaluation split:"]
    for kind in ("linear_probe_top1", "knn_top1", "augmented_probe_top1"):
        trained = results.get(f"{prefix}{kind}")
        random_init = results.get(f"{prefix}random_init_{kind}")
        raw_pixels = results.get(f"{prefix}raw_pixels_{kind}")
        if trained is None:
            continue
        line = f"  {kind:<20} trained {100 * trained:6.2f}%"
        if random_init is not None:
            line += f" | random init {100 * random_init:6.2f}%"
        if raw_pixels is not None:
            line += f" | raw pixels {100 * raw_pixels:6.2f}%"
        lines.append(line)
    metrics.log("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where an evaluation's figures go: ``<workdir>/<summary_file>``, metric keys
    ``<prefix><name>`` and the augmented probe's folder ``<workdir>/<probe_dir>``."""

    dataset: str  # the data's name: the TFDS name, fashion_mnist or the image folder's
    tag: str  # "" for the pretraining dataset, else "<dataset>_<eval_split>"
    summary_file: str
    prefix: str
    probe_dir: str


def dataset_name(data_config: schema.DataConfig) -> str:
    """The evaluated images' name: ``data.name`` for TFDS, ``fashion_mnist`` for the IDX
    files, the folder's name for an image folder."""
    if data_config.source == "image_folder":
        return os.path.basename(os.path.normpath(data_config.data_dir)) or "image_folder"
    if data_config.source == "fashion_mnist_idx":
        return "fashion_mnist"
    return data_config.name


def destination(config, workdir: str) -> Destination:
    """The pretraining dataset's evaluation (the run's ``config.json`` has the same data
    name and evaluation splits, or there is none) keeps the original names:
    ``evaluation.json``, ``eval/knn_top1``, ``linear_eval/``. Any other (a transfer
    evaluation: ``--config.data.name=cifar10``, or another split) gets its own, named by
    ``tag = <dataset>_<eval_split>``: ``evaluation_<tag>.json``, ``eval/<tag>/knn_top1``,
    ``linear_eval_<tag>/``."""
    data_config = config.data
    name = dataset_name(data_config)
    evaluated = (name, data_config.eval_train_split, data_config.eval_split)
    path = storage.path(workdir, "config.json")
    home = True
    if path.exists():
        try:
            trained = schema.parse(json.loads(path.read_text())).data
        except (OSError, ValueError, errors.ConfigError) as e:
            raise errors.WorkdirError(
                f"{path} cannot be read ({e}); it says which dataset the run was trained "
                "on, so that another one's figures do not replace its own. Restore that file."
            ) from e
        home = evaluated == (dataset_name(trained), trained.eval_train_split, trained.eval_split)
    if home:
        return Destination(name, "", SUMMARY_FILE, "eval/", PROBE_DIR)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}_{data_config.eval_split}").strip("-")
    return Destination(name, tag, f"evaluation_{tag}.json", f"eval/{tag}/", f"{PROBE_DIR}_{tag}")


def evaluate_workdir(config, workdir: str) -> dict:
    """``--mode=evaluate``: the protocols of ``eval.protocols`` on the whole evaluation
    splits, for the newest checkpoint of ``workdir`` (no training).

    The figures go to ``metrics.jsonl`` (at the checkpoint's step) and, with each protocol's
    settings, to the summary file; on the run's own dataset ``eval/knn_top1``, ... and
    ``<workdir>/evaluation.json``, on any other dataset or split (transfer) keys and a file
    of its own (:func:`destination`: ``eval/cifar10_test/knn_top1``,
    ``evaluation_cifar10_test.json``). Earlier results are never replaced: a summary keeps
    the entries of other protocols, and an earlier entry of the same protocol that differs
    from the new one moves to the file's ``"earlier"`` list (an unfinished augmented probe's
    progress excepted: it is not a result). Returns the new entries.
    """
    config = schema.parse(config)
    protocols = config.eval.protocol_names()
    mesh = sharding_lib.make_mesh()
    schema.check_devices(config, mesh.size)
    where = destination(config, workdir)  # before the long work: config.json is readable
    graphdef, params, step = state.restore_encoder(config, workdir, mesh)
    features = SplitFeatures(config, graphdef, mesh, whole_splits=True)
    fit_split, report_split = features.splits()
    on = f"{where.dataset} ({where.tag}): " if where.tag else ""
    metrics.log(
        f"Evaluating the checkpoint at step {step} ({_features_note(config, protocols)}): "
        f"{', '.join(protocols)} on {on}{fit_split.num_examples} training and "
        f"{report_split.num_examples} evaluation images."
    )
    chosen = {
        "knn": lambda: KnnEvaluator(config, features),
        "features": lambda: LinearProbeEvaluator(config, features),
        "augmented": lambda: AugmentedProbeEvaluator(
            config, features, graphdef, workdir, folder=where.probe_dir
        ),
    }
    chosen = {name: make() for name, make in chosen.items() if name in protocols}
    results = run(list(chosen.values()), params, prefix=where.prefix)
    common = {
        "step": step,
        "dataset": where.dataset,
        "train_split": config.data.eval_train_split,
        "eval_split": config.data.eval_split,
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
    _write_summary(workdir, entries, where.summary_file)
    print_summary(results, where.prefix)
    return entries


def _features_note(config, protocols) -> str:
    """``"cls_avgpool features"``, or ``"cls_avgpool features, k-NN on cls"``."""
    note = f"{config.eval.features} features"
    knn_kind = config.eval.knn_feature_name()
    if "knn" in protocols and knn_kind != config.eval.features:
        note += f", k-NN on {knn_kind}"
    return note


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


EARLIER = "earlier"  # a summary's list of the entries later evaluations superseded


def _write_summary(workdir: str, entries: dict, name: str = SUMMARY_FILE) -> None:
    """Merges ``entries`` (protocol -> figures) into ``<workdir>/<name>``; an earlier entry
    that differs from its replacement is appended to the ``"earlier"`` list (with its
    ``protocol``), unless it was an unfinished augmented probe's progress."""
    if jax.process_index() != 0:
        return
    path = storage.path(workdir, name)
    summary = {}
    if path.exists():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            path.replace(path.parent / f"{path.name}.unreadable")  # kept, not lost
    for protocol, entry in entries.items():
        before = summary.get(protocol)
        unfinished = before is not None and before.get("finished") is False
        if before is not None and before != entry and not unfinished:
            summary.setdefault(EARLIER, []).append({"protocol": protocol, **before})
        summary[protocol] = entry
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
