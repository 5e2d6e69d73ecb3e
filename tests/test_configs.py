"""Every config and variant loads, is locked and passes validate(); every rule of
validate() fires on the value or combination it is about."""

import ast
import dataclasses
import glob
import os
import re
import warnings

import pytest

from matching_gap import config_lib, errors, models, schema

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")

VARIANTS = {
    "default.py": ["", "smoke", "info_nce", "byol", "smoke,info_nce", "smoke,byol"],
    "vitb16.py": ["", "smoke", "strong", "strong,smoke"],
    "vits16.py": ["", "smoke", "strong"],
    "m3g_vitb16.py": ["", "k=2", "k=3", "k=4", "k=2,smoke", "k=3,smoke", "k=4,smoke"],
    "cifar10.py": ["", "smoke", "strong"],
    "image_folder.py": ["", "smoke"],
    "dino_vits16.py": ["", "smoke", "cpu"],
}


def load(name, arg=""):
    return config_lib.load_config_file(os.path.join(CONFIG_DIR, name), arg)


def test_every_config_file_is_covered():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
    assert files == sorted(VARIANTS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_loads_locked_and_valid(name, arg):
    c = load(name, arg)
    assert c.is_locked
    if name == "image_folder.py" and "smoke" not in arg:
        c.data.data_dir = "/path/to/images"  # the override its docstring asks for
    with warnings.catch_warnings():
        warnings.simplefilter("error", schema.ConfigWarning)
        config_lib.validate(c)
    if "smoke" in arg:
        assert c.data.source in ("tfds", "image_folder") and c.optim.num_steps == 3
    with pytest.raises(AttributeError, match="Did you mean"):
        c.loss.epsilonn = 0.1


def test_paper_config_matches_recipe():
    c = load("vitb16.py")
    assert c.model.variant == "B/16" and c.model.image_size == 224
    assert c.loss.name == "matching_gap" and c.loss.group_size == 64
    assert c.teacher.ema and c.model.projector_hidden_dim == 4096 and c.model.projector_dim == 256
    assert c.optim.num_epochs == 300
    assert c.augment.color_jitter_prob == 0 and c.augment.flip  # crop + flip only


def test_m3g_views():
    for k in (2, 3, 4):
        c = load("m3g_vitb16.py", f"k={k}")
        assert c.augment.num_views == k and c.loss.name == "m3g"


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="valid"):
        load("default.py", "smok")
    with pytest.raises(ValueError, match="k must be"):
        load("m3g_vitb16.py", "k=5")


# ------------------------------------------------------------------------ validate()


def config_with(overrides: dict, base: str = "default.py"):
    """``configs/<base>`` with ``{"section.key": value}`` overrides (as --config.* sets them)."""
    c = load(base)
    c.update_from_flattened_dict(overrides)
    return c


def assert_rejected(overrides: dict, match: str, num_devices: int = 1, base: str = "default.py"):
    with pytest.raises(errors.ConfigError, match=match):
        config_lib.validate(config_with(overrides, base), num_devices=num_devices)


# The demo's strong preset gives one blur / solarize probability per view, for 2 views.
SYMMETRIC = {"augment.view_blur_probs": (), "augment.view_solarize_probs": ()}

