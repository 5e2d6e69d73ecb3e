"""The real training loop, end to end, on mocked TFDS data (seconds per run)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matching_gap import config_lib, metrics, train

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(name, arg=None):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", name), arg)


def quiet_smoke():
    """The default smoke config without evaluations (tests of the loop's bookkeeping)."""
    config = load("default.py", "smoke")
    config.train.final_eval = False
    config.train.knn_every = 0
    return config


def saved_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))["params"]


SMOKE = [
    ("default.py", "smoke"),
    ("default.py", "smoke,info_nce"),
    ("default.py", "smoke,byol"),
    ("vitb16.py", "smoke"),
    pytest.param("vitb16.py", "strong,smoke", marks=pytest.mark.slow),
    pytest.param("vits16.py", "smoke", marks=pytest.mark.slow),
    ("m3g_vitb16.py", "k=2,smoke"),
    ("m3g_vitb16.py", "k=3,smoke"),
    ("m3g_vitb16.py", "k=4,smoke"),
    ("cifar10.py", "smoke"),
]


@pytest.mark.parametrize("name,arg", SMOKE)
def test_smoke_variant_trains_three_steps(tmp_path, name, arg):
    config = load(name, arg)
    results = train.train_and_evaluate(config, str(tmp_path))
    records = metrics.read_metrics(str(tmp_path))
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    if config.loss.name in ("matching_gap", "m3g"):
        assert all(r["sinkhorn/sinkhorn_iterations"] > 0 for r in records if "train/loss" in r)
        assert all(r["train/matching_gap" if config.loss.name == "matching_gap" else "train/m3g"]
                   >= -1e-4 for r in records if "train/loss" in r)  # fmt: skip
    assert any("eval/knn_top1" in r for r in records)
    for key in ("eval/knn_top1", "eval/linear_probe_top1"):
        assert 0.0 <= results[key] <= 1.0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def test_resume_continues_at_the_right_step_and_matches_uninterrupted(tmp_path):
    config = quiet_smoke()
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    config.train.run_steps = 2  # interrupted after step 2 (and checkpointed) ...
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]
    train.train_and_evaluate(config, str(tmp_path / "resumed"))  # ... then resumed
    steps = [r["step"] for r in metrics.read_metrics(str(tmp_path / "resumed"))]
    assert steps == [1, 2, 3]  # the second run started at step 3, not from scratch
    a = saved_params(str(tmp_path / "straight"), 3)
    b = saved_params(str(tmp_path / "resumed"), 3)
    flat_a, flat_b = _leaves(a), _leaves(b)
    assert len(flat_a) == len(flat_b) > 0
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    config.optim.num_steps = 4
    config.optim.base_lr = 1e30  # explodes the parameters after one update
    config.optim.grad_clip = 0.0
    with pytest.raises(train.NonFiniteLossError, match=r"at step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_workdir_of_another_model_is_refused(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    config.model.width = 48
    with pytest.raises(ValueError, match="different model"):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"]["width"] == 32  # not overwritten


def test_missing_data_fails_fast_with_the_fixes(tmp_path):
    config = load("default.py")
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        train.train_and_evaluate(config, str(tmp_path / "wd"))


def _main(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "matching_gap.main", *args], cwd=cwd, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def test_command_line_overrides_and_unknown_keys(tmp_path):
    config = os.path.join(ROOT, "configs", "default.py")
    bad = _main(f"--config={config}:smoke", f"--workdir={tmp_path}", "--config.loss.epsilonn=1",
                cwd=tmp_path)  # fmt: skip
    assert bad.returncode != 0
    assert "epsilonn" in bad.stderr and "epsilon" in bad.stderr
    ok = _main(f"--config={config}:smoke", f"--workdir={tmp_path}", "--config.loss.epsilon=0.5",
               "--config.train.compare_random_init=False", cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "linear_probe_top1" in ok.stdout
    records = metrics.read_metrics(str(tmp_path))
    assert records[0]["sinkhorn/epsilon"] == pytest.approx(0.5)
    evaluated = _main(f"--config={config}:smoke", f"--workdir={tmp_path}", "--mode=evaluate",
                      cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "linear_probe_top1" in evaluated.stdout


def test_weight_decay_skips_biases_norms_cls_token_and_position_embeddings():
    config = load("default.py", "smoke")
    optimizer, _ = train.make_optimizer(config, 10, 1)
    _, state = train.create_train_state(config, optimizer)
    zeros = jax.tree.map(np.zeros_like, state.params)
    updates, _ = optimizer.update(zeros, state.opt_state, state.params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    decayed = {jax.tree_util.keystr(p): bool(np.any(np.asarray(u) != 0)) for p, u in flat}
    assert any(decayed.values()) and not all(decayed.values())
    for path, value in decayed.items():
        exempt = "bias" in path or "scale" in path or "pos_embed" in path or "cls_token" in path
        assert value == (not exempt), path


def test_load_encoder_gives_the_features_of_the_saved_parameters(tmp_path):
    from flax import nnx

    from matching_gap import augment

    config = quiet_smoke()
    config.optim.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    encode, saved_config = train.load_encoder(str(tmp_path))
    assert saved_config.to_dict() == json.loads(config.to_json_best_effort())
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    features = np.asarray(encode(images))

    graphdef, init_params = nnx.split(train.create_model(config))

    def features_of(params):  # the same features by hand, from a parameter tree
        model = nnx.merge(graphdef, params)
        view = augment.center_view(images, augment.AugmentConfig.from_config(config.augment))
        return np.asarray(model.encode(view, config.eval.features))

    np.testing.assert_allclose(features, features_of(saved_params(tmp_path, 2)), atol=1e-5)
    init = features_of(nnx.to_pure_dict(init_params))
    assert features.shape == (5, 2 * config.model.width) and not np.allclose(features, init)
    with pytest.raises(ValueError, match=r"images \[N, 28, 28, 1\]"):
        encode(images[:, :14])
    with pytest.raises(FileNotFoundError, match="--workdir of a training run"):
        train.load_encoder(str(tmp_path / "nothing"))
    if jax.default_backend() != "gpu":  # a run trained with cuDNN attention, read on a CPU
        saved_config.model.attention = "cudnn"
        (tmp_path / "config.json").write_text(saved_config.to_json())
        encode, _ = train.load_encoder(str(tmp_path))
        np.testing.assert_array_equal(encode(images), features)


def test_image_folder_config_trains_on_a_folder_of_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 3)):
        for c, cls in enumerate(["circle", "stripes"]):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (60, 80, 3), dtype=np.uint8)
                pixels[::4] += np.uint8(120 * c)  # the class shows in the image
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    config = load("image_folder.py", "smoke")
    config.data.update(source="image_folder", mock=False, data_dir=str(tmp_path / "images"))
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= results["eval/linear_probe_top1"] <= 1.0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "3"]
    shutil.rmtree(tmp_path / "images" / "val" / "stripes")  # a class missing from val
    with pytest.raises(ValueError, match="same class sub-folders"):
        train.evaluate_workdir(config, str(tmp_path / "run"))
