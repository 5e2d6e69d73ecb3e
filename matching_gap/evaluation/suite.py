"""The evaluators composed: the configured protocols (:func:`configured`), the training
monitor's pair (:func:`monitor`), a run of several on the same parameters (:func:`run`) and
the summary printed after training.

An evaluator (as big_vision's) is a small object built from the config and a
:class:`~matching_gap.evaluation.features.SplitFeatures`, whose ``run(params)`` yields
``(name, value)`` pairs and leaves its settings and figures in ``summary``. One module per
protocol: ``knn`` (:class:`KnnEvaluator`), ``linear_probe`` (the ``features`` probe,
:class:`LinearProbeEvaluator`), ``augmented_probe`` (:class:`AugmentedProbeEvaluator`).
A new protocol is a module with such a class, its name in :func:`configured` and in
``schema.PROTOCOLS``.
"""

from __future__ import annotations

from matching_gap import metrics
from matching_gap.evaluation.augmented_probe import PROBE_DIR, AugmentedProbeEvaluator
from matching_gap.evaluation.features import SplitFeatures
from matching_gap.evaluation.knn import KnnEvaluator
from matching_gap.evaluation.linear_probe import LinearProbeEvaluator


def configured(
    config, features: SplitFeatures, graphdef, workdir: str, *, probe_dir: str = PROBE_DIR
) -> dict:
    """``{protocol: evaluator}`` for the protocols of ``eval.protocols``, in this order (the
    augmented probe resumes from ``<workdir>/<probe_dir>``)."""
    chosen = {
        "knn": lambda: KnnEvaluator(config, features),
        "features": lambda: LinearProbeEvaluator(config, features),
        "augmented": lambda: AugmentedProbeEvaluator(
            config, features, graphdef, workdir, folder=probe_dir
        ),
    }
    protocols = config.eval.protocol_names()
    return {name: make() for name, make in chosen.items() if name in protocols}


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


def print_summary(results: dict, prefix: str = "eval/") -> None:
    lines = ["", "Linear probe and k-NN top-1 on the evaluation split:"]
    names = ("linear_probe_top1", "knn_top1", "augmented_probe_top1")
    kinds = [k for k in (*names, "augmented_probe_top1_best_epoch") if prefix + k in results]
    width = max([20, *map(len, kinds)])
    for kind in kinds:
        trained = results[f"{prefix}{kind}"]
        random_init = results.get(f"{prefix}random_init_{kind}")
        raw_pixels = results.get(f"{prefix}raw_pixels_{kind}")
        line = f"  {kind:<{width}} trained {100 * trained:6.2f}%"
        if random_init is not None:
            line += f" | random init {100 * random_init:6.2f}%"
        if raw_pixels is not None:
            line += f" | raw pixels {100 * raw_pixels:6.2f}%"
        lines.append(line)
    metrics.log("\n".join(lines))
