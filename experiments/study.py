"""The small-scale study: the matching gap against InfoNCE, BYOL and DINO on Fashion-MNIST.

    python experiments/study.py                       # run every missing cell, then report
    python experiments/study.py --max_minutes=30      # run for 30 minutes, resume later
    python experiments/study.py --report_only         # table + plots from results.json

Every cell trains the CPU demo of ``configs/default.py`` (its model, recipe and budget:
``optim.num_epochs`` unless ``--epochs``) and evaluates it with the demo's linear probe and
weighted k-NN on the 10k test images. Groups of cells, run in this order:

- ``cropflip`` (the claim: ``--claim_seeds``, 5 by default): matching gap, InfoNCE
  (temperature 0.1), BYOL (EMA teacher and predictor, BatchNorm in the heads, momentum
  0.95 -> 1), DINO (:data:`DINO_OVERRIDES`), random-resized crop + flip only;
- ``strong``: the same four with BYOL's colour jitter / blur / solarisation on top
  (asymmetric blur 1.0 / 0.1 and solarize 0 / 0.2, as BYOL);
- ``collapse``: DINO without its centre (``loss.centering=False``), one seed (the first
  claim seed), against the ``cropflip`` DINO cell of that seed;
- ``epsilon``: the matching gap at epsilons on the paper's scale (0.8 on this cost is M3G's
  0.2 on the circular variance; the demo's value is shared with ``cropflip``);
- ``m3g``: the multi-marginal matching gap with k = 2, 3, 4 views (epsilon 0.05 on the
  circular variance, which for k = 2 is the matching gap's 0.2; OT problems of 8 images)
  at an equal budget of encoder passes: k views get 2/k of the steps, so each cell does
  about the same work (the minutes each took are in the table);
- ``cifar10``: the ``cropflip`` losses on CIFAR-10, only when ``--cifar10_data_dir`` holds a
  prepared TFDS ``cifar10``.

Each cell's budget is a fixed number of optimiser steps, so that a busy machine changes
how long the study takes and not its results; the training minutes of each cell are
recorded beside its accuracy and the plots show accuracy against them. A cell's workdir
under ``--workdir`` holds its checkpoints, so an interrupted cell resumes where it stopped
and finished cells are not rerun, unless the study now gives a cell other settings (its
overrides, such as BYOL's momentum): then it is trained afresh in a new workdir and replaces
the old result. Finished cells are collected in
``experiments/study/results.json``, from which ``--report_only`` rebuilds
``experiments/study/results.md`` (mean ± std, paired differences with 95% intervals, the
verdict) and the PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(EXPERIMENTS)
OUT = os.path.join(EXPERIMENTS, "study")
LOSS_LABELS = {
    "matching_gap": "matching gap",
    "info_nce": "InfoNCE",
    "byol": "BYOL",
    "dino": "DINO",
}
# DINO at the demo's scale: DINO's head (3 layers, bottleneck 256, weight-normalised last
# layer with its norms fixed) on the demo's hidden width (256, as the other cells' heads),
# out_dim 4096 (DINO's 65536 would cost this CPU about 17 more minutes a cell), and
# main_dino.py's defaults otherwise: temperatures 0.1 / 0.04, centre momentum 0.9, EMA
# momentum 0.996 -> 1, the last layer frozen for the first epoch.
DINO_OVERRIDES: tuple[tuple[str, object], ...] = (
    ("loss.name", "dino"),
    ("teacher.ema", True),
    ("model.head", "dino"),
    ("model.projector_layers", 3),
    ("model.head_bottleneck_dim", 256),
    ("model.projector_dim", 4096),
    ("teacher.momentum", 0.996),
    ("optim.freeze_last_layer_epochs", 1.0),
)
EPSILONS = (0.05, 0.2, 0.8, 3.2)  # factors of 4 around the demo's 0.2 (the cropflip cell)
# M3G reports accuracy flat over epsilon in [0.05, 1] on the circular variance, which for two
# unit vectors is a quarter of their squared Euclidean distance: [0.2, 4] on this cost.
M3G_FLAT_RANGE = (0.2, 4.0)
M3G_VIEWS = (2, 3, 4)
# A cost tensor of group^k entries per OT problem: with groups of 16, k = 4 ran at 112
# images/s here; groups of 8 keep it cheap. Compare the M3G cells with each other.
M3G_GROUP = 8
GROUPS = ("cropflip", "strong", "collapse", "epsilon", "m3g", "cifar10")
NO_CENTRE = "DINO without centre"  # the collapse group's row
MINUTES_FILE = "study_minutes.txt"  # in a cell's workdir: the minutes of its earlier pieces


@dataclasses.dataclass(frozen=True)
class Cell:
    group: str
    label: str  # the row of the results table
    seed: int
    overrides: tuple[tuple[str, object], ...] = ()  # ("loss.name", "info_nce"), ...
    strong: bool = False
    dataset: str = "fashion_mnist"
    budget: float = 1.0  # this cell trains for budget x --epochs
    curve: bool = False  # k-NN during training, for the accuracy-over-training plot
    random_init: bool = False  # also evaluate the untrained encoder

    @property
    def settings(self) -> list:
        """The overrides as ``results.json`` stores them (JSON lists)."""
        return json.loads(json.dumps([list(o) for o in self.overrides]))

    @property
    def workdir_name(self) -> str:
        """The name plus a tag of the settings: a cell whose settings change is trained
        afresh, never resumed from (or re-evaluated on) checkpoints of the old ones."""
        tag = hashlib.sha1(json.dumps(self.settings).encode()).hexdigest()[:8]
        return f"{self.name}-{tag}"

    @property
    def name(self) -> str:
        slug = self.label.replace(" ", "_").replace("=", "").replace(".", "p")
        return f"{self.group}-{slug}-seed{self.seed}"


def _loss_overrides(loss: str) -> tuple[tuple[str, object], ...]:
    if loss == "byol":  # BYOL short-run: BatchNorm heads, momentum 0.95 (experiments/README.md)
        return (
            ("loss.name", "byol"),
            ("teacher.ema", True),
            ("model.use_predictor", True),
            ("model.head_batchnorm", True),
            ("teacher.momentum", 0.95),
        )
    if loss == "dino":
        return DINO_OVERRIDES
    return (("loss.name", loss),)


def make_cells(seeds, groups, cifar10: bool, claim_seeds=None) -> list[Cell]:
    """The study's cells, group by group, so that a partial run finishes whole groups;
    ``claim_seeds`` (default ``seeds``) for the ``cropflip`` group."""
    cells = []
    for group in groups:
        for seed in claim_seeds if group == "cropflip" and claim_seeds else seeds:
            if group in ("cropflip", "strong", "cifar10"):
                if group == "cifar10" and not cifar10:
                    continue
                for loss, label in LOSS_LABELS.items():
                    cells.append(
                        Cell(
                            group,
                            label,
                            seed,
                            _loss_overrides(loss),
                            strong=group == "strong",
                            dataset="cifar10" if group == "cifar10" else "fashion_mnist",
                            curve=group != "cifar10",
                            random_init=loss == "matching_gap" and group != "strong",
                        )
                    )
            elif group == "m3g":
                for k in M3G_VIEWS:
                    overrides = (
                        ("loss.name", "m3g"),
                        ("augment.num_views", k),
                        ("loss.epsilon", 0.05),
                        ("loss.group_size", M3G_GROUP),
                    )
                    cells.append(Cell(group, f"k={k}", seed, overrides, budget=2 / k, curve=True))
            elif group == "collapse":
                first = (claim_seeds or seeds)[0]
                if seed == first:
                    overrides = DINO_OVERRIDES + (("loss.centering", False),)
                    cells.append(Cell(group, NO_CENTRE, seed, overrides, curve=True))
            elif group == "epsilon":
                for eps in EPSILONS:
                    if eps != 0.2:  # the cropflip matching-gap cell
                        cells.append(Cell(group, f"eps={eps}", seed, (("loss.epsilon", eps),)))
            else:
                raise ValueError(f"Unknown group {group!r}; valid: {GROUPS}.")
    return cells


def demo_epochs() -> float:
    """The demo's own budget (``optim.num_epochs`` of configs/default.py)."""
    from matching_gap import config_lib

    return float(
        config_lib.load_config_file(os.path.join(REPO, "configs", "default.py")).optim.num_epochs
    )


