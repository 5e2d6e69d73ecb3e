"""experiments/study.py: every cell's config is valid, and the report's statistics are right."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
spec = importlib.util.spec_from_file_location(
    "study", os.path.join(ROOT, "experiments", "study.py")
)
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # dataclasses look their module up
spec.loader.exec_module(study)


def test_cells_cover_the_study_and_their_configs_are_valid():
    cells = study.make_cells([0, 1, 2], study.GROUPS, cifar10=True)
    names = [c.name for c in cells]
    assert len(names) == len(set(names))
    # 4 losses x 3 augmentation regimes (incl. CIFAR-10) + 3 M3G k + the extra epsilons, 3
    # seeds, and DINO without its centre on the first seed.
    assert len(cells) == 3 * (4 * 3 + 3 + len(study.EPSILONS) - 1) + 1
    for cell in cells:
        c = study.cell_config(cell, epochs=2.0, cifar10_data_dir="/tfds")
        assert c.is_locked and c.seed == cell.seed
        for key, value in cell.overrides:
            section, field = key.split(".")
            assert c[section][field] == value
        assert c.optim.batch_size % (c.loss.group_size or 1) == 0
        assert c.model.image_size == c.augment.crop_size
        assert c.model.channels == c.data.channels == len(c.augment.mean)
        strong = c.augment.color_jitter_prob > 0 and c.augment.view_blur_probs == (1.0, 0.1)
        assert strong == cell.strong, cell.name  # the claim cells: crop + flip only
        if cell.group == "m3g":
            assert c.loss.name == "m3g" and c.augment.num_views == int(cell.label[-1])
    assert {c.dataset for c in cells if c.group == "cifar10"} == {"cifar10"}
    # DINO's cells are comparable with the others of their group: the same encoder, budget,
    # views and evaluation; only the objective, its teacher and its head differ.
    shared = ("data", "augment", "eval")
    for group in ("cropflip", "strong"):
        by_label = {c.label: study.cell_config(c, epochs=2.0) for c in cells if c.group == group}
        mg, dino = by_label["matching gap"], by_label["DINO"]
        assert dino.loss.name == "dino" and dino.model.head == "dino" and dino.teacher.ema
        for section in shared:
            assert dino[section].to_dict() == mg[section].to_dict(), (group, section)
        encoder = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "init", "dtype")
        assert [dino.model[k] for k in encoder] == [mg.model[k] for k in encoder]
        assert dino.train.knn_every == mg.train.knn_every
        assert (dino.optim.num_epochs, dino.optim.batch_size, dino.optim.base_lr) == (
            mg.optim.num_epochs,
            mg.optim.batch_size,
            mg.optim.base_lr,
        )
    (collapse,) = [c for c in cells if c.group == "collapse"]
    c = study.cell_config(collapse, epochs=2.0)
    assert collapse.seed == 0 and c.loss.name == "dino" and not c.loss.centering
    claim = study.make_cells(
        [0, 1, 2], ["cropflip", "strong"], cifar10=False, claim_seeds=[0, 1, 2, 3, 4]
    )
    assert sorted({c.seed for c in claim if c.group == "cropflip"}) == [0, 1, 2, 3, 4]
    assert sorted({c.seed for c in claim if c.group == "strong"}) == [0, 1, 2]
    # M3G at equal encoder passes: k views, 2/k of the steps.
    m3g = {c.label: study.cell_config(c, epochs=2.0) for c in cells if c.group == "m3g"}
    assert [m3g[f"k={k}"].optim.num_epochs * k for k in (2, 3, 4)] == pytest.approx([4.0] * 3)
    assert not [
        c for c in study.make_cells([0], study.GROUPS, cifar10=False) if c.group == "cifar10"
    ]


def _record(group, label, seed, probe, knn):
    return {
        "name": f"{group}-{label}-{seed}",
        "group": group,
        "label": label,
        "seed": seed,
        "steps": 468,
        "minutes": 2.0,
        "train_minutes": 1.5,
        "linear_probe_top1": probe,
        "knn_top1": knn,
        "knn_curve": [[117, knn - 0.02], [468, knn]],
        "knn_curve_minutes": [0.4, 1.5],
    }


def test_report_statistics_and_paired_differences(tmp_path):
    records = {}
    for seed, (mg, nce) in enumerate([(0.80, 0.79), (0.82, 0.80), (0.84, 0.84)]):
        for label, probe in (("matching gap", mg), ("InfoNCE", nce)):
            r = _record("cropflip", label, seed, probe, probe - 0.05)
            records[r["name"]] = r
    assert "epsilon sweep" not in study.summarize(records)  # no sweep cells yet
    for seed, byol in enumerate([0.77, 0.78, 0.82]):  # 2.0 points behind InfoNCE on average
        r = _record("cropflip", "BYOL", seed, byol, byol - 0.05)
        records[r["name"]] = r
    r = _record("epsilon", "eps=0.4", 0, 0.70, 0.60)
    records[r["name"]] = r
    table = study.summarize(records)
    assert "BYOL − InfoNCE, linear probe: -2.00 points" in table
    assert table.count("within 2 points of InfoNCE") == 2
    r = _record("cropflip", "BYOL", 2, 0.815, 0.765)  # now 2.17 points behind
    table = study.summarize({**records, r["name"]: r})
    assert table.count("more than 2 points behind InfoNCE") == 2
    assert "| matching gap | 3 | 82.00 ± 2.00 | 77.00 ± 2.00 | 468 | 1.5 | 2.0 |" in table
    # The sweep's 0.2 point is the cropflip matching-gap cell, sorted by epsilon.
    assert table.index("| eps=0.2 | 3 |") < table.index("| eps=0.4 | 1 | 70.00 ± 0.00")
    # Differences 1, 2, 0: mean 1, std 1, t(0.975, 2 dof) = 4.3027 -> 1 -/+ 4.3027 / sqrt(3).
    assert (
        "cropflip: matching gap − InfoNCE, linear probe: +1.00 points, 95% interval "
        "[-1.48, +3.48] over 3 seeds (per seed +1.00, +2.00, +0.00): no difference "
        "detected"
    ) in table
    pytest.importorskip("matplotlib")
    written = study.plot(records, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == [
        "accuracy_over_training.png",
        "accuracy_vs_epsilon.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_epsilon_flatness_inside_m3g_range_and_more_views_against_two(tmp_path):
    records = {}
    for seed, noise in enumerate([0.0, 0.004, -0.004]):
        for group, label, probe in (
            ("cropflip", "matching gap", 0.82),
            ("epsilon", "eps=0.8", 0.821),
            ("epsilon", "eps=3.2", 0.819),
            ("epsilon", "eps=0.05", 0.70),  # outside M3G's range
        ):
            r = _record(group, label, seed, probe + noise, probe - 0.05 - noise)
            records[r["name"]] = r
    lines = study.flatness(records)
    assert lines[0].startswith("Epsilon flatness over eps=0.2, eps=0.8, eps=3.2 ")
    assert "means 81.90 to 82.10 (0.20 points)" in lines[2]
    assert sum("flat (no difference across epsilon detected)" in x for x in lines) == 2
    one = {k: v for k, v in records.items() if k not in ("epsilon-eps=0.8-1", "epsilon-eps=0.8-2")}
    assert study.flatness(one)[2].endswith("an epsilon with one seed: no test yet")
    for seed in range(3):  # eps 3.2 five points lower: not flat any more
        records[f"epsilon-eps=3.2-{seed}"]["linear_probe_top1"] -= 0.05
    lines = study.flatness(records)
    assert "not flat (accuracy changes with epsilon)" in lines[2]
    assert "flat (no difference" in lines[3]  # the k-NN did not move
    assert study.flatness({k: v for k, v in records.items() if "epsilon" not in k}) == []
    # Each epsilon against the claim's 0.2, paired by seed (the seed's noise cancels).
    table = study.summarize(records)
    assert (
        "epsilon: eps=3.2 − eps=0.2, linear probe: -5.10 points, 95% interval "
        "[-5.10, -5.10] over 3 seeds (per seed -5.10, -5.10, -5.10): eps=3.2 is worse "
        "(the interval is below 0)"
    ) in table
    assert "epsilon: eps=0.05 − eps=0.2, k-NN: -12.00 points" in table
    assert table.count("epsilon: eps=") == 6  # 0.05, 0.8, 3.2; never 0.2 against itself

    for seed, (k3, k4) in enumerate([(0.01, 0.01), (0.02, -0.01), (0.015, 0.0)]):
        for label, delta in (("k=2", 0.0), ("k=3", k3), ("k=4", k4)):
            r = _record("m3g", label, seed, 0.80 + delta, 0.75 + delta)
            records[r["name"]] = r
    table = study.summarize(records)
    assert (
        "m3g: k=3 − k=2, linear probe: +1.50 points, 95% interval [+0.26, +2.74] over "
        "3 seeds (per seed +1.00, +2.00, +1.50): 3 views is better"
    ) in table
    assert "m3g: k=4 − k=2, k-NN: +0.00 points" in table
    assert table.count("m3g: k=") == 4  # k = 3 and 4, probe and k-NN; never k=2 against itself


def test_paired_interval_and_verdict():
    mean, low, high = study.paired_interval([0.5, 0.7, 0.6, 0.4, 0.8])
    # std 0.1581, t(0.975, 4) = 2.7764: half-width 0.1963.
    assert (mean, low, high) == pytest.approx((0.6, 0.6 - 0.19632, 0.6 + 0.19632), abs=1e-4)
    assert study.verdict(low, high).startswith("the matching gap is better")
    assert study.verdict(-0.5, -0.1).startswith("the matching gap is worse")
    assert study.verdict(*study.paired_interval([0.3])[1:]).startswith("one seed")


def _one_cell_args(tmp_path) -> list[str]:
    """The study's flags for one crop + flip cell of one epoch, written under tmp_path."""
    return [
        "--groups=cropflip",
        "--claim_seeds=0",
        "--epochs=1",
        f"--out={tmp_path / 'out'}",
        f"--workdir={tmp_path / 'cells'}",
    ]


