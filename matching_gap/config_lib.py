"""The configuration schema: every field a run reads, with its default, and its rules.

Configs in ``configs/`` start from :func:`base_config` and change what their recipe needs;
the returned ``ConfigDict`` is locked, so a misspelt command-line override
(``--config.loss.epsilonn=0.1``) fails (:func:`check_override` names the close matches).
:func:`validate` checks every value and every combination of sections once, before a run
writes or compiles anything, and raises :class:`errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import numbers
import os
import re
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import ml_collections

from matching_gap import errors

LOSSES = ("matching_gap", "m3g", "info_nce", "byol")
_T = TypeVar("_T")
OT_LOSSES = ("matching_gap", "m3g")  # the losses that solve OT problems (epsilon, groups)
PROTOCOLS = ("knn", "features", "augmented")  # what --mode=evaluate can run


class ConfigWarning(UserWarning):
    """A config that runs, but probably not as intended; the message says why."""


def base_config() -> ml_collections.ConfigDict:
    """All fields with defaults (a small ViT on Fashion-MNIST, two crop + flip views)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = dict(
        source="fashion_mnist_idx",  # fashion_mnist_idx | tfds | image_folder
        name="fashion_mnist",  # TFDS name when source == "tfds"
        data_dir="",  # IDX dir / TFDS data_dir / image-folder root ("" = default)
        train_split="train",
        eval_train_split="train",  # labelled split the evaluators fit on
        eval_split="test",  # split the evaluators report on
        image_size=28,  # stored size (square) that views are cropped from
        channels=1,
        max_examples=0,  # 0 = all (train split)
        eval_max_examples=0,  # 0 = all (each evaluation split)
        in_memory=True,  # False: stream the training split with tf.data (ImageNet)
        shuffle_buffer=10_000,
    )
    c.augment = dict(
        crop_size=28,
        crop_scale=(0.35, 1.0),  # 28 px images: milder crops than ImageNet's
        num_views=2,
        flip=True,
        color_jitter_prob=0.0,
        color_jitter_strength=1.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
        view_blur_probs=(),  # one per global view, overriding blur_prob (BYOL: (1.0, 0.1))
        view_solarize_probs=(),  # one per global view (BYOL: (0.0, 0.2))
        num_local_crops=0,
        local_crop_size=0,
        local_crop_scale=(0.05, 0.2),
        mean=(0.286,),
        std=(0.353,),
        eval_crop_fraction=1.0,
    )
    c.model = dict(
        variant="",  # e.g. "B/16"; "" uses the sizes below
        width=64,
        depth=4,
        num_heads=4,
        mlp_dim=128,
        patch_size=7,
        image_size=28,  # must equal augment.crop_size
        channels=1,
        pooling="cls",
        drop_path_rate=0.0,
        dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
        remat=False,
        attention="xla",  # xla | cudnn (flash attention: GPU and bfloat16 only)
        stem_channels=0,  # > 0: a 3x3 conv stem with this many channels before the patchify
        layer_norm_eps=1e-6,  # every LayerNorm's epsilon (Hugging Face ViT files may use 1e-12)
        init_from="",  # a timm or Hugging Face ViT directory that starts the encoder ("": random)
        projector_hidden_dim=256,
        projector_dim=64,
        projector_layers=2,
        use_predictor=False,
        predictor_hidden_dim=256,
        head_batchnorm=False,  # BatchNorm (batch statistics) in the projector / predictor
    )
    c.loss = dict(
        name="matching_gap",  # matching_gap | m3g | info_nce | byol
        epsilon=0.2,  # absolute unless relative_epsilon is set
        relative_epsilon="",  # "" | mean | std
        cost="sqeuclidean",
        normalize=True,
        group_size=0,  # 0 = one global OT problem over the batch
        temperature=0.1,  # info_nce
        multiview_mode="pairwise",  # pairwise | one_vs_rest (info_nce, byol with k > 2)
        sinkhorn_threshold=1e-3,
        sinkhorn_max_iterations=2000,
    )
    c.teacher = dict(
        ema=False,  # True: EMA teacher gives stop-gradient targets; False: shared weights
        momentum=0.996,
        momentum_end=1.0,  # cosine schedule momentum -> momentum_end
    )
    c.optim = dict(
        batch_size=256,  # global batch of images (each seen through every view)
        num_epochs=9.0,
        num_steps=0,  # > 0 overrides num_epochs
        base_lr=1e-3,  # lr = base_lr * batch_size / 256
        min_lr=1e-6,
        warmup_epochs=1.0,
        weight_decay=0.04,
        weight_decay_end=0.04,  # cosine schedule weight_decay -> weight_decay_end
        grad_clip=3.0,  # 0 = off
        b1=0.9,
        b2=0.999,
    )
    c.train = dict(
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        knn_every=0,  # 0 = only at the end
        final_eval=True,  # linear probe + kNN at the end
        compare_random_init=True,  # also evaluate the random-init encoder at the end
        compare_raw_pixels=False,  # also evaluate the flattened pixels (small images only)
        pictures=True,  # at the end: <workdir>/pictures/neighbours.png and embedding.png
        plan_every=500,  # TensorBoard image of a batch's transport plan (matching_gap; 0 = off)
        time_limit_minutes=0.0,  # > 0: stop (and checkpoint) after this much training time
        run_steps=0,  # > 0: stop (and checkpoint) after this many steps in this invocation
        fsdp=False,  # shard parameters and optimiser state over the devices (large models)
    )
    c.eval = dict(
        batch_size=1024,  # global batch of feature extraction (a multiple of the devices)
        features="cls_avgpool",  # pooled | cls_avgpool | last4_cls | mean_patch
        protocols="knn,features",  # what --mode=evaluate runs: knn, features, augmented
        knn_k=20,
        knn_temperature=0.07,
        # The `features` linear probe (also the end-of-training monitor): one head per
        # (learning rate, weight decay), chosen on a held-out fraction of eval_train_split.
        probe_epochs=100,
        probe_batch_size=1024,
        probe_learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        probe_weight_decays=(0.0, 1e-2, 1e-1),  # decoupled (AdamW), times the learning rate
        probe_holdout=0.05,
        # The `augmented` linear probe (DINO / MoCo v3 / MAE), --mode=evaluate only.
        augmented_epochs=100,
        augmented_batch_size=1024,
        augmented_learning_rates=(1e-3, 1e-2, 1e-1, 1.0),  # x batch / 256, one head each
        augmented_weight_decay=0.0,
        augmented_batchnorm=False,  # MAE: BatchNorm (no affine) before the head
        augmented_crop_scale=(0.35, 1.0),  # as augment.crop_scale; ImageNet: (0.08, 1)
        augmented_checkpoint_every=500,
        augmented_run_steps=0,  # > 0: stop (with a checkpoint) after this many steps
    )
    c.export = dict(
        format="timm",  # --mode=export writes timm | hf (Hugging Face transformers) files
        dir="",  # where --mode=export writes them
    )
    return c


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file, as ``--config=path:arg`` would load it."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"matching_gap_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config so that unknown keys are rejected."""
    config.lock()
    return config


def parse_arg(arg: str | None, known: tuple[str, ...]) -> set[str]:
    """Splits a ``get_config`` argument like ``"smoke,k=3"`` and rejects unknown words."""
    words = {w for w in (arg or "").split(",") if w}
    unknown = {w.split("=")[0] for w in words} - set(known)
    if unknown:
        raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: {list(known)}.")
    return words


def make_smoke(config: ml_collections.ConfigDict, *, image_size: int = 32) -> None:
    """Shrinks a config in place to a few CPU steps of its TFDS dataset: run it inside
    ``tfds.testing.mock_data`` (as the tests do) or on a prepared ``data_dir``.

    The loss, teacher and head structure stay those of the recipe; the backbone becomes a
    2-block ViT of width 32 so that three steps and both evaluators take seconds.
    """
    config.data.source = "tfds"
    config.data.in_memory = True
    config.data.image_size = image_size
    config.data.max_examples = 0
    config.data.eval_max_examples = 0
    config.augment.crop_size = image_size
    if config.augment.num_local_crops:
        config.augment.local_crop_size = image_size // 2
    config.model.update(
        variant="", width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
        image_size=image_size, projector_hidden_dim=64, projector_dim=32,
        predictor_hidden_dim=64, dtype="float32", remat=False, attention="xla",
    )  # fmt: skip
    config.optim.batch_size = 16
    config.optim.num_steps = 3
    config.optim.warmup_epochs = 0.0
    if config.loss.group_size:
        config.loss.group_size = 4  # divides the per-device batch on 4 simulated devices
    config.train.update(log_every=1, checkpoint_every=2, knn_every=2, pictures=False, plan_every=0)
    if config.eval.features == "last4_cls":  # the smoke model has 2 blocks
        config.eval.features = "cls_avgpool"
    config.eval.update(batch_size=32, knn_k=5, probe_epochs=2, probe_batch_size=32,
                       augmented_epochs=1, augmented_batch_size=16)  # fmt: skip


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_recipe(variant: str = "B/16") -> ml_collections.ConfigDict:
    """The paper's ImageNet-1k recipe (see configs/vitb16.py) for a ViT variant."""
    c = base_config()
    c.data.update(
        source="tfds", name="imagenet2012", train_split="train", eval_train_split="train",
        eval_split="validation", image_size=256, channels=3,
        in_memory=False, eval_max_examples=10_000,
    )  # fmt: skip
    c.augment.update(
        crop_size=224, crop_scale=(0.4, 1.0), num_views=2, flip=True, num_local_crops=10,
        local_crop_size=96, local_crop_scale=(0.05, 0.4), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, eval_crop_fraction=0.875,
    )  # fmt: skip
    c.model.update(
        variant=variant, image_size=224, channels=3, pooling="cls", drop_path_rate=0.1,
        dtype="bfloat16", projector_hidden_dim=4096, projector_dim=256, projector_layers=2,
        use_predictor=True, predictor_hidden_dim=4096,
        # The plan (--mode=plan --topology=v4-32, benchmarks/results/tpu_plan_v4-32.txt):
        # 64 images per v4 chip fit without recomputation or sharded parameters.
        remat=False,
    )  # fmt: skip
    c.train.fsdp = False
    c.loss.update(name="matching_gap", epsilon=0.8, normalize=True, group_size=64)
    c.teacher.update(ema=True, momentum=0.996, momentum_end=1.0)
    c.optim.update(
        batch_size=1024, num_epochs=300.0, base_lr=5e-4, min_lr=1e-6, warmup_epochs=10.0,
        weight_decay=0.04, weight_decay_end=0.4, grad_clip=3.0,
    )  # fmt: skip
    c.train.update(log_every=100, checkpoint_every=2000, knn_every=10_000,
                   compare_random_init=False)  # fmt: skip
    c.eval.update(batch_size=512, knn_k=20, probe_epochs=20, protocols="knn,features,augmented",
                  augmented_crop_scale=(0.08, 1.0))  # fmt: skip
    return c


