"""``--mode=plan``: slice names, the analytic FLOP count, the collectives parser, plans on
``cpu-4`` and (with libtpu) on a TPU slice, and the one-line answers to what cannot run."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from matching_gap import config_lib, errors, main, plan, schema

ROOT = os.path.join(os.path.dirname(__file__), "..")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]', Linux x86-64)"
)
PLAN_KEYS = {
    "topology",
    "devices",
    "device_kind",
    "global_batch",
    "per_device_batch",
    "hbm_per_device_bytes",
    "memory",
    "fits",
    "flops_per_device_compiler",
    "flops_per_device_analytic",
    "collectives",
    "images_per_second_per_device",
    "chip_hours_for_recipe",
}


def load(name, arg=None):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", name), arg)


@pytest.mark.parametrize(
    "name,chips,layout",
    [
        ("v4-8", 4, (2, 2, 1)),
        ("v4-32", 16, (2, 2, 4)),
        ("v4-128", 64, (4, 4, 4)),
        ("v5p-128", 64, (4, 4, 4)),
        ("v5p-256", 128, (4, 4, 8)),
        ("v5litepod-1", 1, (1, 1)),
        ("v5litepod-8", 8, (2, 4)),
        ("v5litepod-256", 256, (16, 16)),
        ("v5e-32", 32, (4, 8)),
        ("v6e-64", 64, (8, 8)),
        ("cpu-4", 4, (4,)),
    ],
)
def test_slice_names_map_to_maxtexts_layouts(name, chips, layout):
    _, count, shape = plan.parse_topology(name)
    assert (count, shape) == (chips, layout)


@pytest.mark.parametrize("name", ["v4-33", "v4-2", "v7-8", "tpu", "v6e-", "cpu-0", "v5p-x"])
def test_a_bad_slice_name_lists_the_valid_ones(name):
    with pytest.raises(errors.ConfigError, match="v5litepod-256"):
        plan.parse_topology(name)


def test_analytic_flops_equal_a_hand_count_of_a_tiny_vit():
    config = load("default.py", "smoke")
    config.model.update(
        variant="",
        width=8,
        depth=1,
        num_heads=2,
        mlp_dim=16,
        patch_size=4,
        image_size=8,
        channels=1,
        projector_hidden_dim=16,
        projector_dim=4,
        projector_layers=2,
        use_predictor=False,
        stem_channels=0,
    )
    config.data.update(image_size=8, channels=1)
    config.augment.update(crop_size=8, num_views=2, num_local_crops=0)
    config.teacher.ema = False
    config.optim.batch_size = 2
    # One image: 4 patches of 4x4x1 pixels + a CLS token = 5 tokens of width 8.
    patch_embed = 2 * 4 * 16 * 8  # 1024
    block = (2 * 5 * 8 * 24) + 2 * (2 * 5 * 5 * 8) + (2 * 5 * 8 * 8) + (2 * 2 * 5 * 8 * 16)
    projector = 2 * 8 * 16 + 2 * 16 * 4
    forward = patch_embed + block + projector  # 7328
    # Forward + backward; the patch embedding needs no gradient of the pixels.
    per_view = 3 * forward - patch_embed
    assert plan.analytic_flops(schema.parse(config)) == {
        "student": 2 * 2 * per_view,
        "teacher": 0.0,
        "total": 2 * 2 * per_view,
    }
    # With an EMA teacher: its forward (encoder + projector) on the two views on top.
    config.teacher.ema = True
    assert plan.analytic_flops(schema.parse(config))["teacher"] == 2 * 2 * forward


def test_collectives_are_parsed_with_their_bytes():
    hlo = "\n".join(
        [
            "  %ag = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), ...",
            "  %agd = f32[16,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[16,8]{1,0}) %ag)",
            "  %ar = (bf16[10]{0}, f32[3,3]{1,0}) all-reduce(bf16[10]{0} %a, f32[3,3]{1,0} %b)",
            "  %add = f32[16,8]{1,0} add(f32[16,8]{1,0} %x, f32[16,8]{1,0} %y)",
        ]
    )
    found = plan.collectives(hlo)
    assert [(c.kind, c.arrays) for c in found] == [
        ("all-gather", (("f32", (16, 8)),)),
        ("all-reduce", (("bf16", (10,)), ("f32", (3, 3)))),
    ]
    assert plan.summarize_collectives(found) == {
        "all-gather": {"count": 1, "bytes": 16 * 8 * 4},
        "all-reduce": {"count": 1, "bytes": 10 * 2 + 9 * 4},
    }


def _check_plan(result, devices, batch):
    assert set(result) >= PLAN_KEYS
    assert result["devices"] == devices and result["global_batch"] == batch
    assert result["per_device_batch"] == batch // devices
    m = result["memory"]
    assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"] > 0
    # The donated state: the step's output state reuses its input's buffers.
    assert m["alias"] > 0
    # The gradients are summed across devices once per step.
    assert result["collectives"]["all-reduce"]["count"] >= 1
    # XLA counts the matmuls and the elementwise work, the softmax, the optimiser...
    ratio = result["flops_per_device_compiler"] / result["flops_per_device_analytic"]
    assert 1.0 <= ratio < 2.0, ratio


def test_plan_of_the_smoke_config_on_cpu_4():
    config = load("default.py", "smoke")
    result = plan.plan_run(config, plan.get_topology("cpu-4"))
    _check_plan(result, 4, config.optim.batch_size)
    assert result["hbm_per_device_bytes"] is None and result["fits"]
    assert result["chip_hours_for_recipe"] is None  # no published peak for a CPU


@needs_libtpu
@pytest.mark.slow
def test_plan_of_the_smoke_config_on_a_tpu_slice(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "matching_gap.main",
            "--config=configs/vitb16.py:smoke",
            "--mode=plan",
            "--topology=v4-8",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # libtpu's start-up warnings are silenced
    assert "TPU v4" in result.stdout and "chip-hours" in result.stdout
    with open(tmp_path / "plan.json") as f:
        saved = json.load(f)
    _check_plan(saved, 4, 16)
    assert saved["device_kind"] == "TPU v4" and saved["layout"] == "v4:2x2x1"
    assert saved["fits"] and saved["hbm_per_device_bytes"] == plan.CHIPS["v4"].hbm_bytes
    assert set(saved["images_per_second_per_device"]) == {"30%", "40%", "50%"}
    steps = saved["recipe_steps"]
    expected = steps * saved["flops_per_device_analytic"] * 4 / (0.4 * 275e12) / 3600
    assert saved["chip_hours_for_recipe"] == pytest.approx(expected)


@needs_libtpu
def test_a_step_that_cannot_fit_is_one_line_with_the_levers():
    config = load("vitb16.py", "smoke")
    # 224-pixel crops of 8-pixel patches: 785 tokens per view, 16k images per v4 chip.
    config.data.image_size = config.augment.crop_size = config.model.image_size = 224
    config.augment.local_crop_size = 96
    config.optim.batch_size = 4 * 16384
    with pytest.raises(plan.DoesNotFitError) as caught:
        plan.plan_run(config, plan.get_topology("v4-8"))
    message = str(caught.value)
    assert "\n" not in message
    for lever in ("optim.batch_size", "model.remat=True", "train.fsdp=True", "local crops"):
        assert lever in message, message


def test_without_libtpu_a_tpu_slice_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu raises ImportError
    with pytest.raises(errors.ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        plan.get_topology("v4-8")


@pytest.mark.parametrize(
    "topology,expected",
    [
        (["--topology=v9-8"], "error: --topology='v9-8' is not a slice name"),
        ([], "error: --mode=plan needs --topology (e.g. v4-32,"),  # the flag's default: None
    ],
)
def test_plan_needs_a_topology_and_says_so(topology, expected):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "matching_gap.main",
            "--config=configs/default.py:smoke",
            "--mode=plan",
            *topology,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == main.USER_ERROR_STATUS
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert jax.device_count() == 4  # this process was not touched
