"""The "Is my run healthy?" table of docs/training.md and docs/tpu.md, from the configs and
from a finished demo run.

    python experiments/health_table.py --demo_workdir=/tmp/mg_demo

Per recipe (the CPU demo, the DINO check, the paper's ViT-B/16): when the first progress
row, checkpoint and k-NN arrive (steps from the config; for the pod recipes, the time at the
plan's 40% MFU on v4-32), the matching gap's value at collapse and its floor at the run's
epsilon and OT problem size (``losses.matching_gap_scale``), and the images/s per device
the plan expects. From the demo's ``metrics.jsonl``: its Sinkhorn iterations, effective
rank and loss progress at the first and last rows; from its checkpoint: the k-NN the
training monitor reads on a 10,000-image bank (``data.eval_max_examples``, the recipes'
monitor) beside the k-NN on the whole training split (the demo's final evaluation).
Without ``--demo_workdir`` the demo's measured cells read "not measured".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from matching_gap import config_lib, efficiency, health, metrics, plan, schema  # noqa: E402

RECIPES = (
    ("CPU demo", "configs/default.py", None),
    ("DINO check (ViT-S/16)", "configs/dino_vits16.py", "TPU v4"),
    ("paper's ViT-B/16", "configs/vitb16.py", "TPU v4"),
)
SLICE_DEVICES = 16  # v4-32: 16 chips


def _config(path: str) -> schema.Config:
    return schema.parse(config_lib.load_config_file(os.path.join(ROOT, path)))


def _minutes(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def demo_measurements(workdir: str, config: schema.Config) -> dict:
    """The demo's rows (first, last, settled step time) and its k-NN on a 10k-image bank."""
    rows = [r for r in metrics.read_metrics(workdir) if "train/loss" in r]
    final = [r for r in metrics.read_metrics(workdir) if "eval/knn_top1" in r][-1]
    return {
        "first": rows[0],
        "last": rows[-1],
        "knn_final": final["eval/knn_top1"],
        "knn_10k": knn_on_a_bank(workdir, config, 10_000),
    }


def knn_on_a_bank(workdir: str, config: schema.Config, bank: int) -> float:
    """The training monitor's k-NN of the run's newest checkpoint on ``bank`` training and
    ``bank`` evaluation images (``data.eval_max_examples``)."""
    from matching_gap import sharding, state
    from matching_gap.evaluation import features, knn

    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, eval_max_examples=bank)
    )
    mesh = sharding.make_mesh()
    graphdef, params, _ = state.restore_encoder(config, workdir, mesh)
    split_features = features.SplitFeatures(config, graphdef, mesh)
    return dict(knn.KnnEvaluator(config, split_features).run(params))["knn_top1"]


def table(demo_workdir: str | None) -> str:
    columns = []
    for name, path, kind in RECIPES:
        config = _config(path)
        t = config.train
        cell = {"name": f"{name}: `{path}`"}
        if kind is None:  # a CPU's time depends on the CPU: its settled line says it
            measured = demo_measurements(demo_workdir, config) if demo_workdir else None
            step_time, where = None, ""
        else:
            measured = None
            peak = efficiency.peak_flops(kind, config.model.dtype)
            per_device = efficiency.images_per_second_per_device(
                config, peak, efficiency.ASSUMED_MFU
            )
            step_time = config.optim.batch_size / (per_device * SLICE_DEVICES)
            where = "v4-32 at 40% MFU"
        steps = plan.recipe_steps(config)

        def at(step, step_time=step_time, where=where):
            if not step:
                return "at the end only"
            time = f", {_minutes(step * step_time)} on {where}" if step_time else ""
            return f"step {step:,}{time}"

        cell["row"] = at(t.log_every)
        cell["checkpoint"] = at(t.checkpoint_every)
        cell["knn"] = at(t.knn_every)
        cell["steps"] = f"{steps:,}" if steps else "-"
        scale = health.loss_scale(config, config.loss.epsilon)
        if scale:
            n = health.ot_problem_size(config)
            cell["scale"] = (
                f"{scale['collapse']:.3f} / {scale['floor']:.4f} (epsilon {config.loss.epsilon}, "
                f"n = {n})"
            )
        else:
            cell["scale"] = "- (DINO: the collapse line reads its target entropy)"
        if kind is None:
            cell["rate"] = "the settled line's (MFU unknown: a CPU has no published peak)"
        else:
            cell["rate"] = f"{per_device:,.0f} images/s per chip at 40% MFU (the plan)"
        if measured:
            f, last = measured["first"], measured["last"]
            cell["sinkhorn"] = (
                f"{f['sinkhorn/sinkhorn_iterations']:.0f} at step {f['step']}, "
                f"{last['sinkhorn/sinkhorn_iterations']:.0f} at step {last['step']}; converged "
                f"{last['sinkhorn/converged']:.0%}"
            )
            cell["rank"] = (
                f"{f['health/effective_rank']:.1f} at step {f['step']}, "
                f"{last['health/effective_rank']:.1f} at step {last['step']} (of at most "
                f"{config.model.encoder_sizes()['width']})"
            )
            cell["progress"] = (
                f"{f['health/loss_progress']:.0%} at step {f['step']}, "
                f"{last['health/loss_progress']:.0%} at step {last['step']}"
            )
            bank, whole = 100 * measured["knn_10k"], 100 * measured["knn_final"]
            cell["monitor"] = (
                f"{bank:.2f}% on a 10k bank vs {whole:.2f}% on all 60k: {bank - whole:+.2f} points"
            )
        else:
            for key in ("sinkhorn", "rank", "progress", "monitor"):
                cell[key] = "not measured"
        columns.append(cell)

    rows = [
        ("", "name"),
        ("training steps", "steps"),
        ("first progress row", "row"),
        ("first checkpoint", "checkpoint"),
        ("first k-NN (`train.knn_every`)", "knn"),
        ("10k-bank k-NN monitor vs the final k-NN", "monitor"),
        ("loss at collapse / floor", "scale"),
        ("`health/loss_progress` (0 collapse, 1 floor)", "progress"),
        ("`sinkhorn/sinkhorn_iterations`", "sinkhorn"),
        ("`health/effective_rank`", "rank"),
        ("throughput", "rate"),
    ]
    lines = []
    for i, (label, key) in enumerate(rows):
        lines.append("| " + " | ".join([label] + [c[key] for c in columns]) + " |")
        if i == 0:
            lines.append("|---" * (len(columns) + 1) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_workdir", default=None, help="a finished demo run's workdir")
    args = parser.parse_args()
    print(table(args.demo_workdir))


if __name__ == "__main__":
    main()