# One bad value per field that has a rule (its line in the schema): (key, value).
# test_every_rule_is_tested keeps this list in step with the schema.
BAD_VALUES = [
    ("data.source", "csv"),
    ("data.image_size", 0),
    ("data.channels", 2),
    ("data.max_examples", -1),
    ("data.eval_max_examples", -2),
    ("data.shuffle_buffer", 0),
    ("augment.crop_size", 0),
    ("augment.crop_scale", (0.0, 1.0)),
    ("augment.num_views", 0),
    ("augment.color_jitter_prob", 1.5),
    ("augment.color_jitter_strength", -1.0),
    ("augment.grayscale_prob", -0.1),
    ("augment.blur_prob", 2.0),
    ("augment.solarize_prob", 1.1),
    ("augment.view_blur_probs", (1.5, 0.0)),
    ("augment.view_solarize_probs", (0.0, -1.0)),
    ("augment.num_local_crops", -1),
    ("augment.local_crop_size", -1),
    ("augment.local_crop_scale", (0.5, 0.2)),
    ("augment.mean", ()),
    ("augment.std", (0.0,)),
    ("augment.eval_crop_fraction", 0.0),
    ("model.dtype", "float16"),
    ("model.stem_channels", -1),
    ("model.projector_hidden_dim", 0),
    ("model.projector_dim", 0),
    ("model.projector_layers", 0),
    ("model.predictor_hidden_dim", 0),
    ("model.predictor_layers", 0),
    ("loss.name", "simclr"),
    ("loss.epsilon", -1.0),
    ("loss.relative_epsilon", "median"),
    ("loss.cost", "l1"),
    ("loss.temperature", 0.0),
    ("loss.group_size", 1),
    ("loss.multiview_mode", "all"),
    ("loss.sinkhorn_threshold", -1e-3),
    ("loss.sinkhorn_max_iterations", 0),
    ("teacher.momentum", 1.5),
    ("teacher.momentum_end", -0.1),
    ("optim.batch_size", 1),
    ("optim.num_epochs", -1.0),
    ("optim.num_steps", -1),
    ("optim.base_lr", 0.0),
    ("optim.min_lr", -1e-6),
    ("optim.warmup_epochs", -1.0),
    ("optim.weight_decay", -0.1),
    ("optim.weight_decay_end", -0.1),
    ("optim.grad_clip", -1.0),
    ("optim.grad_clip_mode", "per_tensor"),
    ("optim.weight_decay_mask", "timm"),
    ("optim.b1", 1.0),
    ("optim.b2", 1.0),
    ("train.log_every", 0),
    ("train.checkpoint_every", 0),
    ("train.keep_checkpoints", 0),
    ("train.knn_every", -1),
    ("train.time_limit_minutes", -1.0),
    ("train.run_steps", -1),
    ("train.plan_every", -1),
    ("eval.batch_size", 0),
    ("eval.dtype", "float16"),
    ("eval.features", "last4"),
    ("eval.knn_features", "patch"),
    ("eval.knn_k", 0),
    ("eval.knn_temperature", 0.0),
    ("eval.probe_epochs", 0),
    ("eval.probe_batch_size", 0),
    ("eval.probe_learning_rates", (0.1, 0.0)),
    ("eval.probe_weight_decays", ()),
    ("eval.probe_holdout", 0.5),
    ("eval.augmented_epochs", 0),
    ("eval.augmented_batch_size", 0),
    ("eval.augmented_learning_rates", (-1.0,)),
    ("eval.augmented_weight_decay", -1.0),
    ("eval.augmented_crop_scale", (0.5, 0.2)),
    ("eval.augmented_checkpoint_every", 0),
    ("eval.augmented_run_steps", -1),
    ("eval.augmented_val_freq", -1),
    ("export.format", "onnx"),
    ("monitor.input_wait_warning", 0.0),
    ("monitor.window", 0),
    ("monitor.collapse_rank", 0.9),
    ("monitor.profile_start", -1),
    ("monitor.profile_steps", 21),
    ("model.head", "swav"),
    ("model.init", "xavier"),
    ("model.head_bottleneck_dim", 0),
    ("loss.student_temperature", 0.0),
    ("loss.teacher_temperature", -0.04),
    ("loss.warmup_teacher_temperature", 0.0),
    ("loss.teacher_temperature_warmup_epochs", -1),
    ("loss.center_momentum", 1.5),
    ("optim.freeze_last_layer_epochs", -1.0),
    ("augment.color_jitter_order", "shuffled"),
    ("augment.blur_sigma", "relative"),
]


def _fields():
    """``(section, dataclasses.Field)`` for every field of the schema."""
    for name, cls in schema.SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield name, f


def test_every_rule_is_tested():
    ruled = {f"{s}.{f.name}" for s, f in _fields() if f.metadata.get("rule")}
    assert {k for k, _ in BAD_VALUES} == ruled


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_value_is_rejected_with_key_and_value(key, value):
    assert_rejected({key: value}, rf"^{key} must be .*got {re.escape(repr(value))}")


def _wrong_type(default):
    if isinstance(default, bool):
        return 1  # not a bool
    if isinstance(default, (int, float, tuple)):
        return "x"
    return 1  # a str field


