"""A run measured while it runs: MFU, where the wall time goes, goodput across restarts, the
profile, the effective rank and the collapse line (matching_gap.monitor, efficiency, health).
"""

import datetime
import glob
import json
import math
import os
import re
import shutil
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matching_gap import data, efficiency, errors, health, losses, metrics, monitor, plan, schema
from tests.test_train import load, quiet_smoke, run

# ------------------------------------------------------------------ the table of peaks

# What JAX reports as device_kind on each chip, and the vendors' published dense rates
# (TFLOP/s per JAX device: bf16, and float32 at JAX's default matmul precision: one bf16
# pass on TPU, TF32 tensor cores on NVIDIA). v2 and v3: one JAX device per TensorCore, two
# per chip (45 and 123 TFLOPS per chip). NVIDIA's sheets quote tensor rates with sparsity,
# twice the dense ones.
PUBLISHED = {
    "TPU v2": (45 / 2, 45 / 2),
    "TPU v3": (123 / 2, 123 / 2),
    "TPU v4": (275, 275),
    "TPU v5 lite": (197, 197),
    "TPU v5": (459, 459),
    "TPU v5p": (459, 459),
    "TPU v6 lite": (918, 918),
    "NVIDIA A100-SXM4-40GB": (312, 156),
    "NVIDIA A100-SXM4-80GB": (312, 156),
    "NVIDIA A100-PCIE-40GB": (312, 156),
    "NVIDIA A100 80GB PCIe": (312, 156),
    "NVIDIA H100 80GB HBM3": (1979 / 2, 989 / 2),
    "NVIDIA H100 PCIe": (1513 / 2, 756 / 2),
    "NVIDIA H100 NVL": (1671 / 2, 835 / 2),
    "NVIDIA H200": (1979 / 2, 989 / 2),
    "NVIDIA H200 NVL": (1671 / 2, 835 / 2),
    "NVIDIA L4": (242 / 2, 120 / 2),
}


def test_the_peak_table_holds_the_published_rates_under_the_names_jax_reports():
    assert set(efficiency.PEAK_FLOPS) == set(PUBLISHED)
    for kind, (bf16, fp32) in PUBLISHED.items():
        assert efficiency.peak_flops(kind, "bfloat16") == pytest.approx(bf16 * 1e12, rel=1e-3)
        assert efficiency.peak_flops(kind, "float32") == pytest.approx(fp32 * 1e12, rel=1e-3)
    # Every generation the issue names: TPU v2, v3, v4, v5e, v5p, v6e; A100, H100, H200, L4.
    names = {p.name.split()[1] for p in efficiency.PEAK_FLOPS.values()}
    assert {"v2", "v3", "v4", "v5e", "v5p", "v6e", "A100", "H100", "H200", "L4"} <= names


def test_an_unknown_device_has_no_peak_and_no_mfu():
    for kind in ("cpu", "TPU v9", "NVIDIA H100", ""):
        assert efficiency.peak_flops(kind) is None
        assert efficiency.mfu(1e12, kind, "bfloat16") is None


def test_the_plan_and_the_trainer_read_one_table():
    for chip in set(plan.CHIPS.values()):
        assert chip.peak_flops == efficiency.PEAK_FLOPS[chip.device_kind].bfloat16
    assert plan.analytic_flops is efficiency.analytic_flops
    assert plan.CHIP_HOURS_MFU == efficiency.ASSUMED_MFU


# ------------------------------------------------------------------ rows, on a fake clock


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class _Writer:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def flush(self):
        pass


def _progress(tmp_path, config, clock, *, devices=4, kind="TPU v4", start_step=0, steps=1000):
    watch = monitor.Stopwatch(clock=clock)
    writer = _Writer()
    progress = monitor.Progress(
        config,
        str(tmp_path),
        writer,
        watch,
        num_devices=devices,
        device_kind=kind,
        start_step=start_step,
        num_steps=steps,
    )
    return progress, watch, writer


def _fetched(first, last, loss=1.0, **extra):
    return [(s, {"train/loss": loss, **extra}) for s in range(first, last + 1)]


