"""The real training loop, end to end, on mocked TFDS data (seconds per run)."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matching_gap import checkpointing, config_lib, data, errors, metrics, schema, train
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib
from matching_gap.evaluation import encoder, evaluate

ROOT = os.path.join(os.path.dirname(__file__), "..")


def mocked():
    """TFDS's mock data (random images and labels) for the smoke configs."""
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=64)


def run(config, workdir):
    with mocked():
        return train.train_and_evaluate(config, str(workdir))


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


# The default suite runs shared weights and the paper's recipe (EMA teacher, predictor,
# multi-crop); the slow pass runs every recipe (M3G's objective: tests/test_objectives.py).
_slow = pytest.mark.slow
SMOKE = [
    ("default.py", "smoke"),
    pytest.param("default.py", "smoke,info_nce", marks=_slow),
    pytest.param("default.py", "smoke,byol", marks=_slow),
    ("vitb16.py", "smoke"),
    pytest.param("vitb16.py", "strong,smoke", marks=_slow),
    pytest.param("vits16.py", "smoke", marks=_slow),
    pytest.param("m3g_vitb16.py", "k=2,smoke", marks=_slow),
    pytest.param("m3g_vitb16.py", "k=3,smoke", marks=_slow),
    pytest.param("m3g_vitb16.py", "k=4,smoke", marks=_slow),
    pytest.param("cifar10.py", "smoke", marks=_slow),
    ("dino_vits16.py", "smoke"),
]


@pytest.mark.parametrize("name,arg", SMOKE)
def test_smoke_variant_trains_three_steps(tmp_path, name, arg):
    config = load(name, arg)
    outcome = run(config, tmp_path)
    assert outcome.finished and outcome.step == outcome.num_steps == 3
    records = metrics.read_metrics(str(tmp_path))
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    if config.loss.name in ("matching_gap", "m3g"):
        assert all(r["sinkhorn/sinkhorn_iterations"] > 0 for r in records if "train/loss" in r)
        assert all(
            r["train/matching_gap" if config.loss.name == "matching_gap" else "train/m3g"] >= -1e-4
            for r in records
            if "train/loss" in r
        )
    assert [r["step"] for r in records if "eval/knn_top1" in r] == [2, 3]
    final = [r for r in records if "eval/linear_probe_top1" in r]
    assert len(final) == 1 and final[0]["step"] == 3
    for key, value in outcome.results.items():  # what is returned is what was written
        assert final[0][key] == pytest.approx(value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def _brute_force_knn(train_x, train_labels, test_x, test_labels, num_classes, config):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(test_x) @ unit(train_x).T
    top = np.argsort(-sims, axis=1)[:, : config.eval.knn_k]
    votes = np.zeros((len(test_x), num_classes))
    for i, row in enumerate(top):
        np.add.at(votes[i], train_labels[row], np.exp(sims[i, row] / config.eval.knn_temperature))
    return np.mean(votes.argmax(1) == test_labels)


def test_final_knn_equals_a_brute_force_vote_on_the_saved_encoder_and_on_pixels(tmp_path):
    config = quiet_smoke()
    config.train.final_eval = True
    config.train.compare_random_init = False
    config.train.compare_raw_pixels = True
    outcome = run(config, tmp_path)
    encode, _ = encoder.load_encoder(str(tmp_path))
    with mocked():
        data_config = schema.parse(config).data
        fit = data.load_split(data_config, config.data.eval_train_split)
        report = data.load_split(data_config, config.data.eval_split)
    train_x, test_x = np.asarray(encode(fit.images)), np.asarray(encode(report.images))
    expected = _brute_force_knn(train_x, fit.labels, test_x, report.labels, fit.num_classes, config)
    assert outcome.results["eval/knn_top1"] == pytest.approx(expected, abs=1e-9)
    # Raw pixels: the normalised evaluation view (the full 28-pixel image here), flattened.
    mean, std = config.augment.mean[0], config.augment.std[0]
    pixels = lambda x: ((x / 255.0 - mean) / std).reshape(len(x), -1)
    expected = _brute_force_knn(
        pixels(fit.images),
        fit.labels,
        pixels(report.images),
        report.labels,
        fit.num_classes,
        config,
    )
    assert outcome.results["eval/raw_pixels_knn_top1"] == pytest.approx(expected, abs=1e-9)
    # (Random mock labels make that accuracy coarse: the features themselves, exactly.)
    encode_pixels = encoder.make_encode(schema.parse(config), None, raw_pixels=True)
    np.testing.assert_allclose(
        encode_pixels(None, fit.images[:8]), pixels(fit.images[:8]), rtol=1e-6, atol=1e-6
    )
    assert 0 <= outcome.results["eval/raw_pixels_linear_probe_top1"] <= 1


def test_resume_continues_at_the_right_step_and_matches_uninterrupted(tmp_path):
    config = quiet_smoke()
    run(config, tmp_path / "straight")

    config.train.run_steps = 2  # interrupted after step 2 (and checkpointed) ...
    outcome = run(config, tmp_path / "resumed")
    assert not outcome.finished and outcome.step == 2 and outcome.results == {}
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]
    run(config, tmp_path / "resumed")  # ... then resumed
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