@pytest.mark.parametrize(
    "section,field", [(s, f) for s, f in _fields()], ids=lambda x: getattr(x, "name", x)
)
def test_every_field_checks_its_type(section, field):
    bad = _wrong_type(field.default)
    with pytest.raises(errors.ConfigError, match=rf"^{section}\.{field.name} must be"):
        schema.parse({section: {field.name: bad}})


def _other_value(default):
    """A value of the field's type that is not its default (for the command line)."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return default + 0.25
    if isinstance(default, tuple):
        return (0.125, 0.5)
    return default + "_x"


def test_every_field_is_settable_from_the_command_line():
    """--config.section.field=value reaches every field of the schema (none is missing
    from base_config, so none is out of reach of a config file or a command line)."""
    from absl import flags
    from ml_collections import config_flags

    wanted = {f"{s}.{f.name}": _other_value(f.default) for s, f in _fields()}
    wanted["seed"] = 7
    argv = ["prog", f"--config={os.path.join(CONFIG_DIR, 'default.py')}"]
    argv += [f"--config.{k}={v}" for k, v in wanted.items()]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    got = flag_values.config
    for key, value in wanted.items():
        section, _, name = key.rpartition(".")
        assert (got[section][name] if section else got[name]) == value, key


def test_base_config_is_derived_from_the_schema():
    """One default per field: base_config() parses back into the schema's defaults, and the
    modules that take a section use the schema's class (no second set of defaults)."""
    from matching_gap import augment, data
    from matching_gap.evaluation import augmented_probe
    from matching_gap.evaluation import linear_probe as probe_lib

    assert schema.parse(config_lib.base_config()) == schema.Config()
    assert config_lib.base_config().to_dict() == schema.Config().to_dict()
    assert augment.AugmentConfig is schema.AugmentConfig
    assert models.ModelConfig is schema.ModelConfig
    assert data.DataConfig is schema.DataConfig
    assert probe_lib.ProbeSettings() == probe_lib.probe_settings(schema.Config())
    required = [
        f.default is dataclasses.MISSING
        for f in dataclasses.fields(augmented_probe.AugmentedSettings)
    ]
    assert all(required)  # its values come from eval.augmented_*, nowhere else


def test_config_lib_imports_only_the_schema():
    with open(config_lib.__file__) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("matching_gap"):
            imported |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("matching_gap")}
    assert imported <= {"matching_gap.schema", "matching_gap.errors"}, imported


