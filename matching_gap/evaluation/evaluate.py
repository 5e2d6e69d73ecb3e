"""``--mode=evaluate``: the configured protocols on the whole evaluation splits, for the
newest checkpoint of a workdir, and where their figures go (:func:`destination`: the run's
own dataset, or a transfer evaluation's own names; the summary file that keeps earlier
results).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax

from matching_gap import errors, metrics, schema, state, storage
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation import suite
from matching_gap.evaluation.augmented_probe import PROBE_DIR
from matching_gap.evaluation.features import SplitFeatures

SUMMARY_FILE = "evaluation.json"  # the pretraining dataset's evaluation


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
    chosen = suite.configured(config, features, graphdef, workdir, probe_dir=where.probe_dir)
    results = suite.run(list(chosen.values()), params, prefix=where.prefix)
    common = {
        "step": step,
        "dataset": where.dataset,
        "train_split": config.data.eval_train_split,
        "eval_split": config.data.eval_split,
        "features": config.eval.features,
        "dtype": config.eval.dtype,
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
    suite.print_summary(results, where.prefix)
    return entries


def _features_note(config, protocols) -> str:
    """``"cls_avgpool features in float32"``, or ``"..., k-NN on cls"``."""
    note = f"{config.eval.features} features in {config.eval.dtype}"
    knn_kind = config.eval.knn_feature_name()
    if "knn" in protocols and knn_kind != config.eval.features:
        note += f", k-NN on {knn_kind}"
    return note


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
