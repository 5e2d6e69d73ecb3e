"""Weights out and in (``matching_gap.export``): the encoder written as timm and Hugging Face
ViT files gives the references' outputs, reads back bitwise, and what a format cannot hold
is refused in one line.

The references: transformers' ``FlaxViTModel`` (4.57.6, the last release with Flax models;
it reads the PyTorch-named safetensors file without torch) always; PyTorch's ``ViTModel``
and timm's ``VisionTransformer`` where torch / timm are installed (they skip otherwise).
Every parameter is randomised, so a wrong transpose, split or order shows in the outputs;
``test_*_detects_*`` break a written file on purpose and check that the comparison fails.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest
from flax import nnx

from matching_gap import config_lib, errors, export, export_run, models, schema, train
from matching_gap import state as state_lib

REPO = os.path.join(os.path.dirname(__file__), "..")
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")

# A small CLS ViT with every size distinct (width 32, 4 heads, MLP 48, 4 blocks for
# last4_cls, patch 4 on 3-channel 16 px images: a 4x4 grid).
SMALL = models.ModelConfig(
    image_size=16,
    channels=3,
    width=32,
    depth=4,
    num_heads=4,
    mlp_dim=48,
    patch_size=4,
    projector_hidden_dim=16,
    projector_dim=8,
)
PREPROCESSING = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": 0.875}
SMALL_TOLERANCE = 1e-5  # the bar for the small model
B16_TOLERANCE = 1e-4


def randomised_encoder(model_config: models.ModelConfig, seed: int = 0) -> models.ViT:
    """The encoder with every parameter drawn at random, so that no transpose, split or
    order is hidden by a symmetric or constant initialisation (zero biases, unit scales).

    Kernels get std 1 / sqrt(fan-in) and the rest std 0.5 around 0 (LayerNorm scales around
    1): the activations keep their scale through the blocks, so the attention does not
    saturate into one-hot weights, which would hide a wrong query / key order."""
    encoder = models.create_model(model_config, rngs=nnx.Rngs(seed)).encoder
    state = nnx.state(encoder, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    new = []
    for (path, leaf), key in zip(flat, keys, strict=True):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            new.append(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        else:
            new.append(0.5 * noise + (1.0 if "scale" in name else 0.0))
    nnx.update(encoder, jax.tree.unflatten(treedef, new))
    return encoder


def pure(encoder: models.ViT) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))


def images_for(model_config: models.ModelConfig, n: int = 2, seed: int = 3) -> np.ndarray:
    shape = (n, model_config.image_size, model_config.image_size, model_config.channels)
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def write(encoder, model_config, fmt, directory) -> str:
    export.write_encoder(
        pure(encoder), model_config, fmt, str(directory), preprocessing=PREPROCESSING
    )
    return str(directory)


def flax_hf_tokens(directory: str, images: np.ndarray) -> np.ndarray:
    from transformers import FlaxViTModel

    model = FlaxViTModel.from_pretrained(directory, from_pt=True, add_pooling_layer=False)
    pixel_values = images.transpose(0, 3, 1, 2)  # HF takes NCHW
    return np.asarray(model(pixel_values=pixel_values).last_hidden_state)


def max_difference(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def small():
    encoder = randomised_encoder(SMALL)
    images = images_for(SMALL)
    return encoder, images, np.asarray(encoder.tokens(images))


@pytest.fixture(scope="module")
def small_hf(small, tmp_path_factory):
    return write(small[0], SMALL, "hf", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def small_timm(small, tmp_path_factory):
    return write(small[0], SMALL, "timm", tmp_path_factory.mktemp("timm"))


# ------------------------------------------------------------------ parity with references


def test_hf_files_give_flax_vit_models_tokens(small, small_hf):
    _, images, tokens = small
    difference = max_difference(flax_hf_tokens(small_hf, images), tokens)
    print(f"small model: FlaxViTModel vs the project's tokens, max |difference| {difference:.2e}")
    assert difference < SMALL_TOLERANCE


def _b16_parity(tmp_path) -> float:
    model_config = models.ModelConfig(image_size=224, channels=3, variant="B/16")
    encoder = randomised_encoder(model_config)
    images = images_for(model_config, n=1)
    start = time.perf_counter()
    difference = max_difference(
        flax_hf_tokens(write(encoder, model_config, "hf", tmp_path), images),
        encoder.tokens(images),
    )
    print(
        f"ViT-B/16: FlaxViTModel vs the project's tokens, max |difference| {difference:.2e} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return difference


@pytest.mark.slow
def test_hf_files_give_flax_vit_models_tokens_for_vit_b16(tmp_path):
    assert _b16_parity(tmp_path) < B16_TOLERANCE


def test_hf_files_read_with_the_right_config_and_preprocessing(small_hf):
    from transformers import ViTConfig, ViTImageProcessor

    config = ViTConfig.from_pretrained(small_hf)
    assert config.layer_norm_eps == SMALL.layer_norm_eps == 1e-6
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.patch_size,
        config.image_size,
        config.num_channels,
    ) == (32, 4, 4, 48, 4, 16, 3)
    assert config.hidden_act == "gelu" and config.qkv_bias
    processor = ViTImageProcessor.from_pretrained(small_hf)
    assert processor.image_mean == list(PREPROCESSING["mean"])
    assert processor.image_std == list(PREPROCESSING["std"])
    assert processor.size == {"height": 16, "width": 16}


def test_hf_file_with_layer_norm_eps_1e_12_imports_exactly(tmp_path):
    """ViTConfig's default epsilon, 1e-12, as a model setting: the outputs match again."""
    model_config = dataclasses.replace(SMALL, layer_norm_eps=1e-12)
    encoder = randomised_encoder(model_config)
    images = images_for(model_config)
    directory = write(encoder, model_config, "hf", tmp_path)
    with open(os.path.join(directory, export.CONFIG_FILE)) as f:
        assert json.load(f)["layer_norm_eps"] == 1e-12
    assert max_difference(flax_hf_tokens(directory, images), encoder.tokens(images)) < 1e-5
    back, _ = export.read_encoder(dataclasses.replace(model_config, init_from=directory))
    assert_bitwise_equal(back, pure(encoder))
    with pytest.raises(errors.ConfigError, match=r"layer_norm_eps=1e-12 .*model\.layer_norm_eps"):
        export.read_encoder(dataclasses.replace(SMALL, init_from=directory))