@pytest.mark.parametrize(
    "key,value",
    [
        ("loss.name", "simclr"),
        ("loss.cost", "l1"),
        ("loss.multiview_mode", "all"),
        ("eval.features", "last4"),
        ("eval.knn_features", "patch"),
        ("eval.dtype", "float16"),
        ("data.source", "csv"),
        ("export.format", "onnx"),
    ],
)
def test_unknown_choice_is_rejected_with_the_valid_ones(key, value):
    assert_rejected({key: value}, rf"^{key} must be one of \[.*got '{value}'")


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"loss.epsilon": -1.0}, r"^loss\.epsilon must be > 0, got -1\.0"),
        ({"loss.epsilon": 0.0}, r"^loss\.epsilon must be > 0"),
        ({"loss.relative_epsilon": "median"}, r"^loss\.relative_epsilon must be one of"),
        (
            {"augment.num_local_crops": 2, "augment.local_crop_size": 0},
            r"^augment\.num_local_crops=2 needs a positive augment\.local_crop_size",
        ),
        (
            {"augment.mean": (0.5, 0.5)},
            r"^augment\.mean \(0\.5, 0\.5\) and augment\.std \(0\.353,\) need the same",
        ),
        (
            {"augment.view_blur_probs": (1.0,)},
            r"^augment\.view_blur_probs must be \(\) or one "
            r"probability in \[0, 1\] per global view \(num_views = 2\), got \(1\.0,\)",
        ),
        ({"augment.view_solarize_probs": (0.0, 1.5)}, r"^augment\.view_solarize_probs must be"),
        ({"model.stem_channels": -1}, r"^model\.stem_channels must be a non-negative integer"),
        ({"model.num_heads": 5}, r"^model\.width \(64\) must be divisible by model\.num_heads"),
        ({"model.variant": "Q/16"}, r"^model\.variant: Unknown ViT variant 'Q/16'"),
        ({"model.dtype": "float16"}, r"^model\.dtype must be one of"),
        ({"model.projector_dim": 0}, r"^model\.projector_dim must be a positive integer"),
        ({"data.channels": 2}, r"data\.channels must be 1 or 3"),
        ({"data.source": "csv"}, r"data\.source"),
    ],
)
def test_typed_sections_are_checked(overrides, match):
    assert_rejected(overrides, match)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            {"model.image_size": 21, "model.patch_size": 7},
            r"model\.image_size \(21\) must equal augment\.crop_size \(28\)",
        ),
        ({"data.channels": 3}, r"model\.channels \(1\), data\.channels \(3\)"),
        (
            {"augment.mean": (0.5, 0.5, 0.5), "augment.std": (0.5, 0.5, 0.5)},
            r"augment\.mean / augment\.std \(3\) must agree",
        ),
        (
            {"augment.num_local_crops": 2, "augment.local_crop_size": 12},
            r"augment\.local_crop_size \(12\) must be a multiple of the patch size \(7\)",
        ),
        ({"model.pooling": "mean"}, r"eval\.features='last4_cls' needs model\.pooling='cls'"),
        ({"model.depth": 3, "eval.features": "last4_cls"}, r"'last4_cls' needs 4 blocks"),
        (
            {"model.pooling": "mean", "eval.features": "pooled", "eval.knn_features": "cls"},
            r"eval\.knn_features='cls' needs model\.pooling='cls'.*eval\.knn_features='pooled'",
        ),
        (
            {"model.depth": 3, "eval.features": "pooled", "eval.knn_features": "last4_cls"},
            r"eval\.knn_features='last4_cls' needs 4 blocks",
        ),
        ({"eval.protocols": "knn,linear"}, r"eval\.protocols must name some of knn, features"),
        ({"eval.probe_holdout": 0.0}, r"probe_holdout=0 leaves no held-out images"),
        ({"augment.num_views": 1, **SYMMETRIC}, r"augment\.num_views=1 with no local crops"),
        (
            {"loss.name": "m3g", "augment.num_views": 1, **SYMMETRIC},
            r"'m3g' needs augment\.num_views >= 2",
        ),
        ({"loss.group_size": 48}, r"loss\.group_size \(48\) must divide optim\.batch_size"),
        ({"optim.num_epochs": 0.0}, r"optim\.num_epochs is 0\.0 and optim\.num_steps is 0"),
        ({"optim.min_lr": 0.01}, r"optim\.min_lr \(0\.01\) is above the peak learning rate"),
    ],
)
def test_sections_must_fit_together(overrides, match):
    assert_rejected(overrides, match)


def test_group_size_is_only_checked_for_the_ot_losses():
    config_lib.validate(config_with({"loss.name": "info_nce", "loss.group_size": 48}))


def test_batch_must_split_over_the_devices():
    assert_rejected({}, r"optim\.batch_size \(256\) must be divisible .* devices \(3\)", 3)
    eval_rule = r"eval\.batch_size \(1024\) must be a multiple .* \(3\)"
    assert_rejected({"optim.batch_size": 258}, eval_rule, 3)
    config_lib.validate(load("default.py"), num_devices=4)


@pytest.mark.parametrize("ema", [True, False])
def test_m3g_takes_global_views_only(ema):
    # With a teacher the k-tuples are built from its global views; without one the local
    # crops would silently join the k-tuples as extra marginals.
    role = "EMA teacher sees global views only" if ema else "without a teacher"
    overrides = {
        "loss.name": "m3g",
        "teacher.ema": ema,
        "augment.num_local_crops": 2,
        "augment.local_crop_size": 14,
    }
    assert_rejected(overrides, rf"'m3g' takes global views only.*{role}.*num_local_crops=0")
    overrides["augment.num_local_crops"] = 0
    config_lib.validate(config_with(overrides))