def test_metrics_of_steps_flushed_at_a_checkpoint_are_written(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 7
    config.train.update(log_every=3, checkpoint_every=2, keep_checkpoints=5)
    run(config, tmp_path)
    records = metrics.read_metrics(str(tmp_path))
    # Steps 1-2 end at the checkpoint 2, 3 at the log step 3, 4 at checkpoint 4, ...
    assert [r["step"] for r in records] == [2, 3, 4, 6, 7]
    learning_rates = [r["train/lr"] for r in records]
    assert learning_rates[0] == pytest.approx(np.mean(_lr(config, [0, 1])))  # steps 1 and 2
    assert learning_rates[1] == pytest.approx(_lr(config, [2])[0])  # step 3 alone


def _lr(config, steps):
    _, schedules = state_lib.make_optimizer(config, config.optim.num_steps, 1)
    return [float(schedules["lr"](s)) for s in steps]


def test_a_restart_writes_each_step_once(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 4
    config.train.update(log_every=1, checkpoint_every=2)
    run(config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # killed after logging step 4, before saving
    run(config, tmp_path)  # resumes at 2 and redoes 3 and 4
    steps = [r["step"] for r in metrics.read_metrics(str(tmp_path))]
    assert steps == [1, 2, 3, 4]


def test_the_time_limit_is_process_0s_decision(tmp_path, monkeypatch):
    config = quiet_smoke()
    config.train.time_limit_minutes = 1e-9  # over at once on this process's clock ...
    monkeypatch.setattr(train, "_agree", lambda local: False)  # ... not on process 0's
    assert run(config, tmp_path / "agreed_to_go_on").finished
    monkeypatch.setattr(train, "_agree", lambda local: True)
    config.train.time_limit_minutes = 1e9
    outcome = run(config, tmp_path / "agreed_to_stop")
    assert outcome.step == 1 and not outcome.finished  # the first log step


def test_the_jitted_step_donates_the_state():
    config = schema.parse(quiet_smoke())
    optimizer, schedules = state_lib.make_optimizer(config, 3, 1)
    mesh = sharding_lib.make_mesh()  # as the smoke runs: their compiled step is cached
    graphdef, _, shardings = state_lib.abstract_train_state(config, optimizer, mesh)
    state = state_lib.init_train_state(config, optimizer, shardings)
    images = np.zeros((config.optim.batch_size, 28, 28, 1), np.uint8)
    new, _ = train.jit_train_step(config, graphdef, optimizer, schedules, mesh, shardings)(
        state, images
    )
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_a_transient_read_error_is_retried_not_quarantined(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "RESTORE_RETRY_SECONDS", 0.0)
    state = {"w": np.arange(4.0)}
    ckpt = checkpointing.Checkpointer(str(tmp_path), every=1)
    ckpt.save(1, state)
    ckpt.close()
    ckpt = checkpointing.Checkpointer(str(tmp_path), every=1)
    real_read, calls = ckpt._read, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection reset")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(ckpt, "_read", flaky)
    np.testing.assert_array_equal(ckpt.restore_latest(state)["w"], state["w"])
    assert len(calls) == 2 and not (tmp_path / "corrupt_checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 2
    run(config, tmp_path)
    config.optim.num_steps = 4
    config.optim.base_lr = 1e30  # explodes the parameters after one update
    config.optim.grad_clip = 0.0
    with pytest.raises(train.NonFiniteLossError, match=r"at step 4"):
        run(config, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_workdir_of_another_model_is_refused(tmp_path):
    config = quiet_smoke()
    config.optim.num_steps = 2
    run(config, tmp_path)
    config.model.width = 48
    with pytest.raises(errors.WorkdirError, match="different model"):
        run(config, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"]["width"] == 32  # not overwritten


def test_missing_data_fails_fast_with_the_fixes_and_writes_nothing(tmp_path):
    config = load("default.py")
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(errors.DataNotFoundError, match="apt-get install"):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_weight_decay_skips_biases_norms_cls_token_and_position_embeddings():
    config = schema.parse(load("default.py", "smoke"))
    optimizer, _ = state_lib.make_optimizer(config, 10, 1)
    state = jax.jit(lambda: state_lib.create_train_state(config, optimizer)[1])()
    zeros = jax.tree.map(np.zeros_like, state.params)
    updates, _ = jax.jit(optimizer.update)(zeros, state.opt_state, state.params)
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
    run(config, tmp_path)
    encode, saved_config = encoder.load_encoder(str(tmp_path))
    config = schema.parse(config)
    assert saved_config == config
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    features = np.asarray(encode(images))

    graphdef, init_params = nnx.split(state_lib.create_model(config))

    def features_of(params):  # the same features by hand, from a parameter tree
        model = nnx.merge(graphdef, params)
        view = augment.center_view(images, config.augment)
        return np.asarray(model.encode(view, config.eval.features))

    np.testing.assert_allclose(features, features_of(saved_params(tmp_path, 2)), atol=1e-5)
    init = features_of(nnx.to_pure_dict(init_params))
    assert features.shape == (5, 2 * config.model.width) and not np.allclose(features, init)
    with pytest.raises(ValueError, match=r"images \[N, 28, 28, 1\]"):
        encode(images[:, :14])
    with pytest.raises(errors.WorkdirError, match="--workdir of a training run"):
        encoder.load_encoder(str(tmp_path / "nothing"))
    if jax.default_backend() != "gpu":  # a run trained with cuDNN attention, read on a CPU
        saved = json.loads((tmp_path / "config.json").read_text())
        saved["model"]["attention"] = "cudnn"
        (tmp_path / "config.json").write_text(json.dumps(saved))
        encode, _ = encoder.load_encoder(str(tmp_path))
        np.testing.assert_array_equal(encode(images), features)


def write_image_folder(root, train_count: int, *, formats=("jpg",)) -> None:
    """``root/{train,val}/{circle,stripes}/*``: ``train_count`` and 3 images per class,
    saved in turn in each of ``formats``; bright stripes on every 4th row mark the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_count), ("val", 3)):
        for c, cls in enumerate(["circle", "stripes"]):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (60, 80, 3), dtype=np.uint8)
                pixels[::4] += np.uint8(120 * c)  # the class shows in the image
                Image.fromarray(pixels).save(folder / f"{i}.{formats[i % len(formats)]}")


def test_image_folder_config_trains_on_a_folder_of_images(tmp_path):
    write_image_folder(tmp_path / "images", 10, formats=("jpg", "png"))
    config = load("image_folder.py", "smoke")
    config.data.update(source="image_folder", data_dir=str(tmp_path / "images"))
    outcome = train.train_and_evaluate(config, str(tmp_path / "run"))
    # Bright stripes on every 4th row: even the random-init encoder separates the classes.
    assert outcome.results["eval/linear_probe_top1"] == 1.0
    assert outcome.results["eval/random_init_knn_top1"] == 1.0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "3"]
    shutil.rmtree(tmp_path / "images" / "val" / "stripes")  # a class missing from val
    with pytest.raises(errors.DataError, match="same class sub-folders"):
        evaluate.evaluate_workdir(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_sixteen_images_run_the_whole_command(tmp_path, capsys, caplog):
    """Small data is not an error: a streamed folder of 16 training images (one unreadable,
    a black image in its place, named once) trains, evaluates (k-NN with every training
    image as neighbours) and draws the pictures."""
    write_image_folder(tmp_path / "images", 8)
    truncated = tmp_path / "images" / "train" / "circle" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    config = load("image_folder.py")
    config.data.data_dir = str(tmp_path / "images")
    config.optim.update(num_steps=2, batch_size=8)
    workdir = tmp_path / "run"
    outcome = train.train_and_evaluate(config, str(workdir))
    assert {"eval/knn_top1", "eval/linear_probe_top1"} <= set(outcome.results)
    out = capsys.readouterr().out
    assert "fewer than eval.knn_k = 20; voting with all 16" in out
    skips = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(skips) == 1, [r.getMessage() for r in skips]
    assert sorted(os.listdir(workdir / "pictures")) == ["embedding.png", "neighbours.png"]