def strong_augmentations(c: ml_collections.ConfigDict) -> None:
    """BYOL's colour / blur / solarisation set on top of crops and flips.

    With two global views they are BYOL's (and DINO's) asymmetric ones: blur 1.0 / 0.1,
    solarize 0.0 / 0.2; with another number of views every view gets the mean, 0.5 / 0.1.
    """
    c.augment.update(
        color_jitter_prob=0.8, color_jitter_strength=1.0, grayscale_prob=0.2,
        blur_prob=0.5, solarize_prob=0.1,
    )  # fmt: skip
    if c.augment.num_views == 2:
        c.augment.update(view_blur_probs=(1.0, 0.1), view_solarize_probs=(0.0, 0.2))


# --------------------------------------------------------------------------- validation


def typed_section(cls: type[_T], cfg: Any, section: str) -> _T:
    """``cls(**cfg)`` for a frozen dataclass that types one config section (its
    ``__post_init__`` holds the section's rules); unknown or missing fields are a
    :class:`errors.ConfigError`. ``cfg``: a ``ConfigDict`` or a mapping."""
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    fields = dataclasses.fields(cls)
    unknown = sorted(set(values) - {f.name for f in fields})
    required = [f.name for f in fields if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]  # fmt: skip
    missing = [name for name in required if name not in values]
    if unknown or missing:
        raise errors.ConfigError(
            f"{section}: unknown fields {unknown}, missing fields {missing}; the fields are "
            f"{[f.name for f in fields]}."
        )
    return cls(**values)