@pytest.mark.parametrize(
    "overrides,warns",
    [
        ({}, True),
        ({"loss.name": "info_nce"}, True),
        ({"teacher.ema": True}, False),  # stop-gradient targets, every ordered pair
        ({"loss.name": "byol"}, False),  # byol runs both directions
        ({"loss.name": "info_nce", "loss.multiview_mode": "one_vs_rest"}, False),
        ({"model.use_predictor": False}, False),
    ],
)
def test_shared_weights_with_a_predictor_warn_of_a_one_directional_loss(overrides, warns):
    config = config_with({"model.use_predictor": True, "teacher.ema": False, **overrides})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config_lib.validate(config)
    messages = [str(w.message) for w in caught if w.category is schema.ConfigWarning]
    assert bool(messages) == warns
    if warns:
        assert "one direction only" in messages[0] and "teacher.ema=True" in messages[0]


def test_groups_that_split_across_devices_warn_of_the_gathered_path():
    config = config_with({"loss.group_size": 64})  # batch 256
    with pytest.warns(schema.ConfigWarning, match=r"per-device batch .* 256 / 8 devices = 32"):
        config_lib.validate(config, num_devices=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", schema.ConfigWarning)
        config_lib.validate(config, num_devices=4)  # 64 per device: one group each
        config_lib.validate(config_with({"loss.name": "byol", "loss.group_size": 64}), 8)


def test_check_override_names_close_keys():
    c = load("default.py")
    config_lib.check_override(c, "loss.epsilon")
    with pytest.raises(errors.ConfigError, match=r"'loss\.epsilonn'; did you mean loss\.epsilon"):
        config_lib.check_override(c, "loss.epsilonn")
    with pytest.raises(errors.ConfigError, match=r"did you mean loss\?"):
        config_lib.check_override(c, "los.epsilon")
    with pytest.raises(
        errors.ConfigError, match=r"valid keys in loss: center_momentum, centering, cost, epsilon"
    ):
        config_lib.check_override(c, "loss.zzzzzz")
    with pytest.raises(errors.ConfigError, match=r"loss\.epsilon is a value, not a section"):
        config_lib.check_override(c, "loss.epsilon.value")


def test_parse_rejects_unknown_sections_and_fields_and_fills_missing_ones():
    model = load("default.py").model.to_dict()
    assert schema.parse({"model": model}).model.width == 64
    with pytest.raises(errors.ConfigError, match=r"model: unknown fields \['widht'\]"):
        schema.parse({"model": {**model, "widht": 8}})
    with pytest.raises(errors.ConfigError, match=r"unknown config sections \['modle'\]"):
        schema.parse({"modle": model})
    # A config.json saved before a field existed: the field takes its default.
    del model["layer_norm_eps"]
    assert schema.parse({"model": model}).model.layer_norm_eps == 1e-6
    config = schema.parse(load("default.py"))
    assert schema.parse(config) is config  # parsed once: a Config passes through


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_every_config_evaluates_the_encoder_in_float32_as_dino(name, arg):
    """DINO's eval_knn.py and eval_linear.py run the encoder in float32 (the ImageNet recipes
    train in bfloat16): no config evaluates in its training dtype."""
    c = load(name, arg)
    if name == "image_folder.py" and "smoke" not in arg:
        c.data.data_dir = "/path/to/images"
    assert config_lib.validate(c).eval.dtype == "float32"


def test_the_recipes_evaluate_on_dinos_features_and_the_demo_on_its_own():
    """DINO's eval_linear.py: ViT-S n_last_blocks=4 without pooling, ViT-B the last CLS
    token and the mean patch token; eval_knn.py: the CLS token. The demo's k-NN keeps the
    probe's features (its figures were measured so)."""
    expected = {
        "vits16.py": ("last4_cls", "cls"),
        "vitb16.py": ("cls_avgpool", "cls"),
        "m3g_vitb16.py": ("cls_avgpool", "cls"),
        "dino_vits16.py": ("last4_cls", "cls"),
        "default.py": ("last4_cls", "last4_cls"),
    }
    for name, (probe, knn) in expected.items():
        config = config_lib.validate(config_lib.load_config_file(os.path.join(CONFIG_DIR, name)))
        assert (config.eval.features, config.eval.knn_feature_name()) == (probe, knn), name