def test_hf_files_give_torch_vit_models_tokens(small, small_hf):
    torch = pytest.importorskip("torch")
    from transformers import ViTModel

    _, images, tokens = small
    model = ViTModel.from_pretrained(small_hf, add_pooling_layer=False).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    assert max_difference(out.last_hidden_state.numpy(), tokens) < SMALL_TOLERANCE


def test_timm_files_give_timm_vision_transformers_tokens(small, small_timm):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    encoder, images, tokens = small
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with open(os.path.join(small_timm, export.CONFIG_FILE)) as f:
        model_args = json.load(f)["model_args"]
    fresh = timm.create_model(export.TIMM_ARCHITECTURE, pretrained=False, **model_args).eval()
    fresh.load_state_dict(load_file(os.path.join(small_timm, export.WEIGHTS_FILE)), strict=True)
    loaded = timm.create_model(f"local-dir:{small_timm}", pretrained=True).eval()
    with torch.no_grad():
        for model in (fresh, loaded):
            assert max_difference(model.forward_features(x).numpy(), tokens) < SMALL_TOLERANCE
        # The evaluators' last4_cls: the CLS tokens of the last 4 blocks after the final norm.
        blocks = loaded.get_intermediate_layers(x, n=4, norm=True, return_prefix_tokens=True)
        last4 = np.concatenate([prefix[:, 0].numpy() for _, prefix in blocks], axis=-1)
    model = models.SSLModel(encoder, None)
    assert max_difference(last4, model.encode(images, "last4_cls")) < SMALL_TOLERANCE


# ---------------------------------------------------- the comparisons can fail: broken files


def _rewrite(directory: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, export.WEIGHTS_FILE)
    tensors = load_file(path)
    change(tensors)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )


def _transpose_one(tensors):
    key = "encoder.layer.1.attention.output.dense.weight"  # square: the shape still fits
    tensors[key] = tensors[key].T


def _swap_query_and_key(tensors):
    for kind in ("weight", "bias"):
        q, k = (f"encoder.layer.0.attention.attention.{p}.{kind}" for p in ("query", "key"))
        tensors[q], tensors[k] = tensors[k], tensors[q]


@pytest.mark.parametrize("break_file", [_transpose_one, _swap_query_and_key])
def test_parity_detects_a_broken_mapping(small, tmp_path, break_file):
    encoder, images, tokens = small
    directory = write(encoder, SMALL, "hf", tmp_path)
    _rewrite(directory, break_file)
    assert max_difference(flax_hf_tokens(directory, images), tokens) > 100 * SMALL_TOLERANCE


def test_safetensors_is_given_contiguous_arrays(small):
    """The trap: safetensors' numpy writer stores a transposed view's buffer as if it were
    laid out in order; the export makes every array contiguous first."""
    tensors = export.to_timm(pure(small[0]), SMALL)
    assert all(t.flags.c_contiguous and t.dtype == np.float32 for t in tensors.values())


# --------------------------------------------------------------- names, shapes, round trips


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_timm_names_and_shapes_are_timms(small_timm):
    """The keys and shapes of timm's VisionTransformer (num_classes=0) for these sizes."""
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(small_timm, export.WEIGHTS_FILE))
    expected = {
        "cls_token": (1, 1, 32),
        "pos_embed": (1, 17, 32),
        "patch_embed.proj.weight": (32, 3, 4, 4),
        "patch_embed.proj.bias": (32,),
        "norm.weight": (32,),
        "norm.bias": (32,),
    }
    block = {
        "norm1.weight": (32,),
        "norm1.bias": (32,),
        "attn.qkv.weight": (96, 32),
        "attn.qkv.bias": (96,),
        "attn.proj.weight": (32, 32),
        "attn.proj.bias": (32,),
        "norm2.weight": (32,),
        "norm2.bias": (32,),
        "mlp.fc1.weight": (48, 32),
        "mlp.fc1.bias": (48,),
        "mlp.fc2.weight": (32, 48),
        "mlp.fc2.bias": (32,),
    }
    for i in range(4):
        expected.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    with open(os.path.join(small_timm, export.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["num_classes"] == 0 and config["architecture"] == export.TIMM_ARCHITECTURE
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["num_heads"] == 4
    assert config["pretrained_cfg"]["mean"] == list(PREPROCESSING["mean"])
    assert config["pretrained_cfg"]["std"] == list(PREPROCESSING["std"])
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]


@pytest.mark.parametrize("fmt,pooling", [("timm", "cls"), ("hf", "cls"), ("timm", "mean")])
def test_export_then_import_is_bitwise(fmt, pooling, tmp_path):
    model_config = dataclasses.replace(SMALL, pooling=pooling)
    encoder = randomised_encoder(model_config, seed=5)
    directory = write(encoder, model_config, fmt, tmp_path)
    back, skipped = export.read_encoder(dataclasses.replace(model_config, init_from=directory))
    assert skipped == []
    assert_bitwise_equal(back, pure(encoder))


def test_every_encoder_parameter_is_mapped_once(small):
    params = pure(small[0])
    params["extra"] = np.zeros(3, np.float32)
    with pytest.raises(errors.ConfigError, match="no timm name: \\['extra'\\]"):
        export.to_timm(params, SMALL)
    del params["extra"], params["norm"]["bias"]
    with pytest.raises(KeyError, match="norm.bias"):
        export.to_timm(params, SMALL)


def test_a_model_of_other_sizes_is_refused(small_timm):
    other = dataclasses.replace(SMALL, width=64, mlp_dim=96, init_from=small_timm)
    with pytest.raises(errors.ConfigError, match=r"model\.width=64 \(the file: 32\)"):
        export.read_encoder(other)


def test_a_timm_config_without_model_args_gives_the_heads_of_its_architecture(small_timm, tmp_path):
    """timm's hub configs name the architecture and leave ``model_args`` out: the heads
    are those of the named size (S: 6), which the small model's 4 are not."""
    import shutil

    directory = str(tmp_path / "hub")
    shutil.copytree(small_timm, directory)
    path = os.path.join(directory, export.CONFIG_FILE)
    with open(path) as f:
        config = json.load(f)
    del config["model_args"]
    config["architecture"] = "vit_small_patch16_224.dino"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(errors.ConfigError, match=r"model\.num_heads=4 \(the file: 6\)"):
        export.read_encoder(dataclasses.replace(SMALL, init_from=directory))


def test_classifier_and_pooler_are_skipped(small, small_hf, tmp_path):
    """An HF ViTForImageClassification file (``vit.`` prefix, a classifier) and a pooler."""
    import shutil

    directory = str(tmp_path / "classifier")
    shutil.copytree(small_hf, directory)

    def as_classifier(tensors):
        for key in list(tensors):
            tensors["vit." + key] = tensors.pop(key)
        tensors["classifier.weight"] = np.zeros((10, 32), np.float32)
        tensors["vit.pooler.dense.weight"] = np.zeros((32, 32), np.float32)

    _rewrite(directory, as_classifier)
    back, skipped = export.read_encoder(dataclasses.replace(SMALL, init_from=directory))
    assert skipped == ["classifier.weight", "pooler.dense.weight"]
    assert_bitwise_equal(back, pure(small[0]))


# --------------------------------------------------------------------------------- refusals


def test_mean_pooling_cannot_go_to_hf(tmp_path):
    model_config = dataclasses.replace(SMALL, pooling="mean")
    with pytest.raises(errors.ConfigError, match=r"model\.pooling='mean'") as error:
        write(randomised_encoder(model_config), model_config, "hf", tmp_path)
    assert "\n" not in str(error.value)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_a_conv_stem_cannot_go_to_either_format(fmt, tmp_path):
    model_config = dataclasses.replace(SMALL, stem_channels=8)
    with pytest.raises(errors.ConfigError, match=r"model\.stem_channels=8") as error:
        write(randomised_encoder(model_config), model_config, fmt, tmp_path)
    assert "\n" not in str(error.value)
    assert not os.listdir(tmp_path)


def test_a_conv_stem_cannot_be_started_from_a_file():
    with pytest.raises(errors.ConfigError, match=r"model\.stem_channels=8"):
        dataclasses.replace(SMALL, stem_channels=8, init_from="somewhere")


def _add_layer_scale(tensors):
    tensors["blocks.0.ls1.gamma"] = np.ones(32, np.float32)


def _add_registers(tensors):
    tensors["reg_token"] = np.zeros((1, 4, 32), np.float32)


def _add_norm_pre(tensors):
    tensors["norm_pre.weight"] = np.ones(32, np.float32)
    tensors["norm_pre.bias"] = np.zeros(32, np.float32)


def _drop_qkv_bias(tensors):
    del tensors["blocks.2.attn.qkv.bias"]


@pytest.mark.parametrize(
    "variant,key",
    [
        (_add_layer_scale, "blocks.0.ls1.gamma"),
        (_add_registers, "reg_token"),
        (_add_norm_pre, "norm_pre.weight"),
        (_drop_qkv_bias, "blocks.2.attn.qkv.weight"),
    ],
)
def test_timm_variants_are_refused_by_key_and_nothing_is_loaded(small_timm, tmp_path, variant, key):
    import shutil

    directory = str(tmp_path / "variant")
    shutil.copytree(small_timm, directory)
    _rewrite(directory, variant)
    with pytest.raises(errors.ConfigError, match=f"key '{key}'") as error:
        export.read_encoder(dataclasses.replace(SMALL, init_from=directory))
    assert "\n" not in str(error.value) and "nothing was loaded" in str(error.value)


def test_hf_qkv_without_bias_is_refused(small_hf, tmp_path):
    import shutil

    directory = str(tmp_path / "no_bias")
    shutil.copytree(small_hf, directory)
    path = os.path.join(directory, export.CONFIG_FILE)
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(config, qkv_bias=False), f)
    with pytest.raises(errors.ConfigError, match="qkv_bias=False"):
        export.read_encoder(dataclasses.replace(SMALL, init_from=directory))


