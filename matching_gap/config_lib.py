"""Loading configs: config files, command-line overrides, recipes.

Configs in ``configs/`` start from :func:`base_config` (derived from
``matching_gap.schema``, where every field, its type, default and rule are written) and
change what their recipe needs; the returned ``ConfigDict`` is locked, so a misspelt
command-line override (``--config.loss.epsilonn=0.1``) fails (:func:`check_override` names
the close matches). :func:`validate` parses the ConfigDict into a ``schema.Config`` once,
before a run writes or compiles anything; the sections are passed down from there.

Imports no module of the package but the schema (and its errors).
"""

from __future__ import annotations

import difflib
import importlib.machinery
import os
import types

import ml_collections

from matching_gap import errors, schema


def base_config() -> ml_collections.ConfigDict:
    """Every field of :class:`schema.Config` with its default (a small ViT on
    Fashion-MNIST, two crop + flip views)."""
    return ml_collections.ConfigDict(schema.Config().to_dict())


def validate(config, num_devices: int = 1) -> schema.Config:
    """The run's :class:`schema.Config`: every field and section checked, and the rules of
    ``num_devices`` (the devices the batch is split over). Runs before anything is written
    or compiled, without JAX and without reading data.

    Raises:
      errors.ConfigError: naming the key, the bad value and the fix.

    Warns (:class:`schema.ConfigWarning`) about settings that run but probably not as meant.
    """
    parsed = schema.parse(config)
    schema.check_devices(parsed, num_devices)
    return parsed


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file, as ``--config=path:arg`` would load it (as Python,
    whatever the file's name: ml_collections' ``SourceFileLoader``)."""
    name = os.path.splitext(os.path.basename(path))[0]
    loader = importlib.machinery.SourceFileLoader(f"matching_gap_config_{name}", path)
    module = types.ModuleType(loader.name)
    module.__file__ = path
    loader.exec_module(module)
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
        variant="",
        width=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        patch_size=8,
        image_size=image_size,
        projector_hidden_dim=64,
        projector_dim=32,
        predictor_hidden_dim=64,
        dtype="float32",
        remat=False,
        attention="xla",
    )
    config.optim.batch_size = 16
    config.optim.num_steps = 3
    config.optim.warmup_epochs = 0.0
    if config.loss.group_size:
        config.loss.group_size = 4  # divides the per-device batch on 4 simulated devices
    config.train.update(log_every=1, checkpoint_every=2, knn_every=2, pictures=False, plan_every=0)
    for key in ("features", "knn_features"):
        if config.eval[key] == "last4_cls":  # the smoke model has 2 blocks
            config.eval[key] = "cls_avgpool"
    config.eval.update(
        batch_size=32,
        knn_k=5,
        probe_epochs=2,
        probe_batch_size=32,
        augmented_epochs=1,
        augmented_batch_size=16,
    )


def imagenet_recipe(variant: str = "B/16") -> ml_collections.ConfigDict:
    """The paper's ImageNet-1k recipe (see configs/vitb16.py) for a ViT variant."""
    c = base_config()
    c.data.update(
        source="tfds",
        name="imagenet2012",
        train_split="train",
        eval_train_split="train",
        eval_split="validation",
        image_size=256,
        channels=3,
        in_memory=False,
        eval_max_examples=10_000,
    )
    c.augment.update(
        crop_size=224,
        crop_scale=(0.4, 1.0),
        num_views=2,
        flip=True,
        num_local_crops=10,
        local_crop_size=96,
        local_crop_scale=(0.05, 0.4),
        mean=schema.IMAGENET_MEAN,
        std=schema.IMAGENET_STD,
        eval_crop_fraction=0.875,
        # DINO's rules for the strong set (used by the :strong variants): torchvision's
        # ColorJitter order, drawn per view; blur sigma in each crop's own pixels.
        color_jitter_order="random",
        blur_sigma="pixels",
    )
    c.model.update(
        variant=variant,
        image_size=224,
        channels=3,
        pooling="cls",
        drop_path_rate=0.1,
        dtype="bfloat16",
        projector_hidden_dim=4096,
        projector_dim=256,
        projector_layers=2,
        use_predictor=True,
        predictor_hidden_dim=4096,
        # The plan (--mode=plan --topology=v4-32, benchmarks/results/tpu_plan_v4-32.txt):
        # 64 images per v4 chip fit without recomputation or sharded parameters.
        remat=False,
        init="torch",  # DINO's trunc_normal_(std=.02) and torch's patch-embedding default
    )
    c.train.fsdp = False
    c.loss.update(name="matching_gap", epsilon=0.8, normalize=True, group_size=64)
    c.teacher.update(ema=True, momentum=0.996, momentum_end=1.0)
    c.optim.update(
        batch_size=1024,
        num_epochs=300.0,
        base_lr=5e-4,
        min_lr=1e-6,
        warmup_epochs=10.0,
        weight_decay=0.04,
        weight_decay_end=0.4,
        grad_clip=3.0,
        grad_clip_mode="per_parameter",  # DINO's utils.clip_gradients
        weight_decay_mask="dino",  # DINO's get_params_groups
    )
    c.train.update(
        log_every=100, checkpoint_every=2000, knn_every=10_000, compare_random_init=False
    )
    c.eval.update(
        batch_size=512,
        # DINO's eval_linear.py for ViT-B: the last block's CLS token and its patch tokens'
        # mean (n_last_blocks=1, avgpool_patchtokens=True); ViT-S: configs/vits16.py.
        features="cls_avgpool",
        knn_features="cls",  # DINO's eval_knn.py: the CLS token (model(samples))
        knn_k=20,
        probe_epochs=20,
        protocols="knn,features,augmented",
        augmented_crop_scale=(0.08, 1.0),
    )
    return c


def strong_augmentations(c: ml_collections.ConfigDict) -> None:
    """BYOL's colour / blur / solarisation set on top of crops and flips.

    With two global views they are BYOL's (and DINO's ``DataAugmentationDINO``) asymmetric
    ones: blur 1.0 / 0.1, solarize 0.0 / 0.2; the local crops get DINO's blur 0.5 and no
    solarisation. With another number of views every view, local crops included, gets the
    mean, blur 0.5 / solarize 0.1. How the jitter is ordered and the blur's sigma measured are
    ``augment.color_jitter_order`` and ``augment.blur_sigma`` (the ImageNet recipes: DINO's).
    """
    c.augment.update(
        color_jitter_prob=0.8,
        color_jitter_strength=1.0,
        grayscale_prob=0.2,
        blur_prob=0.5,
        solarize_prob=0.1,
    )
    if c.augment.num_views == 2:
        # solarize_prob now reaches the local crops only: DINO never solarises them.
        c.augment.update(
            view_blur_probs=(1.0, 0.1), view_solarize_probs=(0.0, 0.2), solarize_prob=0.0
        )


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