def check_override(config: ml_collections.ConfigDict, path: str) -> None:
    """Raises :class:`errors.ConfigError` unless ``path`` (``"loss.epsilon"``) is a key of
    ``config``; the message names the closest valid keys."""
    node, parts = config, path.split(".")
    for depth, key in enumerate(parts):
        parent = ".".join(parts[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            raise errors.ConfigError(
                f"Unknown config key {path!r}: {parent} is a value, not a section."
            )
        if key not in node:
            names = [f"{parent}.{k}" if parent else k for k in node]
            close = difflib.get_close_matches(".".join(parts[: depth + 1]), names, n=3)
            if close:
                hint = f"did you mean {' or '.join(close)}?"
            else:
                where = f" in {parent}" if parent else ""
                hint = f"valid keys{where}: {', '.join(sorted(node))}."
            raise errors.ConfigError(f"Unknown config key {path!r}; {hint}")
        node = node[key]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _reals(v, ok) -> bool:
    """A non-empty tuple or list of numbers, each passing ``ok``."""
    return (isinstance(v, (tuple, list)) and len(v) > 0
            and all(_is_real(x) and ok(x) for x in v))  # fmt: skip


# One rule per scalar field that no typed section (augment, model, data) checks:
# key -> (test, what the value must be).
_Rule = tuple[Callable[[Any], bool], str]
_POSITIVE_INT: _Rule = (lambda v: _is_int(v) and v > 0, "a positive integer")
_COUNT: _Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_POSITIVE: _Rule = (lambda v: _is_real(v) and v > 0, "> 0")
_NON_NEGATIVE: _Rule = (lambda v: _is_real(v) and v >= 0, ">= 0")
_FRACTION: _Rule = (lambda v: _is_real(v) and 0 <= v <= 1, "in [0, 1]")
_BETA: _Rule = (lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)")
_SCALAR_RULES: dict[str, _Rule] = {
    "seed": (_is_int, "an integer"),
    "loss.temperature": _POSITIVE,
    "loss.group_size": (lambda v: _is_int(v) and (v == 0 or v >= 2), "0 (one OT problem) or >= 2"),
    "loss.sinkhorn_threshold": _POSITIVE,
    "loss.sinkhorn_max_iterations": _POSITIVE_INT,
    "teacher.momentum": _FRACTION,
    "teacher.momentum_end": _FRACTION,
    "optim.batch_size": (lambda v: _is_int(v) and v >= 2,
                         "an integer >= 2 (the losses contrast the images of a batch)"),
    "optim.num_epochs": _NON_NEGATIVE,
    "optim.num_steps": _COUNT,
    "optim.base_lr": _POSITIVE,
    "optim.min_lr": _NON_NEGATIVE,
    "optim.warmup_epochs": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.weight_decay_end": _NON_NEGATIVE,
    "optim.grad_clip": (_NON_NEGATIVE[0], ">= 0 (0 = no clipping)"),
    "optim.b1": _BETA,
    "optim.b2": _BETA,
    "train.log_every": _POSITIVE_INT,
    "train.checkpoint_every": _POSITIVE_INT,
    "train.keep_checkpoints": _POSITIVE_INT,
    "train.knn_every": (_COUNT[0], "an integer >= 0 (0 = only at the end)"),
    "train.time_limit_minutes": (_NON_NEGATIVE[0], ">= 0 (0 = no limit)"),
    "train.run_steps": (_COUNT[0], "an integer >= 0 (0 = no limit)"),
    "train.plan_every": (_COUNT[0], "an integer >= 0 (0 = off)"),
    "eval.batch_size": _POSITIVE_INT,
    "eval.knn_k": _POSITIVE_INT,
    "eval.knn_temperature": _POSITIVE,
    "eval.probe_epochs": _POSITIVE_INT,
    "eval.probe_batch_size": _POSITIVE_INT,
    "eval.probe_learning_rates": (lambda v: _reals(v, lambda x: x > 0),
                                  "a non-empty tuple of numbers > 0"),
    "eval.probe_weight_decays": (lambda v: _reals(v, lambda x: x >= 0),
                                 "a non-empty tuple of numbers >= 0"),
    "eval.probe_holdout": (lambda v: _is_real(v) and 0 <= v < 0.5,
                           "in [0, 0.5) (0 = no held-out slice, for a single grid point)"),
    "eval.augmented_epochs": _POSITIVE_INT,
    "eval.augmented_batch_size": _POSITIVE_INT,
    "eval.augmented_learning_rates": (lambda v: _reals(v, lambda x: x > 0),
                                      "a non-empty tuple of numbers > 0"),
    "eval.augmented_weight_decay": _NON_NEGATIVE,
    "eval.augmented_crop_scale": (lambda v: _reals(v, lambda x: 0 < x <= 1) and len(v) == 2
                                  and v[0] <= v[1], "two numbers 0 < min <= max <= 1"),
    "eval.augmented_checkpoint_every": _POSITIVE_INT,
    "eval.augmented_run_steps": (_COUNT[0], "an integer >= 0 (0 = no limit)"),
}  # fmt: skip


def _value(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _section_error(section: str, error: ValueError) -> errors.ConfigError:
    """A typed section's ValueError as a ConfigError that names the ``section.key``."""
    if isinstance(error, errors.ConfigError):
        return error
    message = str(error)
    first = re.match(r"\w+", message)
    named = first is not None and first.group(0) in base_config()[section]
    return errors.ConfigError(f"{section}.{message}" if named else f"{section}: {message}")


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Checks every section of a run's config and how the sections fit together.

    Runs before anything is written or compiled, without TensorFlow and without reading
    data. ``num_devices``: the devices the batch is split over.

    Raises:
      errors.ConfigError: naming the key, the bad value and the fix.

    Warns (:class:`ConfigWarning`) about settings that run but probably not as meant.
    """
    # Imported here: config files import this module, and building a config should not
    # wait for JAX, Flax and OTT (seconds), e.g. to report a misspelt key.
    from matching_gap import augment, data, export, losses, models

    for key, (ok, rule) in _SCALAR_RULES.items():
        if not ok(_value(config, key)):
            raise errors.ConfigError(f"{key} must be {rule}, got {_value(config, key)!r}.")
    choices_of = {
        "loss.name": LOSSES,
        "loss.cost": losses.COSTS,
        "loss.multiview_mode": losses.MULTIVIEW_MODES,
        "eval.features": models.FEATURES,
    }
    for key, choices in choices_of.items():
        if _value(config, key) not in choices:
            raise errors.ConfigError(
                f"{key} must be one of {list(choices)}, got {_value(config, key)!r}."
            )
    try:
        losses._check_epsilon(config.loss.epsilon, config.loss.relative_epsilon or None)
    except ValueError as e:
        raise _section_error("loss", e) from None
    typed = {"augment": augment.AugmentConfig, "model": models.ModelConfig,
             "data": data.DataConfig, "export": export.ExportConfig}  # fmt: skip
    sections = {}
    for section, cls in typed.items():
        try:
            sections[section] = cls.from_config(config[section])
        except ValueError as e:
            raise _section_error(section, e) from None
    _check_combinations(config, sections["augment"], sections["model"], num_devices)


def _check_combinations(config, aug, model, num_devices: int) -> None:
    """The rules that tie sections together (and to the number of devices)."""
    loss, optim = config.loss, config.optim
    if not _is_int(num_devices) or num_devices <= 0:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}.")
    if optim.num_steps == 0 and optim.num_epochs <= 0:
        raise errors.ConfigError(
            f"optim.num_epochs is {optim.num_epochs} and optim.num_steps is 0: set one of "
            "them to the length of the run."
        )
    peak_lr = optim.base_lr * optim.batch_size / 256
    if optim.min_lr > peak_lr:
        raise errors.ConfigError(
            f"optim.min_lr ({optim.min_lr}) is above the peak learning rate base_lr * "
            f"batch_size / 256 = {peak_lr:g}; lower min_lr or raise base_lr."
        )
    if optim.batch_size % num_devices:
        raise errors.ConfigError(
            f"optim.batch_size ({optim.batch_size}) must be divisible by the number of "
            f"devices ({num_devices}); use a multiple of {num_devices}."
        )
    if model.image_size != aug.crop_size:
        raise errors.ConfigError(
            f"model.image_size ({model.image_size}) must equal augment.crop_size "
            f"({aug.crop_size}): the model sees the crops. Set both to the same size."
        )
    if not model.channels == config.data.channels == len(aug.mean):
        raise errors.ConfigError(
            f"model.channels ({model.channels}), data.channels ({config.data.channels}) and "
            f"the length of augment.mean / augment.std ({len(aug.mean)}) must agree: one "
            "normalisation constant per image channel."
        )
    patch = model.encoder_sizes()["patch_size"]
    if aug.num_local_crops and aug.local_crop_size % patch:
        raise errors.ConfigError(
            f"augment.local_crop_size ({aug.local_crop_size}) must be a multiple of the "
            f"patch size ({patch}): the ViT cuts every crop into whole patches."
        )
    _check_eval(config.eval, model, num_devices)
    _check_views(config, aug)
    if loss.name in OT_LOSSES and loss.group_size:
        _check_groups(loss.group_size, optim.batch_size, num_devices)
    # Shared weights run each unordered pair of views once, student -> target, so with a
    # predictor only the later view of a pair goes through it, and gradients flow through
    # both branches. That is a well-defined (asymmetric) objective and a possible ablation,
    # hence a warning, not an error; but it is rarely what enabling a predictor means
    # (BYOL / SimSiam: both directions, stop-gradient targets).
    symmetric = loss.name == "matching_gap" or (
        loss.name == "info_nce"
        and not (loss.multiview_mode == "one_vs_rest" and aug.num_local_crops == 0)
    )
    if symmetric and model.use_predictor and not config.teacher.ema:
        warnings.warn(
            f"model.use_predictor=True with shared weights (teacher.ema=False) and "
            f"loss.name={loss.name!r}: each pair of views is compared in one direction only "
            "(the predictor sees one view of each pair, with no stop-gradient on the other). "
            "Use teacher.ema=True, model.use_predictor=False, or loss.name='byol'.",
            ConfigWarning,
            stacklevel=1,  # here, not the caller: main and train both validate; warn once
        )


def _check_eval(e, model, num_devices: int) -> None:
    if e.features in ("cls_avgpool", "last4_cls") and model.pooling != "cls":
        raise errors.ConfigError(
            f"eval.features={e.features!r} needs model.pooling='cls', got {model.pooling!r}; "
            "set eval.features='pooled' or 'mean_patch'."
        )
    depth = model.encoder_sizes()["depth"]
    if e.features == "last4_cls" and depth < 4:
        raise errors.ConfigError(f"eval.features='last4_cls' needs 4 blocks, the model has "
                                 f"{depth}; choose another eval.features.")  # fmt: skip
    parse_protocols(e.protocols)
    for key in ("batch_size", "augmented_batch_size"):
        if e[key] % num_devices:
            raise errors.ConfigError(f"eval.{key} ({e[key]}) must be a multiple of the number "
                                     f"of devices ({num_devices}).")  # fmt: skip
    grid = len(e.probe_learning_rates) * len(e.probe_weight_decays)
    if grid > 1 and e.probe_holdout == 0:
        raise errors.ConfigError(
            f"eval.probe_holdout=0 leaves no held-out images to choose among the {grid} "
            "(learning rate, weight decay) pairs; set eval.probe_holdout > 0 or give one of "
            "each."
        )


def parse_protocols(value: str) -> list[str]:
    """``"knn,features"`` -> ``["knn", "features"]``; unknown names are a ConfigError."""
    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise errors.ConfigError(
            f"eval.protocols must name some of {', '.join(PROTOCOLS)} (comma-separated), "
            f"got {value!r}."
        )
    return names


def _check_views(config, aug) -> None:
    """Every loss needs two views of each image; M3G compares global views only."""
    name, ema = config.loss.name, config.teacher.ema
    if name == "m3g":
        if aug.num_local_crops:
            role = ("the EMA teacher sees global views only, so the k-tuples cannot include "
                    "local crops" if ema else "without a teacher the k-tuples would mix the "
                    "local crops in as extra marginals of a different size and view")  # fmt: skip
            raise errors.ConfigError(
                f"loss.name='m3g' takes global views only, got augment.num_local_crops="
                f"{aug.num_local_crops} ({role}). Set augment.num_local_crops=0 and choose "
                "k with augment.num_views."
            )
        if aug.num_views < 2:
            raise errors.ConfigError(
                f"loss.name='m3g' needs augment.num_views >= 2 (k views), got {aug.num_views}."
            )
    elif aug.num_views + aug.num_local_crops < 2:
        raise errors.ConfigError(
            f"augment.num_views={aug.num_views} with no local crops gives no pair of views to "
            "compare: set augment.num_views >= 2."
        )


def _check_groups(group_size: int, batch_size: int, num_devices: int) -> None:
    """OT groups must tile the batch; tiling each device's share keeps the solve local."""
    if batch_size % group_size:
        raise errors.ConfigError(
            f"loss.group_size ({group_size}) must divide optim.batch_size ({batch_size}); "
            "use a batch that is a multiple of the group size, or group_size=0 for one "
            "problem over the whole batch."
        )
    per_device = batch_size // num_devices
    if per_device % group_size:
        warnings.warn(
            f"loss.group_size ({group_size}) does not divide the per-device batch "
            f"(optim.batch_size {batch_size} / {num_devices} devices = {per_device}): the OT "
            "problems are solved on embeddings gathered from every device (slower, more "
            f"memory). Use a batch_size that is a multiple of {group_size * num_devices}.",
            ConfigWarning,
            stacklevel=1,  # as above
        )