def test_train_seconds_integrate_the_logged_rates():
    rows = [
        {"step": 50, "train/images_per_second": 100.0},
        {"step": 100, "train/images_per_second": 200.0},
        {"step": 100, "eval/knn_top1": 0.5},
    ]
    assert study.train_seconds(rows, batch_size=10) == {0: 0.0, 50: 5.0, 100: 7.5}


def test_a_cell_run_in_two_pieces_records_the_minutes_of_both(tmp_path, monkeypatch):
    """--max_minutes stops a cell mid-way; the rerun resumes it, and its minutes are the sum
    of both pieces (not only the last one's)."""
    import json

    from matching_gap import train

    clock, calls = [0.0], []

    def fake_train(config, workdir):  # 3 minutes stopped at step 5, then 2 minutes to the end
        calls.append(workdir)
        first = len(calls) == 1
        clock[0] += 60 * (3 if first else 2)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": 5 if first else 10, "train/images_per_second": 1.0}) + "\n")
        if first:
            return train.TrainResult(step=5, num_steps=10, results={})
        return train.TrainResult(
            step=10, num_steps=10, results={"eval/linear_probe_top1": 0.8, "eval/knn_top1": 0.7}
        )

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(study.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(study, "write_report", lambda records, out: None)
    args = _one_cell_args(tmp_path)
    study.main(args + ["--max_minutes=10"])
    assert len(calls) == 1 and not os.path.exists(tmp_path / "out" / "results.json")
    study.main(args)
    with open(tmp_path / "out" / "results.json") as f:
        records = {r["name"]: r for r in json.load(f)}
    assert calls[1] == calls[0]  # the stopped cell resumed first
    assert records["cropflip-matching_gap-seed0"]["minutes"] == 5.0
    assert records["cropflip-InfoNCE-seed0"]["minutes"] == 2.0


def test_a_cell_whose_settings_changed_is_rerun_afresh_and_replaced(tmp_path, monkeypatch, capsys):
    """Changing a cell's overrides (here BYOL's momentum) reruns that cell alone, in a new
    workdir (never resuming the old settings' checkpoints), and replaces its result."""
    import json

    from matching_gap import train

    calls = []

    def fake_train(config, workdir):
        calls.append((workdir, config.loss.name, config.teacher.momentum))
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": 10, "train/images_per_second": 1.0}) + "\n")
        return train.TrainResult(
            step=10,
            num_steps=10,
            results={"eval/linear_probe_top1": 0.8, "eval/knn_top1": len(calls) / 10},
        )

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(study, "write_report", lambda records, out: None)
    args = _one_cell_args(tmp_path)
    study.main(args)
    assert len(calls) == 4  # matching gap, InfoNCE, BYOL, DINO
    original = study._loss_overrides
    monkeypatch.setattr(
        study,
        "_loss_overrides",
        lambda loss: tuple(
            (k, 0.5 if k == "teacher.momentum" and loss == "byol" else v) for k, v in original(loss)
        ),
    )
    capsys.readouterr()
    study.main(args)
    before = dict(original("byol"))["teacher.momentum"]
    assert f"cropflip-BYOL-seed0: teacher.momentum {before} -> 0.5" in capsys.readouterr().out
    assert len(calls) == 5 and calls[4][1:] == ("byol", 0.5)
    assert calls[4][0] != calls[2][0]  # BYOL's first run was the third
    study.main(args)  # nothing left to do
    assert len(calls) == 5
    with open(tmp_path / "out" / "results.json") as f:
        records = {r["name"]: r for r in json.load(f)}
    assert records["cropflip-BYOL-seed0"]["knn_top1"] == 0.5
    assert ["teacher.momentum", 0.5] in records["cropflip-BYOL-seed0"]["overrides"]
    assert records["cropflip-InfoNCE-seed0"]["knn_top1"] == 0.2


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--groups=cropflip,bogus", "unknown group(s) ['bogus']"),
        ("--seeds=0,a", "'0,a' is not a comma-separated list of integers"),
    ],
)
def test_bad_arguments_stop_with_a_message_before_anything_is_written(
    tmp_path, capsys, arg, message
):
    with pytest.raises(SystemExit) as exit_info:
        study.main([arg, f"--out={tmp_path / 'out'}", f"--workdir={tmp_path / 'cells'}"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