def test_mfu_is_the_plans_flop_count_over_the_measured_time_and_the_peak(tmp_path, capsys):
    config = schema.parse(load("vitb16.py"))  # the recipe, on a faked TPU v4 slice of 4
    clock = _Clock()
    progress, watch, writer = _progress(tmp_path, config, clock)
    per_device = efficiency.analytic_flops(config)["total"] / 4  # one step, one device
    with watch.measure("compile"):
        clock.t += 30.0
    clock.t += 10 * 2.0  # 10 steps of 2 s
    progress.write(10, _fetched(1, 10))
    row = writer.rows[-1][1]
    # The compile is not training time: the rate is over the 20 s of steps only.
    assert row["perf/model_tflops_per_device"] == pytest.approx(10 * per_device / 20 / 1e12)
    assert row["perf/mfu"] == pytest.approx(10 * per_device / 20 / 275e12)
    assert row["time/compile_share"] == pytest.approx(30 / 50)
    assert row["train/images_per_second"] == pytest.approx(10 * 1024 / 50)
    for step in (20, 30):
        clock.t += 10 * 1.5
        progress.write(step, _fetched(step - 9, step))
    line = [x for x in capsys.readouterr().out.splitlines() if "Settled" in x][0]
    mfu = per_device / 1.5 / 275e12
    assert f"MFU {mfu:.1%} of a TPU v4's 275 bfloat16 TFLOP/s" in line
    planned = 0.4 * 275e12 / (per_device * 4 / 1024)  # the plan's images/s per device at 40%
    assert f"the plan assumes 40% ({planned:,.0f} images/s per device)" in line
    assert f"({1024 / 1.5 / 4:,.0f} images/s per device, 1500 ms a step)" in line
    hours = 1000 * 1.5 * 4 / 3600
    assert f"take {hours:,.1f} chip-hours ({hours * mfu / 0.4:,.1f} at the plan's MFU)" in line
    # The end: the 970 steps left at 1.5 s from now, in the host's time zone, named.
    now = datetime.datetime.now().astimezone()
    end, zone = re.search(r"end at (\S+ \S+) (\S+) \(the host's time zone\)\.$", line).groups()
    assert zone == now.tzname()
    ahead = datetime.datetime.strptime(end, "%Y-%m-%d %H:%M") - now.replace(tzinfo=None)
    assert abs(ahead.total_seconds() - 970 * 1.5) < 120, ahead


def test_an_unknown_device_reports_its_flop_rate_and_says_mfu_is_unknown(tmp_path, capsys):
    config = schema.parse(quiet_smoke())
    clock = _Clock()
    progress, _, writer = _progress(tmp_path, config, clock, devices=1, kind="cpu", steps=30)
    for step in (10, 20, 30):
        clock.t += 10.0
        progress.write(step, _fetched(step - 9, step))
    row = writer.rows[-1][1]
    assert "perf/mfu" not in row and row["perf/model_tflops_per_device"] > 0
    out = capsys.readouterr().out
    assert "MFU unknown" in out and "no published peak for 'cpu'" in out


def test_the_matching_gap_row_reads_the_loss_between_collapse_and_floor(tmp_path):
    config = schema.parse(load("vitb16.py"))  # epsilon 0.8, groups of 64, unit vectors
    clock = _Clock()
    progress, _, writer = _progress(tmp_path, config, clock)
    scale = losses.matching_gap_scale(0.8, 64)
    loss = scale["floor"] + 0.25 * (scale["collapse"] - scale["floor"])
    clock.t += 1.0
    progress.write(1, _fetched(1, 1, loss=loss, **{"sinkhorn/epsilon": 0.8}))
    row = writer.rows[-1][1]
    assert row["health/loss_at_collapse"] == pytest.approx(0.8 * math.log(64))
    assert row["health/loss_floor"] == pytest.approx(1.456, abs=1e-3)
    assert row["health/loss_progress"] == pytest.approx(0.75)


# ------------------------------------------------------------------ the real loop


class _Slowed:
    """The training batches, each handed over after a known delay."""

    def __init__(self, batches, delay):
        self._batches, self.delay, self.handed = batches, delay, []

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        self.handed.append(time.perf_counter())
        return next(self._batches)


