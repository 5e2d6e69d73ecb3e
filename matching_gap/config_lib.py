"""The configuration schema: every field a run reads, with its default.

Configs in ``configs/`` start from :func:`base_config` and change what their recipe needs;
the returned ``ConfigDict`` is locked, so a misspelt command-line override
(``--config.loss.epsilon=0.1``) fails with the list of valid keys (see :func:`check_keys`).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

LOSSES = ("matching_gap", "m3g", "info_nce", "byol")


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
        mock=False,  # run on tfds.testing.mock_data (smoke tests, no data needed)
        mock_num_examples=64,
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
        projector_hidden_dim=256,
        projector_dim=64,
        projector_layers=2,
        use_predictor=False,
        predictor_hidden_dim=256,
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
        time_limit_minutes=0.0,  # > 0: stop (and checkpoint) after this much training time
        run_steps=0,  # > 0: stop (and checkpoint) after this many steps in this invocation
        fsdp=False,  # shard parameters and optimiser state over the devices (large models)
    )
    c.eval = dict(
        batch_size=1024,
        knn_k=20,
        knn_temperature=0.07,
        knn_train_examples=0,  # 0 = all of eval_train_split
        features="cls_avgpool",  # pooled | cls_avgpool (CLS + mean patch token, as DINO)
        probe_epochs=100,
        probe_batch_size=1024,
        probe_lr=1e-2,
        probe_weight_decay=1e-4,
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
    """Shrinks a config in place to a few CPU steps on ``tfds.testing.mock_data``.

    The loss, teacher and head structure stay those of the recipe; the backbone becomes a
    2-block ViT of width 32 so that three steps and both evaluators take seconds.
    """
    config.data.mock = True
    config.data.source = "tfds"
    config.data.in_memory = True
    config.data.image_size = image_size
    config.data.max_examples = 0
    config.data.eval_max_examples = 0
    config.data.mock_num_examples = 64
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
        config.loss.group_size = 8
    config.train.update(log_every=1, checkpoint_every=2, knn_every=2)
    config.eval.update(batch_size=32, knn_k=5, probe_epochs=2, probe_batch_size=32)


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
    )  # fmt: skip
    c.loss.update(name="matching_gap", epsilon=0.8, normalize=True, group_size=64)
    c.teacher.update(ema=True, momentum=0.996, momentum_end=1.0)
    c.optim.update(
        batch_size=1024, num_epochs=300.0, base_lr=5e-4, min_lr=1e-6, warmup_epochs=10.0,
        weight_decay=0.04, weight_decay_end=0.4, grad_clip=3.0,
    )  # fmt: skip
    c.train.update(log_every=100, checkpoint_every=2000, knn_every=10_000,
                   compare_random_init=False)  # fmt: skip
    c.eval.update(batch_size=512, knn_k=20, probe_epochs=20)
    return c


def strong_augmentations(c: ml_collections.ConfigDict) -> None:
    """BYOL's colour / blur / solarisation set on top of crops and flips."""
    c.augment.update(
        color_jitter_prob=0.8, color_jitter_strength=1.0, grayscale_prob=0.2,
        blur_prob=0.5, solarize_prob=0.1,
    )  # fmt: skip