# ------------------------------------------------------------ the command line and the config


def test_export_config_is_checked():
    config = config_lib.load_config_file(DEFAULT_CONFIG)
    config.export.format = "onnx"
    with pytest.raises(errors.ConfigError, match=r"export\.format must be one of"):
        config_lib.validate(config)


def test_the_default_layer_norm_eps_is_the_models_old_constant():
    encoder = models.create_model(SMALL, rngs=nnx.Rngs(0)).encoder
    assert encoder.norm.epsilon == encoder.blocks[0].norm1.epsilon == 1e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run's workdir holding one checkpoint whose EMA teacher differs from the student."""
    from matching_gap import checkpointing

    config = config_lib.load_config_file(DEFAULT_CONFIG, "smoke")
    config.teacher.ema = True
    workdir = str(tmp_path_factory.mktemp("run"))
    optimizer, _ = state_lib.make_optimizer(config, 2, 1)
    _, state = state_lib.create_train_state(schema.parse(config), optimizer)
    teacher = jax.tree.map(lambda x: x + 1.0, state.params)
    state = state.replace(teacher=teacher)
    checkpointing.write_config(workdir, config)
    ckpt = checkpointing.Checkpointer(workdir)
    ckpt.save(1, state, force=True)
    ckpt.close()
    return config, workdir, teacher["encoder"]


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_mode_writes_the_ema_teacher(workdir, fmt, tmp_path):
    config, directory, teacher = workdir
    config = config.copy_and_resolve_references()
    config.export.update(format=fmt, dir=str(tmp_path / "out"))
    paths = export_run.export_workdir(config, directory)
    names = sorted(os.path.basename(p) for p in paths)
    expected = ["config.json", "model.safetensors"]
    assert names == (expected + ["preprocessor_config.json"] if fmt == "hf" else expected)
    model_config = schema.parse(config).model
    out = str(tmp_path / "out")
    back, _ = export.read_encoder(dataclasses.replace(model_config, init_from=out))
    assert_bitwise_equal(back, jax.device_get(teacher))