def test_a_slowed_data_source_shows_its_delay_as_input_wait_and_says_so_once(
    tmp_path, monkeypatch, capsys
):
    delay = 0.5  # long beside the host's own work for a batch, even on a busy machine
    original, sources = data.train_iterator, []

    def slowed(*args, **kwargs):
        sources.append(_Slowed(original(*args, **kwargs), delay))
        return sources[-1]

    monkeypatch.setattr(data, "train_iterator", slowed)
    config = quiet_smoke()
    config.optim.num_steps = 16
    config.train.update(log_every=4, checkpoint_every=100)
    config.monitor.input_wait_warning = 0.3
    run(config, tmp_path)
    rows = [r for r in metrics.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    for r in rows[1:]:  # the first row's wall time holds the compilation
        wall = 4 * config.optim.batch_size / r["train/images_per_second"]
        injected = 4 * delay / wall  # the share of the window the source slept
        assert r["time/input_wait_share"] == pytest.approx(injected, abs=0.05)
        assert r["time/input_wait_share"] > 0.5
    out = capsys.readouterr().out
    assert out.count("Input-bound:") == 1, out


def test_a_fast_data_source_gives_no_input_warning(tmp_path, capsys):
    config = quiet_smoke()
    config.optim.num_steps = 12
    config.train.update(log_every=3, checkpoint_every=100)
    run(config, tmp_path)
    assert "Input-bound" not in capsys.readouterr().out


def _parts(record):
    return sum(
        record[k]
        for k in (
            "productive_step_seconds",
            "redone_step_seconds",
            *(f"{c}_seconds" for c in monitor.CATEGORIES),
        )
    )


def test_goodput_counts_the_steps_redone_after_a_lost_checkpoint(tmp_path, capsys):
    config = quiet_smoke()
    config.optim.num_steps = 6
    config.train.update(log_every=1, checkpoint_every=2, keep_checkpoints=5)
    run(config, tmp_path)
    first = json.loads((tmp_path / "goodput.json").read_text())
    assert first["invocations"] == 1 and first["restarts"] == [] and first["max_step"] == 6
    for step in ("6", "4"):  # killed after step 6 was logged, before 4 and 6 were saved
        shutil.rmtree(tmp_path / "checkpoints" / step)
    run(config, tmp_path)  # resumes at 2 and trains 3-6 again
    record = json.loads((tmp_path / "goodput.json").read_text())
    assert record["invocations"] == 2
    assert record["restarts"] == [{"resumed_from_step": 2, "reached_step": 6, "redone_steps": 4}]
    assert record["redone_steps"] == 4 and record["redone_step_seconds"] > 0
    assert _parts(record) == pytest.approx(record["wall_seconds"], rel=0.05)
    assert record["wall_seconds"] > first["wall_seconds"]
    assert record["goodput"] == pytest.approx(
        record["productive_step_seconds"] / record["wall_seconds"]
    )
    table = capsys.readouterr().out
    assert "steps redone after restarts (4)" in table and "Goodput over 2 invocation(s)" in table


def test_the_row_after_a_stop_mid_window_equals_the_uninterrupted_runs(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 8
    config.train.update(log_every=4, checkpoint_every=100)
    run(config, tmp_path / "straight")
    config.train.run_steps = 3  # stops after step 3, in the middle of the window 1-4
    run(config, tmp_path / "stopped")
    config.train.run_steps = 0
    run(config, tmp_path / "stopped")
    straight = {r["step"]: r for r in metrics.read_metrics(str(tmp_path / "straight"))}
    stopped = {r["step"]: r for r in metrics.read_metrics(str(tmp_path / "stopped"))}
    assert sorted(stopped) == [3, 4, 8] and sorted(straight) == [4, 8]
    assert stopped[3]["train/window_steps"] == 3  # the row at the stop says it is short
    for step in (4, 8):
        assert stopped[step]["train/window_steps"] == straight[step]["train/window_steps"] == 4
        for key, value in straight[step].items():
            if key.startswith(("train/loss", "train/grad", "sinkhorn/", "health/effective")):
                assert stopped[step][key] == value, key


def test_the_profile_of_a_step_range_lands_where_tensorboard_looks(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 4
    config.monitor.update(profile_start=2, profile_steps=2)
    run(config, tmp_path)
    # TensorBoard's profile plugin lists <logdir>/plugins/profile/<run>/<host>.xplane.pb ...
    found = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(found) == 1 and os.path.getsize(found[0]) > 0
    # ... and its loader (xprof, the plugin's package) finds the run and reads its tools.
    from xprof import profile_plugin

    context = types.SimpleNamespace(
        logdir=str(tmp_path / "tensorboard"),
        data_provider=None,
        flags=types.SimpleNamespace(master_tpu_unsecure_channel=""),
    )
    plugin = profile_plugin.ProfilePlugin(context)
    runs = list(plugin.generate_runs())
    assert runs == [os.path.basename(os.path.dirname(found[0]))]
    tools = list(plugin.generate_tools_of_run(runs[0], os.path.dirname(found[0])))
    assert "trace_viewer@" in tools and "op_profile" in tools, tools


def test_a_run_stopped_inside_the_profiled_range_keeps_its_trace(tmp_path, capsys):
    config = quiet_smoke()
    config.optim.num_steps = 4
    config.train.run_steps = 2  # stops after step 2 of the range 2-3
    config.monitor.update(profile_start=2, profile_steps=2)
    run(config, tmp_path)
    assert glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert "Profile of steps 2-2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"profile_start": 3, "profile_steps": 2}, "past the run's 3 steps"),
        ({"device_kind": "TPU v9"}, "monitor.device_kind"),
        ({"input_wait_warning": 1.5}, "monitor.input_wait_warning"),
        ({"collapse_rank": 0.5}, "monitor.collapse_rank"),
        ({"profile_steps": 500}, "monitor.profile_steps"),
    ],
)
def test_bad_monitor_settings_fail_before_anything_is_written(tmp_path, overrides, match):
    config = quiet_smoke()  # 3 steps
    with pytest.raises(errors.ConfigError, match=match):
        config.monitor.update(overrides)
        run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


# ------------------------------------------------------------------ health


@pytest.mark.parametrize("shape", [(64, 16), (8, 32), (16, 16)])
def test_effective_rank_equals_numpys_rankme(shape):
    x = np.random.default_rng(0).normal(size=shape) * np.linspace(0.1, 3.0, shape[1])
    s = np.linalg.svd(x, compute_uv=False)  # a second formula: the SVD, not the Gram matrix
    p = s / np.sum(s) + 1e-7
    expected = np.exp(-np.sum(p * np.log(p)))
    got = float(jax.jit(health.effective_rank)(jnp.asarray(x, jnp.float32)))
    assert got == pytest.approx(expected, rel=1e-4)


def test_effective_rank_is_one_on_a_line_and_full_on_orthogonal_rows():
    line = np.outer(np.arange(1.0, 9.0), np.ones(5))
    assert float(health.effective_rank(jnp.asarray(line))) == pytest.approx(1.0, abs=1e-3)
    assert float(health.effective_rank(jnp.eye(6))) == pytest.approx(6.0, rel=1e-4)


def test_the_collapse_watch_needs_the_whole_window_and_speaks_once():
    watch = health.CollapseWatch("matching_gap", window=3, rank_threshold=1.5)
    collapsed = {"train/loss": 1.1, "health/effective_rank": 1.02, "health/loss_progress": 0.0}
    collapsed["health/loss_at_collapse"] = 1.1
    healthy = {"train/loss": 0.5, "health/effective_rank": 12.0, "health/loss_progress": 0.4}
    # A loss at its collapse value with a healthy rank (a run's first steps) is not collapse.
    early = {**collapsed, "health/effective_rank": 3.0}
    said = [watch.update(s, r) for s, r in enumerate([early, early, early, healthy], 1)]
    assert said == [None] * 4
    said = [watch.update(s, collapsed) for s in (5, 6, 7, 8)]
    assert said[:2] == [None, None] and said[3] is None
    assert "effective rank 1.02" in said[2] and "at its collapse value" in said[2]
    dino = health.CollapseWatch("dino", window=1, rank_threshold=1.5)
    line = dino.update(1, {"health/effective_rank": 8.0, "train/target_entropy": 0.01})
    assert line and "target entropy 0.010" in line


def test_a_run_forced_to_collapse_says_so_and_a_healthy_one_does_not(tmp_path, capsys):
    # SimSiam without its predictor (BYOL's loss, no predictor, no EMA teacher): the
    # textbook collapse (Chen & He, 2021), here within a few steps at a high learning rate.
    config = quiet_smoke()
    config.optim.num_steps = 12
    config.train.update(log_every=2, checkpoint_every=100)
    healthy = config.copy_and_resolve_references()
    run(healthy, tmp_path / "healthy")
    assert "collapsed" not in capsys.readouterr().out
    config.loss.name = "byol"
    config.teacher.ema = False
    config.model.use_predictor = False
    config.optim.base_lr = 1.0
    run(config, tmp_path / "collapsed")
    out = capsys.readouterr().out
    assert out.count("The run looks collapsed") == 1, out
    assert "missing predictor or stop-gradient" in out


def test_an_unreadable_account_is_kept_aside_and_a_new_one_starts(tmp_path, capsys):
    (tmp_path / "goodput.json").write_text('{"wall_seconds": 12.0, "restarts": ')  # cut short
    account = monitor.Goodput(str(tmp_path), start_step=40)
    assert account.record()["invocations"] == 1 and account.record()["restarts"] == []
    assert (tmp_path / "goodput.json.unreadable").read_text().startswith('{"wall_seconds"')
    assert "cannot be read" in capsys.readouterr().out
    account.write()
    assert json.loads((tmp_path / "goodput.json").read_text())["max_step"] == 40


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]


@pytest.mark.parametrize("page", ["training.md", "tpu.md"])
def test_the_docs_health_table_is_what_its_command_computes(page):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "health_table.py")
    spec = importlib.util.spec_from_file_location("health_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    computed = _cells(module.table(None))  # the figures that need no run
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", page)) as f:
        doc = f.read()
    start = doc.index("|  | " + computed[0][1])
    documented = _cells(doc[start:].split("\n\n", 1)[0])
    assert [row[0] for row in documented] == [row[0] for row in computed]
    for doc_row, row in zip(documented, computed, strict=True):
        for doc_cell, cell in zip(doc_row, row, strict=True):
            if cell != "not measured":  # the demo's measured cells come from its run
                assert doc_cell == cell, (row[0], doc_cell, cell)