def cell_config(cell: Cell, epochs: float, *, data_dir: str = "", cifar10_data_dir: str = ""):
    """The full training config of one cell: the demo's, trained ``epochs x cell.budget``."""
    from matching_gap import config_lib
    from matching_gap import state as state_lib

    # The demo's recipe; every cell but the strong ones with crop + flip only.
    arg = None if cell.strong else "cropflip"
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "default.py"), arg)
    c.seed = cell.seed
    epochs *= cell.budget
    c.optim.num_epochs = epochs
    c.optim.warmup_epochs = min(c.optim.warmup_epochs, epochs / 8)
    num_examples = 50_000 if cell.dataset == "cifar10" else 60_000
    steps = state_lib.total_steps(c, num_examples)
    c.train.update(
        log_every=50,
        checkpoint_every=max(steps // 4, 1),
        knn_every=steps // 4 if cell.curve else 0,
        compare_random_init=cell.random_init,
        compare_raw_pixels=False,
        pictures=False,
        plan_every=0,
    )
    if data_dir:
        c.data.data_dir = data_dir
    if cell.dataset == "cifar10":
        c.data.update(
            source="tfds", name="cifar10", data_dir=cifar10_data_dir, image_size=32, channels=3
        )
        c.augment.update(crop_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
        c.model.update(image_size=32, channels=3, patch_size=4)
    if cell.strong:  # after the data changes: the preset depends on nothing they set
        config_lib.strong_augmentations(c)
    c.update_from_flattened_dict(dict(cell.overrides))
    return c


def train_seconds(rows: list[dict], batch_size: int) -> dict[int, float]:
    """Cumulative training seconds at each logged step, from the logged images per second
    (the time between two log lines, monitoring evaluations included)."""
    out, last, total = {0: 0.0}, 0, 0.0
    for r in sorted((r for r in rows if "train/images_per_second" in r), key=lambda r: r["step"]):
        if r["step"] > last:
            total += (r["step"] - last) * batch_size / r["train/images_per_second"]
            out[r["step"]], last = total, r["step"]
    return out


def _finished_record(
    cell: Cell, workdir: str, results: dict, minutes: float, epochs: float, batch_size: int
):
    from matching_gap import metrics

    rows = metrics.read_metrics(workdir)
    curve = [
        (r["step"], r["eval/knn_top1"])
        for r in rows
        if "eval/knn_top1" in r and "eval/linear_probe_top1" not in r
    ]
    final_step = max(r["step"] for r in rows)
    curve.append((final_step, results["eval/knn_top1"]))
    seconds = train_seconds(rows, batch_size)
    return {
        "name": cell.name,
        "group": cell.group,
        "label": cell.label,
        "seed": cell.seed,
        "overrides": cell.settings,
        "strong": cell.strong,
        "dataset": cell.dataset,
        "epochs": epochs,
        "steps": final_step,
        "minutes": round(minutes, 2),
        "train_minutes": round(seconds.get(final_step, float("nan")) / 60, 2),
        "linear_probe_top1": results["eval/linear_probe_top1"],
        "knn_top1": results["eval/knn_top1"],
        "random_init_linear_probe_top1": results.get("eval/random_init_linear_probe_top1"),
        "random_init_knn_top1": results.get("eval/random_init_knn_top1"),
        "knn_curve": curve,
        "knn_curve_minutes": [round(seconds.get(step, float("nan")) / 60, 3) for step, _ in curve],
    }


def run(args) -> None:
    from matching_gap import storage, train

    groups, seeds, claim_seeds = args.groups, args.seeds, args.claim_seeds
    args.epochs = demo_epochs() if args.epochs is None else args.epochs
    cifar10 = bool(args.cifar10_data_dir) and os.path.isdir(
        os.path.join(args.cifar10_data_dir, "cifar10")
    )
    if "cifar10" in groups and not cifar10:
        print(
            "CIFAR-10 cells skipped: no prepared TFDS cifar10 under --cifar10_data_dir "
            f"({args.cifar10_data_dir or 'not given'})."
        )
    results_path = os.path.join(args.out, "results.json")
    records = _load_records(results_path)
    budgets = {r["epochs"] for r in records.values()} - {args.epochs}
    if budgets:
        sys.exit(
            f"{results_path} holds cells trained for {sorted(budgets)} epochs, not "
            f"--epochs={args.epochs}: pass that --epochs, or another --out and --workdir."
        )
    cells = make_cells(seeds, groups, cifar10, claim_seeds)
    # A cell is to do when it has no record, or one trained with other overrides (stale).
    todo = [c for c in cells if records.get(c.name, {}).get("overrides") != c.settings]
    stale = [c for c in todo if c.name in records]
    if stale:
        c = stale[0]
        before, now = dict(records[c.name]["overrides"]), dict(c.settings)
        keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        changes = ", ".join(
            f"{k} {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in keys
        )
        print(
            f"{len(stale)} finished cells were trained with other settings than the study "
            f"gives them now (e.g. {c.name}: {changes}); rerunning them, their old "
            "results kept until each is replaced."
        )
    print(f"{len(cells) - len(todo)} of {len(cells)} cells done; running {len(todo)}.")
    if todo:
        storage.check_workdir(args.workdir)  # a gs:// bucket that is missing or out of reach
    start = time.perf_counter()
    for i, cell in enumerate(todo):
        spent = (time.perf_counter() - start) / 60
        if args.max_minutes and spent >= args.max_minutes:
            print(f"--max_minutes={args.max_minutes} reached; rerun to continue.")
            break
        config = cell_config(
            cell, args.epochs, data_dir=args.data_dir, cifar10_data_dir=args.cifar10_data_dir
        )
        if args.max_minutes:  # stop mid-cell with a checkpoint; the next run resumes it
            config.train.time_limit_minutes = args.max_minutes - spent
        workdir = str(storage.path(args.workdir, cell.workdir_name))  # local, or gs://
        print(f"\n=== cell {i + 1}/{len(todo)}: {cell.name} ({workdir})", flush=True)
        t0 = time.perf_counter()
        outcome = train.train_and_evaluate(config, workdir)
        # The cell's minutes, its earlier pieces included (a resumed cell).
        minutes = _earlier_minutes(workdir) + (time.perf_counter() - t0) / 60
        if not outcome.finished:
            storage.write_text(storage.path(workdir, MINUTES_FILE), f"{minutes}\n")
            print(f"{cell.name} stopped before its last step; rerun to resume it.")
            break
        records[cell.name] = _finished_record(
            cell, workdir, outcome.results, minutes, args.epochs, config.optim.batch_size
        )
        _save_records(results_path, records)
    write_report(records, args.out)


def _earlier_minutes(workdir: str) -> float:
    from matching_gap import storage

    path = storage.path(workdir, MINUTES_FILE)
    return float(path.read_text()) if path.exists() else 0.0


def _load_records(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["name"]: r for r in json.load(f)}


def _save_records(path: str, records: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(sorted(records.values(), key=lambda r: r["name"]), f, indent=1)
    os.replace(tmp, path)  # never a half-written results file


# ------------------------------------------------------------------------------ the report


def _seeds(n: int) -> str:
    return f"{n} seed" + "s" * (n > 1)


def _stats(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _order(label: str) -> tuple:
    """Table order: the losses as in LOSS_LABELS, then k or epsilon ascending."""
    losses = list(LOSS_LABELS.values())
    if label in losses:
        return (losses.index(label), 0.0)
    if "=" not in label:  # the collapse row
        return (len(losses), 0.0)
    return (len(losses), float(label.split("=")[1]))


def _rows(records: dict, group: str) -> dict[str, list[dict]]:
    """``{row label: [records, by seed]}`` of one group, in table order."""
    rows: dict[str, list[dict]] = {}
    for r in sorted(records.values(), key=lambda r: (_order(r["label"]), r["seed"])):
        if r["group"] == group:
            rows.setdefault(r["label"], []).append(r)
    return rows


def _epsilon_rows(records: dict) -> dict[str, list[dict]]:
    """The epsilon sweep's rows by ascending epsilon; its 0.2 point is the cropflip
    matching-gap cell."""
    rows = _rows(records, "epsilon")
    shared = _rows(records, "cropflip").get("matching gap")
    if shared:
        rows["eps=0.2"] = shared
    return dict(sorted(rows.items(), key=lambda kv: _order(kv[0])))


def summarize(records: dict) -> str:
    """The markdown tables: mean ± std (over seeds) of linear-probe and k-NN top-1, in %."""
    titles = {
        "cropflip": "Crop + flip only",
        "strong": "Crop + flip + colour jitter, grayscale, blur, solarisation",
        "collapse": "DINO without its centre, crop + flip",
        "m3g": "M3G, k views (eps 0.05 on the circular variance, OT groups of 8, 2/k of the steps)",
        "epsilon": "Matching gap, crop + flip, epsilon sweep",
        "cifar10": "CIFAR-10, crop + flip only",
    }
    lines = []
    for group in GROUPS:
        rows = _rows(records, group)
        if not rows:  # the epsilon sweep only once it has cells of its own
            continue
        if group == "epsilon":
            rows = _epsilon_rows(records)
        lines += [
            f"### {titles[group]}",
            "",
            "| cell | seeds | linear probe (%) | k-NN (%) | steps | training minutes "
            "| minutes / cell |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, rs in rows.items():
            train_minutes = [r["train_minutes"] for r in rs if "train_minutes" in r]
            lines.append(
                f"| {label} | {len(rs)} | {_stats([r['linear_probe_top1'] for r in rs])} | "
                f"{_stats([r['knn_top1'] for r in rs])} | {rs[0]['steps']} | "
                f"{np.mean(train_minutes) if train_minutes else float('nan'):.1f} | "
                f"{np.mean([r['minutes'] for r in rs]):.1f} |"
            )
        random = [
            r
            for rs in rows.values()
            for r in rs
            if r["group"] == group and r.get("random_init_linear_probe_top1") is not None
        ]
        if random:  # the untrained encoders of the cells that also evaluated them
            lines.append(
                f"| random-init encoder | {len(random)} | "
                f"{_stats([r['random_init_linear_probe_top1'] for r in random])} | "
                f"{_stats([r['random_init_knn_top1'] for r in random])} | 0 | | |"
            )
        lines.append("")
    lines += _claim(records) + flatness(records)
    return "\n".join(lines)


def paired_interval(diffs) -> tuple[float, float, float]:
    """Mean and two-sided 95% t-interval of paired differences ``(mean, low, high)``;
    the interval is nan with fewer than 2 pairs."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(low: float, high: float, subject: str = "the matching gap") -> str:
    """What a 95% interval of (``subject`` - its reference) says: for the claim, the
    matching gap minus InfoNCE."""
    if np.isnan(low):
        return "one seed: no interval, no verdict"
    if low > 0:
        return f"{subject} is better (the interval is above 0)"
    if high < 0:
        return f"{subject} is worse (the interval is below 0)"
    return "no difference detected (the interval contains 0)"


def _claim(records: dict) -> list[str]:
    """Matching gap minus InfoNCE (and BYOL minus InfoNCE), per seed (same seed = same
    init and data order), with 95% intervals and the verdict on the claim; then each
    epsilon against 0.2 and each M3G k against 2."""
    out = []
    for group in ("cropflip", "strong", "cifar10"):
        out += _against(group, _rows(records, group), "InfoNCE", _claim_verdict)
    dino = _rows(records, "cropflip").get("DINO")
    collapse = _rows(records, "collapse")
    if dino and collapse:  # without the centre against DINO, same seed
        out += _against(
            "collapse",
            {"DINO": dino, **collapse},
            "DINO",
            lambda label, mean, low, high: "one seed" if np.isnan(low) else verdict(low, high),
        )
    out += _against(
        "epsilon",
        _epsilon_rows(records),
        "eps=0.2",
        lambda label, mean, low, high: verdict(low, high, label),
    )
    # More views against two, at equal encoder passes.
    views = lambda label, mean, low, high: verdict(low, high, f"{label[2:]} views")  # noqa: E731
    out += _against("m3g", _rows(records, "m3g"), "k=2", views)
    return out and ["Paired differences (same seed), 95% t-intervals:", ""] + out + [""]


def _claim_verdict(label: str, mean: float, low: float, high: float) -> str:
    """The claim's verdict for the matching gap and DINO; issue 12's 2-point target for BYOL."""
    if label == "matching gap":
        return verdict(low, high)
    if label == "DINO":
        return verdict(low, high, "DINO")
    return (
        "within 2 points of InfoNCE"
        if round(mean, 2) >= -2.0
        else "more than 2 points behind InfoNCE"
    )


def _against(group: str, rows: dict, reference: str, judge) -> list[str]:
    """Every row of ``rows`` but ``reference`` minus ``reference``, paired by seed, each
    line ending in ``judge(row label, mean, low, high)``."""
    ref = {r["seed"]: r for r in rows.get(reference, [])}
    out = []
    for label, rs in rows.items():
        mine = {r["seed"]: r for r in rs}
        seeds = sorted(set(mine) & set(ref))
        if label == reference or not seeds:
            continue
        for metric, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "k-NN")):
            d = [100 * (mine[s][metric] - ref[s][metric]) for s in seeds]
            line, mean, low, high = _paired_line(f"{group}: {label} − {reference}, {name}", d)
            out.append(f"{line}: {judge(label, mean, low, high)}")
    return out


def _paired_line(what: str, diffs: list[float]) -> tuple[str, float, float, float]:
    """``- what: mean points, 95% interval [...] over n seeds (per seed ...)`` and its
    ``mean, low, high``."""
    mean, low, high = paired_interval(diffs)
    line = (
        f"- {what}: {mean:+.2f} points, 95% interval [{low:+.2f}, {high:+.2f}] over "
        f"{_seeds(len(diffs))} (per seed {', '.join(f'{x:+.2f}' for x in diffs)})"
    )
    return line, mean, low, high


def flatness(records: dict) -> list[str]:
    """Whether accuracy is flat over the sweep's epsilons inside M3G's flat range: the
    spread of the means and a one-way ANOVA over the cells (every seed of each epsilon)."""
    from scipy import stats

    low, high = M3G_FLAT_RANGE
    rows = {
        label: rs
        for label, rs in _epsilon_rows(records).items()
        if low <= float(label.split("=")[1]) <= high
    }
    if len(rows) < 2:  # without sweep cells only the shared eps=0.2 row is there
        return []
    out = [
        f"Epsilon flatness over {', '.join(rows)} (M3G: flat over [0.05, 1] on the "
        f"circular variance, [{low:g}, {high:g}] on this cost), one-way ANOVA:",
        "",
    ]
    for metric, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "k-NN")):
        acc = [100 * np.array([r[metric] for r in rs]) for rs in rows.values()]
        means = [a.mean() for a in acc]
        low_mean, high_mean = min(means), max(means)
        spread = f"means {low_mean:.2f} to {high_mean:.2f} ({high_mean - low_mean:.2f} points)"
        if min(len(a) for a in acc) < 2:
            out.append(f"- {name}: {spread}; an epsilon with one seed: no test yet")
            continue
        p = stats.f_oneway(*acc).pvalue
        out.append(
            f"- {name}: {spread}, p = {p:.3f}: "
            + (
                "flat (no difference across epsilon detected)"
                if p >= 0.05
                else "not flat (accuracy changes with epsilon)"
            )
        )
    return out + [""]


def plot(records: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    titles = {
        "cropflip": "crop + flip",
        "strong": "+ strong augmentations",
        "collapse": "DINO without its centre (crop + flip)",
        "m3g": "M3G, k views (equal encoder passes)",
    }
    groups = [g for g in titles if _rows(records, g)]
    if groups:
        fig, axes = plt.subplots(2, len(groups), figsize=(6 * len(groups), 8), squeeze=False)
        random = [
            r["random_init_knn_top1"]
            for rs in _rows(records, "cropflip").values()
            for r in rs
            if r.get("random_init_knn_top1") is not None
        ]
        for col, group in enumerate(groups):
            for label, rs in _rows(records, group).items():
                steps = np.array([s for s, _ in rs[0]["knn_curve"]])
                same = [r for r in rs if len(r["knn_curve"]) == len(steps)]
                acc = 100 * np.array([[a for _, a in r["knn_curve"]] for r in same])
                mean, std = acc.mean(0), acc.std(0)
                timed = [r["knn_curve_minutes"] for r in same if "knn_curve_minutes" in r]
                for row, x in ((0, steps), (1, np.mean(timed, 0) if timed else None)):
                    if x is None:
                        continue
                    ax = axes[row, col]
                    ax.plot(x, mean, marker="o", label=f"{label} ({_seeds(len(acc))})")
                    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
            for row, xlabel in ((0, "training step"), (1, "training minutes (mean over seeds)")):
                ax = axes[row, col]
                if random:  # the same encoders before training (cells of the same seeds)
                    ax.axhline(
                        100 * np.mean(random), color="gray", linestyle="--", label="random init"
                    )
                ax.set(title=titles[group], xlabel=xlabel, ylabel="k-NN top-1 (%)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out, "accuracy_over_training.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if _rows(records, "epsilon"):
        rows = _epsilon_rows(records)
        shared = _rows(records, "cropflip")
        eps = list(rows)
        x = np.array([float(e.split("=")[1]) for e in eps])
        fig, ax = plt.subplots(figsize=(6, 4))
        for metric, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "k-NN")):
            acc = [100 * np.array([r[metric] for r in rows[e]]) for e in eps]
            ax.errorbar(
                x,
                [a.mean() for a in acc],
                yerr=[a.std() for a in acc],
                marker="o",
                capsize=3,
                label=f"matching gap, {name}",
            )
            if "InfoNCE" in shared:
                ref = 100 * np.mean([r[metric] for r in shared["InfoNCE"]])
                ax.axhline(
                    ref,
                    linestyle="--",
                    color=ax.lines[-1].get_color(),
                    alpha=0.6,
                    label=f"InfoNCE (t = 0.1), {name}",
                )
        ax.set(
            xscale="log",
            xlabel="epsilon (squared Euclidean cost of unit vectors)",
            ylabel="top-1 (%)",
            title="accuracy vs epsilon (mean ± std over seeds)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out, "accuracy_vs_epsilon.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(records: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    table = summarize(records)
    header = (
        "<!-- Written by `python experiments/study.py`; do not edit by hand. -->\n\n"
        f"{len(records)} cells. Mean ± std over seeds, top-1 on the 10k test images; every cell "
        "is the demo ViT of configs/default.py trained for the steps in its row. Commands, "
        "setup and conclusions: experiments/README.md.\n\n"
    )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + table)
    print(table)
    for path in plot(records, out):
        print(f"wrote {os.path.relpath(path, REPO)}")


def _groups(text: str) -> list[str]:
    groups = text.split(",")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown group(s) {unknown}; valid: {','.join(GROUPS)}")
    return groups


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--workdir",
        default="/tmp/matching_gap_study",
        help="where the cells train (checkpoints; kept for resuming)",
    )
    p.add_argument("--out", default=OUT, help="results.json, results.md and the plots")
    p.add_argument("--groups", type=_groups, default=list(GROUPS), help=",".join(GROUPS))
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=[0, 1, 2],
        help="seeds of every group but cropflip, e.g. 0,1,2",
    )
    p.add_argument(
        "--claim_seeds",
        type=_seed_list,
        default=[0, 1, 2, 3, 4],
        help="seeds of the cropflip group",
    )
    p.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="training budget of every cell (default: the demo's num_epochs)",
    )
    p.add_argument(
        "--max_minutes",
        type=float,
        default=0.0,
        help="> 0: stop (checkpointing the running cell) after this long",
    )
    p.add_argument("--data_dir", default="", help="Fashion-MNIST IDX dir (default: Debian's)")
    p.add_argument("--cifar10_data_dir", default="", help="a TFDS data_dir with cifar10")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        records = _load_records(os.path.join(args.out, "results.json"))
        if not records:
            sys.exit(f"No results in {args.out}/results.json; run the study first.")
        write_report(records, args.out)
    else:
        sys.path.insert(0, REPO)
        from matching_gap import errors

        try:
            run(args)
        except errors.UserError as e:  # as python -m matching_gap.main: one line, status 2
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)


if __name__ == "__main__":
    main()