def test_evaluate_starts_from_init_from_without_a_checkpoint(workdir, tmp_path):
    config, directory, teacher = workdir
    config = config.copy_and_resolve_references()
    config.export.update(format="timm", dir=str(tmp_path / "out"))
    export_run.export_workdir(config, directory)
    config.model.init_from = str(tmp_path / "out")
    config = schema.parse(config)
    _, params, step = state_lib.restore_encoder(config, str(tmp_path / "empty"))
    assert step == 0
    assert_bitwise_equal(jax.device_get(params["encoder"]), jax.device_get(teacher))


def run_main(*args: str):
    import subprocess
    import sys

    command = [sys.executable, "-m", "matching_gap.main", "--mode=export", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_command_line_exports_and_refuses_in_one_line(workdir, tmp_path):
    _, directory, teacher = workdir
    run = (
        "--config=configs/default.py:smoke",
        f"--workdir={directory}",
        "--config.teacher.ema=True",
    )
    out = tmp_path / "out"
    result = run_main(*run, "--config.export.format=hf", f"--config.export.dir={out}")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    refused = run_main(
        *run,
        "--config.export.format=hf",
        "--config.model.stem_channels=4",
        f"--config.export.dir={tmp_path / 'no'}",
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "error: model.stem_channels=4: a convolutional stem has no counterpart in timm's or "
        "Hugging Face's ViT, so this encoder cannot be exported."
    ]
    assert not (tmp_path / "no").exists()


def test_a_run_starts_from_init_from_in_student_and_teacher(workdir, tmp_path):
    from matching_gap import sharding as sharding_lib

    config, directory, teacher = workdir
    config = config.copy_and_resolve_references()
    config.export.update(format="hf", dir=str(tmp_path / "out"))
    export_run.export_workdir(config, directory)
    config.model.init_from = str(tmp_path / "out")
    config = schema.parse(config)
    optimizer, _ = state_lib.make_optimizer(config, 2, 1)
    _, _, shardings = state_lib.abstract_train_state(config, optimizer, sharding_lib.make_mesh())
    state = state_lib.init_train_state(
        config, optimizer, shardings, encoder=state_lib.imported_encoder(config)
    )
    for params in (state.params, state.teacher):
        assert_bitwise_equal(jax.device_get(params["encoder"]), jax.device_get(teacher))


def test_resuming_ignores_init_from_and_a_field_the_saved_run_predates(workdir, tmp_path):
    """A run saved before model.layer_norm_eps existed ran at its default: it resumes."""
    import shutil

    from matching_gap import checkpointing

    config, directory, _ = workdir
    copy = str(tmp_path / "run")
    shutil.copytree(directory, copy)
    path = os.path.join(copy, "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["model"]["layer_norm_eps"], saved["model"]["init_from"]
    with open(path, "w") as f:
        json.dump(saved, f)
    config = config.copy_and_resolve_references()
    checkpointing.check_workdir(copy, config)
    config.model.init_from = "elsewhere"
    checkpointing.check_workdir(copy, config)
    config.model.layer_norm_eps = 1e-12
    with pytest.raises(errors.WorkdirError, match=r"model\.layer_norm_eps: 1e-06 -> 1e-12"):
        checkpointing.check_workdir(copy, config)


def test_readme_feature_recipes_for_hugging_face_give_the_evaluators_features(small, small_hf):
    """README's table: last4_cls from ``hidden_states`` through the final LayerNorm, and
    cls_avgpool from ``last_hidden_state``, equal ``SSLModel.encode``'s."""
    from safetensors.numpy import load_file
    from transformers import FlaxViTModel

    encoder, images, _ = small
    model = FlaxViTModel.from_pretrained(small_hf, from_pt=True, add_pooling_layer=False)
    out = model(pixel_values=images.transpose(0, 3, 1, 2), output_hidden_states=True)
    tensors = load_file(os.path.join(small_hf, export.WEIGHTS_FILE))

    def layernorm(h):  # model.layernorm, with the file's weights and the config's epsilon
        mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        normed = (h - mean) / np.sqrt(var + SMALL.layer_norm_eps)
        return normed * tensors["layernorm.weight"] + tensors["layernorm.bias"]

    hidden = [np.asarray(h, np.float64) for h in out.hidden_states[-4:]]
    last4 = np.concatenate([layernorm(h[:, 0]) for h in hidden], axis=-1)
    tokens = np.asarray(out.last_hidden_state)
    cls_avgpool = np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=-1)
    ssl = models.SSLModel(encoder, None)
    assert max_difference(last4, ssl.encode(images, "last4_cls")) < SMALL_TOLERANCE
    assert max_difference(cls_avgpool, ssl.encode(images, "cls_avgpool")) < SMALL_TOLERANCE


def test_training_starts_from_init_from(workdir, tmp_path, capsys):
    """The real loop (mocked TFDS data) from an HF file: one step at a learning rate too
    small to move a float32 parameter leaves the file's encoder bitwise in the checkpoint."""
    import tensorflow_datasets as tfds

    config, directory, teacher = workdir
    config = config.copy_and_resolve_references()
    config.export.update(format="hf", dir=str(tmp_path / "hf"))
    export_run.export_workdir(config, directory)
    config.model.init_from = str(tmp_path / "hf")
    config.teacher.ema = False
    config.optim.update(num_steps=1, base_lr=1e-30, min_lr=0.0)
    config.train.update(final_eval=False, knn_every=0)
    with tfds.testing.mock_data(num_examples=64):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert f"The encoder starts from {tmp_path / 'hf'}." in capsys.readouterr().out
    _, params, step = state_lib.restore_encoder(schema.parse(config), str(tmp_path / "run"))
    assert step == 1
    assert_bitwise_equal(jax.device_get(params["encoder"]), jax.device_get(teacher))
