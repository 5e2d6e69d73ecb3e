"""The configuration schema: every field a run reads, its type, its default and its rule.

One frozen dataclass per section of a config (``data``, ``augment``, ``model``, ``loss``,
``teacher``, ``optim``, ``train``, ``monitor``, ``eval``, ``export``) and :class:`Config`,
which holds them and the ``seed``. This module is the only place a field is written:
``config_lib.base_config()`` (what config files and ``--config.section.field=`` overrides
start from) is derived from it, and :func:`parse` turns a config into a :class:`Config`
once, at the front door; the sections are then passed down as they are.

A field's type and simple rule sit on its line (:func:`_field`); rules that tie fields of a
section together are the section's ``check``; those that tie sections together are
``Config.check``, and those that depend on the number of devices :func:`check_devices`.
Every error is an :class:`errors.ConfigError` naming the ``section.field``.

Imports only the standard library and ``errors``: config files load without JAX.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from matching_gap import errors

# The choices of the fields that name something.
SOURCES = ("fashion_mnist_idx", "tfds", "image_folder")
LOSSES = ("matching_gap", "m3g", "info_nce", "byol", "dino")
OT_LOSSES = ("matching_gap", "m3g")  # the losses that solve OT problems (epsilon, groups)
COSTS = ("sqeuclidean", "cosine")
RELATIVE_EPSILON = ("", "mean", "std")
MULTIVIEW_MODES = ("pairwise", "one_vs_rest")
# What the evaluators see (``models.SSLModel.encode``).
FEATURES = ("pooled", "cls", "cls_avgpool", "last4_cls", "mean_patch")
CLS_FEATURES = ("cls", "cls_avgpool", "last4_cls")  # need model.pooling == "cls"
PROTOCOLS = ("knn", "features", "augmented")  # what --mode=evaluate can run
POOLINGS = ("cls", "mean")
# "xla": XLA's attention (scores materialised, softmax in float32), on every device and dtype.
# "cudnn": cuDNN's fused flash-attention kernel; GPUs only, bfloat16 compute only.
ATTENTIONS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16")  # the compute dtype (parameters stay float32)
EXPORT_FORMATS = ("timm", "hf")
# The projector: "mlp" (Linear -> GELU -> ... -> Linear, models.MLPHead) or "dino" (DINO's
# DINOHead: that MLP to a bottleneck, L2 normalisation, a weight-normalised last layer).
HEADS = ("mlp", "dino")
# How weights start (models.weight_init): "jax" = JAX's truncated_normal(0.02), cut at +-2
# std (std 0.0176), LeCun-normal patch embedding (the demo's); "torch" = DINO's
# trunc_normal_(std=.02) with absolute bounds (in effect N(0, 0.02^2)) and torch's Conv2d
# default for the patch embedding (the ImageNet recipes').
INITS = ("jax", "torch")
JITTER_ORDERS = ("fixed", "random")
BLUR_SIGMAS = ("scaled", "pixels")
# "global": one norm over all gradients (optax.clip_by_global_norm); "per_parameter": each
# parameter tensor's gradient clipped to its own norm (DINO's utils.clip_gradients).
GRAD_CLIP_MODES = ("global", "per_parameter")
# Parameters without weight decay. "dino": biases and 1-D tensors (norms), DINO's
# utils.get_params_groups; "dino_except_tokens": those and the position embeddings and the
# CLS token too (the project's rule until 2026-12, which the demo's figures were measured with).
WEIGHT_DECAY_MASKS = ("dino", "dino_except_tokens")
IDX_SPLITS = ("test", "train")  # the splits of the Fashion-MNIST IDX files

VIT_VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigWarning(UserWarning):
    """A config that runs, but probably not as intended; the message says why."""


# ------------------------------------------------------------------------------ rules

Rule = tuple[Callable[[Any], bool], str]  # (test, what the value must be)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _all(ok: Callable[[float], bool], what: str, *, empty: bool = False) -> Rule:
    """A tuple of numbers, each passing ``ok`` (non-empty unless ``empty``)."""
    return (lambda v: (empty or len(v) > 0) and all(ok(x) for x in v), what)


POSITIVE_INT: Rule = (lambda v: v > 0, "a positive integer")
COUNT: Rule = (lambda v: v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
BETA: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
SCALE: Rule = (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two numbers 0 < min <= max <= 1")


def one_of(choices: tuple[str, ...]) -> Rule:
    return (lambda v: v in choices, f"one of {list(choices)}")


def _field(default, rule: Rule | None = None):
    """A field with its default and its rule (checked after its type)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def _coerce(key: str, kind, value):
    """``value`` as the field's type (ints are numbers, lists are tuples), or a ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise errors.ConfigError(f"{key} must be True or False, got {value!r}.")
    if kind is int:
        if _is_int(value):
            return int(value)
        raise errors.ConfigError(f"{key} must be an integer, got {value!r}.")
    if kind is float:
        if _is_real(value):
            return float(value)
        raise errors.ConfigError(f"{key} must be a number, got {value!r}.")
    if kind is str:
        if isinstance(value, str):
            return value
        raise errors.ConfigError(f"{key} must be a string, got {value!r}.")
    # tuple[float, ...]: the only other kind of field
    if isinstance(value, (tuple, list)) and all(_is_real(x) for x in value):
        return tuple(float(x) for x in value)
    raise errors.ConfigError(f"{key} must be a tuple of numbers, got {value!r}.")


class _Section:
    """Checks every field of a section (type, then rule), then the section's ``check``."""

    section: ClassVar[str]
    # Every section is a dataclass (what dataclasses.fields needs of SECTIONS' classes).
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self):
        kinds = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.section}.{f.name}"
            value = _coerce(key, kinds[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            rule = f.metadata.get("rule")
            if rule is not None and not rule[0](value):
                raise errors.ConfigError(f"{key} must be {rule[1]}, got {value!r}.")
        self.check()

    def check(self) -> None:
        """The rules that tie this section's fields together."""


def check_encoder(
    sizes: Mapping[str, int],
    *,
    pooling: str,
    drop_path_rate: float,
    attention: str,
    layer_norm_eps: float,
    prefix: str,
) -> None:
    """The ViT's rules, for :class:`ModelConfig` (``prefix="model."``) and a ViT built on its
    own (``models.ViT``). ``sizes``: ``width``, ``depth``, ``num_heads``, ``mlp_dim``,
    ``patch_size``, ``image_size`` and ``channels``."""
    for name, value in sizes.items():
        if not _is_int(value) or value <= 0:
            raise errors.ConfigError(f"{prefix}{name} must be a positive integer, got {value!r}.")
    width, num_heads = sizes["width"], sizes["num_heads"]
    image_size, patch_size = sizes["image_size"], sizes["patch_size"]
    if width % num_heads:
        raise errors.ConfigError(
            f"{prefix}width ({width}) must be divisible by {prefix}num_heads ({num_heads}); "
            "change one of them."
        )
    if image_size % patch_size:
        raise errors.ConfigError(
            f"{prefix}image_size ({image_size}) must be divisible by the patch size "
            f"({patch_size}); change the image size or the patch size."
        )
    if pooling not in POOLINGS:
        raise errors.ConfigError(f"{prefix}pooling must be one of {POOLINGS}, got {pooling!r}.")
    if not (_is_real(drop_path_rate) and 0.0 <= drop_path_rate < 1.0):
        raise errors.ConfigError(
            f"{prefix}drop_path_rate must be in [0, 1), got {drop_path_rate!r}."
        )
    if attention not in ATTENTIONS:
        raise errors.ConfigError(
            f"{prefix}attention must be one of {ATTENTIONS}, got {attention!r}."
        )
    eps = layer_norm_eps
    if not _is_real(eps) or not eps > 0:
        raise errors.ConfigError(f"{prefix}layer_norm_eps must be a number > 0, got {eps!r}.")


def parse_variant(name: str) -> dict[str, int]:
    """``"B/16"`` -> ``width``, ``depth``, ``num_heads``, ``mlp_dim`` and ``patch_size``.

    Raises:
        ValueError: if the string is not ``<size>/<patch>`` with a size of
        :data:`VIT_VARIANTS`.
    """
    valid = ", ".join(f"'{k}/<patch>'" for k in VIT_VARIANTS)
    match = re.fullmatch(r"\s*([A-Za-z]+)\s*/\s*(\d+)\s*", name) if isinstance(name, str) else None
    if match is None or match.group(1) not in VIT_VARIANTS:
        raise ValueError(
            f"Unknown ViT variant {name!r}: expected one of {valid} (e.g. 'B/16', 'S/8')."
        )
    patch_size = int(match.group(2))
    if patch_size <= 0:
        raise ValueError(f"ViT variant {name!r}: the patch size must be a positive integer.")
    return dict(VIT_VARIANTS[match.group(1)], patch_size=patch_size)


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where the images come from and the size they are stored at."""

    section: ClassVar[str] = "data"
    source: str = _field("fashion_mnist_idx", one_of(SOURCES))
    name: str = "fashion_mnist"  # the TFDS name when source == "tfds"
    data_dir: str = ""  # IDX folder / TFDS data_dir / image-folder root ("" = the default)
    train_split: str = "train"
    eval_train_split: str = "train"  # the labelled split the evaluators fit on
    eval_split: str = "test"  # the split the evaluators report on
    # In memory: the (square) size images are stored at and the device cuts views from.
    # Streamed: views are cut from the original images; the evaluation view is the shorter
    # side resized to image_size, then the centre augment.crop_size (DINO: 256, then 224).
    image_size: int = _field(28, POSITIVE_INT)
    channels: int = _field(1, (lambda v: v in (1, 3), "1 or 3"))
    max_examples: int = _field(0, (COUNT[0], "an integer >= 0 (0 = all)"))  # of train_split
    eval_max_examples: int = _field(0, (COUNT[0], "an integer >= 0 (0 = all)"))  # each split
    in_memory: bool = True  # False: stream the splits with tf.data (ImageNet): tfds, image_folder
    # Streaming, in examples: encoded ImageNet JPEGs average ~110 kB, so ~1 GB per process.
    shuffle_buffer: int = _field(10_000, POSITIVE_INT)

    def check(self) -> None:
        if self.source == "tfds" and not self.name:
            raise errors.ConfigError(
                "data.source='tfds' needs data.name, a TFDS name such as cifar10."
            )
        if self.source == "image_folder" and not self.data_dir:
            raise errors.ConfigError(
                "data.source='image_folder' needs --config.data.data_dir=ROOT, a folder with "
                "ROOT/<split>/<class_name>/*.{jpg,jpeg,png}."
            )
        splits = (self.train_split, self.eval_train_split, self.eval_split)
        if self.source == "fashion_mnist_idx" and not set(splits) <= set(IDX_SPLITS):
            raise errors.ConfigError(
                f"fashion_mnist_idx has splits {list(IDX_SPLITS)}; data.train_split, "
                f"eval_train_split and eval_split are {list(splits)}."
            )
        if not self.in_memory and self.source not in ("tfds", "image_folder"):
            raise errors.ConfigError(
                "data.in_memory=False streams with tf.data and needs data.source='tfds' or "
                f"'image_folder'; source {self.source!r} loads into memory (data.in_memory=True)."
            )


_PROBABILITIES = _all(lambda p: 0 <= p <= 1, "() or probabilities in [0, 1]", empty=True)


@dataclasses.dataclass(frozen=True)
class AugmentConfig(_Section):
    """How the views are made (``matching_gap.augment`` applies them in this order)."""

    section: ClassVar[str] = "augment"
    crop_size: int = _field(28, POSITIVE_INT)
    crop_scale: tuple[float, ...] = _field((0.35, 1.0), SCALE)  # 28 px: milder than ImageNet's
    num_views: int = _field(2, POSITIVE_INT)
    flip: bool = True
    color_jitter_prob: float = _field(0.0, FRACTION)
    color_jitter_strength: float = _field(1.0, NON_NEGATIVE)
    grayscale_prob: float = _field(0.0, FRACTION)
    blur_prob: float = _field(0.0, FRACTION)
    solarize_prob: float = _field(0.0, FRACTION)
    # One probability per global view, replacing blur_prob / solarize_prob for those views
    # (BYOL's asymmetric views: blur (1.0, 0.1), solarize (0.0, 0.2)); () = the same for all.
    view_blur_probs: tuple[float, ...] = _field((), _PROBABILITIES)
    view_solarize_probs: tuple[float, ...] = _field((), _PROBABILITIES)
    # "fixed": brightness, contrast, saturation, hue in that order (SimCLR's, the demo's);
    # "random": a fresh order for each view, as torchvision's ColorJitter draws one per call.
    color_jitter_order: str = _field("fixed", one_of(JITTER_ORDERS))
    # "scaled": sigma ~ U(0.1, 2) * crop size / 224 (the demo's); "pixels": U(0.1, 2) in each
    # crop's own pixels whatever its size (DINO's GaussianBlur on every crop).
    blur_sigma: str = _field("scaled", one_of(BLUR_SIGMAS))
    num_local_crops: int = _field(0, COUNT)
    local_crop_size: int = _field(0, COUNT)
    local_crop_scale: tuple[float, ...] = _field((0.05, 0.2), SCALE)
    mean: tuple[float, ...] = _field((0.286,), _all(lambda x: True, "one number per channel"))
    std: tuple[float, ...] = _field((0.353,), _all(lambda x: x > 0, "numbers > 0, one per channel"))
    eval_crop_fraction: float = _field(1.0, (lambda v: 0 < v <= 1, "in (0, 1]"))

    def check(self) -> None:
        for name in ("view_blur_probs", "view_solarize_probs"):
            probs = getattr(self, name)
            if probs and len(probs) != self.num_views:
                raise errors.ConfigError(
                    f"augment.{name} must be () or one probability in [0, 1] per global view "
                    f"(num_views = {self.num_views}), got {probs}; () applies "
                    f"{name.replace('view_', '').replace('probs', 'prob')} to every view."
                )
        if self.num_local_crops and self.local_crop_size <= 0:
            raise errors.ConfigError(
                f"augment.num_local_crops={self.num_local_crops} needs a positive "
                "augment.local_crop_size."
            )
        if len(self.mean) != len(self.std):
            raise errors.ConfigError(
                f"augment.mean {self.mean} and augment.std {self.std} need the same length."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """The encoder (a ViT) and its heads.

    ``variant`` (e.g. ``"B/16"``) sets the encoder sizes; ``""`` takes ``width``, ``depth``,
    ``num_heads``, ``mlp_dim`` and ``patch_size``. ``attention="cudnn"`` needs a GPU and
    ``dtype="bfloat16"`` (checked by ``models.create_model``, where the devices are known).
    ``init_from`` names a timm or Hugging Face ViT directory whose weights start the encoder
    (read by ``matching_gap.export``; ``""``: a random start).
    """

    section: ClassVar[str] = "model"
    variant: str = ""  # e.g. "B/16"; "" uses the sizes below
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    patch_size: int = 7
    image_size: int = 28  # must equal augment.crop_size
    channels: int = 1
    pooling: str = "cls"
    drop_path_rate: float = 0.0
    dtype: str = _field("float32", one_of(DTYPES))  # compute dtype; parameters stay float32
    remat: bool = False
    attention: str = "xla"  # xla | cudnn (flash attention: GPU and bfloat16 only)
    stem_channels: int = _field(0, (COUNT[0], "a non-negative integer (0: no stem)"))
    layer_norm_eps: float = 1e-6  # every LayerNorm's (timm's; Hugging Face files: maybe 1e-12)
    init_from: str = ""  # a timm or Hugging Face ViT directory that starts the encoder
    projector_hidden_dim: int = _field(256, POSITIVE_INT)
    projector_dim: int = _field(64, POSITIVE_INT)
    projector_layers: int = _field(2, POSITIVE_INT)
    use_predictor: bool = False
    predictor_hidden_dim: int = _field(256, POSITIVE_INT)
    predictor_layers: int = _field(2, POSITIVE_INT)
    head_batchnorm: bool = False  # BatchNorm (batch statistics) in the projector / predictor
    # head="dino": DINO's DINOHead as the projector. projector_layers Linear layers (DINO's
    # nlayers, 3) map to head_bottleneck_dim (256), then L2 normalisation and a bias-free,
    # weight-normalised last layer to projector_dim (DINO's out_dim, 65536);
    # norm_last_layer=True fixes its norms to 1 (weight_g frozen), False learns them.
    head: str = _field("mlp", one_of(HEADS))
    init: str = _field("jax", one_of(INITS))
    head_bottleneck_dim: int = _field(256, POSITIVE_INT)
    norm_last_layer: bool = True

    def check(self) -> None:
        check_encoder(
            dict(self.encoder_sizes(), image_size=self.image_size, channels=self.channels),
            pooling=self.pooling,
            drop_path_rate=self.drop_path_rate,
            attention=self.attention,
            layer_norm_eps=self.layer_norm_eps,
            prefix="model.",
        )
        if self.init_from and self.stem_channels:
            raise errors.ConfigError(
                f"model.stem_channels={self.stem_channels}: a convolutional stem has no "
                "counterpart in timm or Hugging Face ViT files, so model.init_from cannot "
                "start it; set model.stem_channels=0."
            )

    def encoder_sizes(self) -> dict[str, int]:
        """``width``, ``depth``, ``num_heads``, ``mlp_dim``, ``patch_size`` of the ViT."""
        if self.variant:
            try:
                return parse_variant(self.variant)
            except ValueError as e:
                raise errors.ConfigError(f"model.variant: {e}") from None
        names = ("width", "depth", "num_heads", "mlp_dim", "patch_size")
        return {k: getattr(self, k) for k in names}


@dataclasses.dataclass(frozen=True)
class LossConfig(_Section):
    section: ClassVar[str] = "loss"
    name: str = _field("matching_gap", one_of(LOSSES))
    epsilon: float = _field(0.2, POSITIVE)  # absolute unless relative_epsilon is set
    relative_epsilon: str = _field("", one_of(RELATIVE_EPSILON))  # times the cost's mean / std
    cost: str = _field("sqeuclidean", one_of(COSTS))
    normalize: bool = True
    group_size: int = _field(0, (lambda v: v == 0 or v >= 2, "0 (one OT problem) or >= 2"))
    temperature: float = _field(0.1, POSITIVE)  # info_nce
    multiview_mode: str = _field("pairwise", one_of(MULTIVIEW_MODES))  # info_nce, byol, k > 2
    sinkhorn_threshold: float = _field(1e-3, POSITIVE)
    sinkhorn_max_iterations: int = _field(2000, POSITIVE_INT)
    # dino (DINO's DINOLoss and main_dino.py defaults): the student's temperature, the
    # teacher's after a linear warm-up over whole epochs (teacher_temperature_warmup_epochs
    # epochs from warmup_teacher_temperature; 0 = none), and the centre's EMA momentum.
    # centering=False drops the centre (the collapse ablation).
    student_temperature: float = _field(0.1, POSITIVE)
    teacher_temperature: float = _field(0.04, POSITIVE)
    warmup_teacher_temperature: float = _field(0.04, POSITIVE)
    teacher_temperature_warmup_epochs: int = _field(0, COUNT)
    center_momentum: float = _field(0.9, FRACTION)
    centering: bool = True


@dataclasses.dataclass(frozen=True)
class TeacherConfig(_Section):
    section: ClassVar[str] = "teacher"
    ema: bool = False  # True: an EMA teacher gives stop-gradient targets; False: shared weights
    momentum: float = _field(0.996, FRACTION)
    momentum_end: float = _field(1.0, FRACTION)  # cosine schedule momentum -> momentum_end


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    section: ClassVar[str] = "optim"
    # The global batch of images (each seen through every view).
    batch_size: int = _field(
        256, (lambda v: v >= 2, "an integer >= 2 (the losses contrast the images of a batch)")
    )
    num_epochs: float = _field(9.0, NON_NEGATIVE)
    num_steps: int = _field(0, COUNT)  # > 0 overrides num_epochs
    base_lr: float = _field(1e-3, POSITIVE)  # lr = base_lr * batch_size / 256
    min_lr: float = _field(1e-6, NON_NEGATIVE)
    warmup_epochs: float = _field(1.0, NON_NEGATIVE)
    weight_decay: float = _field(0.04, NON_NEGATIVE)
    weight_decay_end: float = _field(0.04, NON_NEGATIVE)  # cosine weight_decay -> this
    grad_clip: float = _field(3.0, (NON_NEGATIVE[0], ">= 0 (0 = no clipping)"))
    # "global" by default: what every run before this field clipped with (a saved config
    # without it resumes unchanged); the ImageNet recipes take DINO's "per_parameter".
    grad_clip_mode: str = _field("global", one_of(GRAD_CLIP_MODES))
    weight_decay_mask: str = _field("dino", one_of(WEIGHT_DECAY_MASKS))
    # DINO's freeze_last_layer: the head's last layer (model.head="dino") does not move
    # during the first so many epochs (no gradient, no Adam moments, no weight decay).
    freeze_last_layer_epochs: float = _field(0.0, NON_NEGATIVE)
    b1: float = _field(0.9, BETA)
    b2: float = _field(0.999, BETA)

    def check(self) -> None:
        if self.num_steps == 0 and self.num_epochs <= 0:
            raise errors.ConfigError(
                f"optim.num_epochs is {self.num_epochs} and optim.num_steps is 0: set one of "
                "them to the length of the run."
            )
        peak_lr = self.base_lr * self.batch_size / 256
        if self.min_lr > peak_lr:
            raise errors.ConfigError(
                f"optim.min_lr ({self.min_lr}) is above the peak learning rate base_lr * "
                f"batch_size / 256 = {peak_lr:g}; lower min_lr or raise base_lr."
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    section: ClassVar[str] = "train"
    log_every: int = _field(50, POSITIVE_INT)
    checkpoint_every: int = _field(500, POSITIVE_INT)
    keep_checkpoints: int = _field(2, POSITIVE_INT)
    knn_every: int = _field(0, (COUNT[0], "an integer >= 0 (0 = only at the end)"))
    final_eval: bool = True  # linear probe + k-NN at the end
    compare_random_init: bool = True  # also evaluate the random-init encoder at the end
    compare_raw_pixels: bool = False  # also evaluate the flattened pixels (small images only)
    pictures: bool = True  # at the end: <workdir>/pictures/neighbours.png and embedding.png
    # A TensorBoard image of a batch's transport plan (matching_gap) every so many steps.
    plan_every: int = _field(500, (COUNT[0], "an integer >= 0 (0 = off)"))
    # > 0: stop (and checkpoint) after this much training time / this many steps in this call.
    time_limit_minutes: float = _field(0.0, (NON_NEGATIVE[0], ">= 0 (0 = no limit)"))
    run_steps: int = _field(0, (COUNT[0], "an integer >= 0 (0 = no limit)"))
    fsdp: bool = False  # shard parameters and optimiser state over the devices (large models)


@dataclasses.dataclass(frozen=True)
class MonitorConfig(_Section):
    """What a run says about itself while it runs (``matching_gap.monitor``)."""

    section: ClassVar[str] = "monitor"
    # The devices' kind for MFU: "" = what JAX reports (jax.devices()[0].device_kind);
    # by hand, a kind of efficiency.PEAK_FLOPS (e.g. a GPU whose name JAX reports otherwise),
    # checked by monitor.check_settings before the run writes anything.
    device_kind: str = ""
    # Say once that the run is input-bound when this share of the wall time goes to waiting
    # for batches over `window` progress rows.
    input_wait_warning: float = _field(0.1, (lambda v: 0 < v < 1, "in (0, 1)"))
    window: int = _field(3, (lambda v: 1 <= v <= 100, "an integer in [1, 100]"))  # rows
    # The collapse line: effective rank of the features at or below this (1 = one line).
    collapse_rank: float = _field(1.5, (lambda v: 1 <= v <= 100, "in [1, 100]"))
    # jax.profiler trace of steps [profile_start, profile_start + profile_steps) into
    # <workdir>/tensorboard/plugins/profile/ (0 = off); process 0 unless all processes.
    profile_start: int = _field(0, (COUNT[0], "an integer >= 0 (0 = off)"))
    profile_steps: int = _field(3, (lambda v: 1 <= v <= 20, "an integer in [1, 20]"))
    profile_all_processes: bool = False


RATES = _all(lambda x: x > 0, "a non-empty tuple of numbers > 0")
DECAYS = _all(lambda x: x >= 0, "a non-empty tuple of numbers >= 0")
HOLDOUT: Rule = (
    lambda v: 0 <= v < 0.5,
    "in [0, 0.5) (0 = no held-out slice, for a single grid point)",
)


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    batch_size: int = _field(1024, POSITIVE_INT)  # feature extraction (a multiple of devices)
    # The encoder's compute dtype whenever it is evaluated (k-NN, probes, load_encoder,
    # pictures), whatever model.dtype it trained in: DINO's eval_knn.py and eval_linear.py
    # run it in float32.
    dtype: str = _field("float32", one_of(DTYPES))
    features: str = _field("cls_avgpool", one_of(FEATURES))  # the probes'
    # The k-NN's features; "" = eval.features (what every run before this field used, so a
    # saved config without it evaluates unchanged). DINO's eval_knn.py: "cls".
    knn_features: str = _field("", one_of(("", *FEATURES)))
    protocols: str = "knn,features"  # what --mode=evaluate runs: knn, features, augmented
    knn_k: int = _field(20, POSITIVE_INT)
    knn_temperature: float = _field(0.07, POSITIVE)
    # The `features` linear probe (also the end-of-training monitor): one head per
    # (learning rate, weight decay), chosen on a held-out fraction of eval_train_split.
    probe_epochs: int = _field(100, POSITIVE_INT)
    probe_batch_size: int = _field(1024, POSITIVE_INT)
    probe_learning_rates: tuple[float, ...] = _field((1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), RATES)
    probe_weight_decays: tuple[float, ...] = _field((0.0, 1e-2, 1e-1), DECAYS)  # x the lr (AdamW)
    probe_holdout: float = _field(0.05, HOLDOUT)
    # The `augmented` linear probe (DINO / MoCo v3 / MAE), --mode=evaluate only.
    augmented_epochs: int = _field(100, POSITIVE_INT)
    augmented_batch_size: int = _field(1024, POSITIVE_INT)
    augmented_learning_rates: tuple[float, ...] = _field((1e-3, 1e-2, 1e-1, 1.0), RATES)  # x b/256
    augmented_weight_decay: float = _field(0.0, NON_NEGATIVE)
    augmented_batchnorm: bool = False  # MAE: BatchNorm (no affine) before the head
    augmented_crop_scale: tuple[float, ...] = _field((0.35, 1.0), SCALE)  # ImageNet: (0.08, 1)
    augmented_checkpoint_every: int = _field(500, POSITIVE_INT)
    augmented_run_steps: int = _field(0, (COUNT[0], "an integer >= 0 (0 = no limit)"))
    # DINO's --val_freq: N > 0 also scores the heads on eval_split after every N-th epoch and
    # the last (eval_linear.py's rule) and reports the best of those, DINO's best_acc, as
    # augmented_probe_top1_best_epoch beside the final epoch's augmented_probe_top1.
    augmented_val_freq: int = _field(0, (COUNT[0], "an integer >= 0 (0 = the final epoch only)"))

    def check(self) -> None:
        self.protocol_names()
        grid = len(self.probe_learning_rates) * len(self.probe_weight_decays)
        if grid > 1 and self.probe_holdout == 0:
            raise errors.ConfigError(
                f"eval.probe_holdout=0 leaves no held-out images to choose among the {grid} "
                "(learning rate, weight decay) pairs; set eval.probe_holdout > 0 or give one "
                "of each."
            )

    def knn_feature_name(self) -> str:
        """The features the k-NN votes on: ``knn_features``, or ``features`` when unset."""
        return self.knn_features or self.features

    def protocol_names(self) -> list[str]:
        """``"knn,features"`` -> ``["knn", "features"]``."""
        names = [p.strip() for p in self.protocols.split(",") if p.strip()]
        if not names or any(p not in PROTOCOLS for p in names):
            raise errors.ConfigError(
                f"eval.protocols must name some of {', '.join(PROTOCOLS)} (comma-separated), "
                f"got {self.protocols!r}."
            )
        return names


@dataclasses.dataclass(frozen=True)
class ExportConfig(_Section):
    """``--mode=export`` writes ``format`` files into ``dir``."""

    section: ClassVar[str] = "export"
    format: str = _field("timm", one_of(EXPORT_FORMATS))  # timm | hf (Hugging Face)
    dir: str = ""


SECTIONS: dict[str, type[_Section]] = {
    cls.section: cls
    for cls in (
        DataConfig,
        AugmentConfig,
        ModelConfig,
        LossConfig,
        TeacherConfig,
        OptimConfig,
        TrainConfig,
        MonitorConfig,
        EvalConfig,
        ExportConfig,
    )
}


# ------------------------------------------------------------------------------ a run


@dataclasses.dataclass(frozen=True)
class Config:
    """A run's whole configuration; the defaults are a small ViT on Fashion-MNIST with two
    crop + flip views. Building one checks every field and how the sections fit together
    (:meth:`check`); :func:`check_devices` adds the rules of a number of devices."""

    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self):
        object.__setattr__(self, "seed", _coerce("seed", int, self.seed))
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Config.{name} must be a {cls.__name__}.")
        self.check()

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples stay tuples): what ``config.json`` and ConfigDicts hold."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """The rules that tie sections together."""
        aug, model, data = self.augment, self.model, self.data
        if model.image_size != aug.crop_size:
            raise errors.ConfigError(
                f"model.image_size ({model.image_size}) must equal augment.crop_size "
                f"({aug.crop_size}): the model sees the crops. Set both to the same size."
            )
        if not model.channels == data.channels == len(aug.mean):
            raise errors.ConfigError(
                f"model.channels ({model.channels}), data.channels ({data.channels}) and "
                f"the length of augment.mean / augment.std ({len(aug.mean)}) must agree: one "
                "normalisation constant per image channel."
            )
        sizes = model.encoder_sizes()
        if aug.num_local_crops and aug.local_crop_size % sizes["patch_size"]:
            raise errors.ConfigError(
                f"augment.local_crop_size ({aug.local_crop_size}) must be a multiple of the "
                f"patch size ({sizes['patch_size']}): the ViT cuts every crop into whole patches."
            )
        for key in ("features", "knn_features"):
            features = getattr(self.eval, key)
            if features in CLS_FEATURES and model.pooling != "cls":
                raise errors.ConfigError(
                    f"eval.{key}={features!r} needs model.pooling='cls', got "
                    f"{model.pooling!r}; set eval.{key}='pooled' or 'mean_patch'."
                )
            if features == "last4_cls" and sizes["depth"] < 4:
                raise errors.ConfigError(
                    f"eval.{key}='last4_cls' needs 4 blocks, the model has {sizes['depth']}; "
                    f"choose another eval.{key}."
                )
        self._check_views()
        if self.loss.name == "dino" and not self.teacher.ema:
            raise errors.ConfigError(
                "loss.name='dino' needs teacher.ema=True: DINO's targets are an EMA "
                "teacher's centred, sharpened outputs."
            )
        if self.loss.name == "dino" and model.use_predictor:
            raise errors.ConfigError(
                "loss.name='dino' compares the student's and the teacher's head outputs; "
                "DINO has no predictor: set model.use_predictor=False."
            )
        loss, batch = self.loss, self.optim.batch_size
        if loss.name in OT_LOSSES and loss.group_size and batch % loss.group_size:
            raise errors.ConfigError(
                f"loss.group_size ({loss.group_size}) must divide optim.batch_size ({batch}); "
                "use a batch that is a multiple of the group size, or group_size=0 for one "
                "problem over the whole batch."
            )

    def _check_views(self) -> None:
        """Every loss needs two views of each image; M3G compares global views only."""
        aug = self.augment
        if self.loss.name == "m3g":
            if aug.num_local_crops:
                role = (
                    "the EMA teacher sees global views only, so the k-tuples cannot "
                    "include local crops"
                    if self.teacher.ema
                    else "without a teacher the "
                    "k-tuples would mix the local crops in as extra marginals of a "
                    "different size and view"
                )
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
                f"augment.num_views={aug.num_views} with no local crops gives no pair of views "
                "to compare: set augment.num_views >= 2."
            )


def parse(values: Config | Mapping[str, Any] | Any) -> Config:
    """A :class:`Config` from a ``ConfigDict`` or a mapping of sections (a saved
    ``config.json``); a ``Config`` is returned as it is. A field the mapping lacks takes its
    default (a run saved before the field existed ran with it); an unknown one is a
    :class:`errors.ConfigError`."""
    if isinstance(values, Config):
        return values
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    unknown = sorted(set(values) - {"seed", *SECTIONS})
    if unknown:
        raise errors.ConfigError(
            f"unknown config sections {unknown}; the sections are {['seed', *SECTIONS]}."
        )
    sections: dict[str, Any] = {}  # one section of its own class each (Config checks them)
    for name, cls in SECTIONS.items():
        section = dict(values.get(name, {}))
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise errors.ConfigError(f"{name}: unknown fields {unknown}; the fields are {fields}.")
        sections[name] = cls(**section)
    return Config(seed=values.get("seed", 0), **sections)


def check_devices(config: Config, num_devices: int) -> None:
    """The rules of running ``config`` with its batches split over ``num_devices``, and the
    warnings (:class:`ConfigWarning`) about settings that run but probably not as meant."""
    if not _is_int(num_devices) or num_devices <= 0:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}.")
    batch, loss = config.optim.batch_size, config.loss
    if batch % num_devices:
        raise errors.ConfigError(
            f"optim.batch_size ({batch}) must be divisible by the number of devices "
            f"({num_devices}); use a multiple of {num_devices}."
        )
    for key in ("batch_size", "augmented_batch_size"):
        value = getattr(config.eval, key)
        if value % num_devices:
            raise errors.ConfigError(
                f"eval.{key} ({value}) must be a multiple of the number of devices ({num_devices})."
            )
    per_device = batch // num_devices
    if loss.name in OT_LOSSES and loss.group_size and per_device % loss.group_size:
        warnings.warn(
            f"loss.group_size ({loss.group_size}) does not divide the per-device batch "
            f"(optim.batch_size {batch} / {num_devices} devices = {per_device}): the OT "
            "problems are solved on embeddings gathered from every device (slower, more "
            f"memory). Use a batch_size that is a multiple of {loss.group_size * num_devices}.",
            ConfigWarning,
            stacklevel=2,
        )
    # Shared weights run each unordered pair of views once, student -> target, so with a
    # predictor only the later view of a pair goes through it, and gradients flow through
    # both branches. That is a well-defined (asymmetric) objective and a possible ablation,
    # hence a warning, not an error; but it is rarely what enabling a predictor means
    # (BYOL / SimSiam: both directions, stop-gradient targets).
    symmetric = loss.name == "matching_gap" or (
        loss.name == "info_nce"
        and not (loss.multiview_mode == "one_vs_rest" and config.augment.num_local_crops == 0)
    )
    if symmetric and config.model.use_predictor and not config.teacher.ema:
        warnings.warn(
            f"model.use_predictor=True with shared weights (teacher.ema=False) and "
            f"loss.name={loss.name!r}: each pair of views is compared in one direction only "
            "(the predictor sees one view of each pair, with no stop-gradient on the other). "
            "Use teacher.ema=True, model.use_predictor=False, or loss.name='byol'.",
            ConfigWarning,
            stacklevel=2,
        )
