"""CIFAR-10 with the matching gap: a ViT-Ti/4 on 32 x 32 images, EMA teacher, crops + flips.

    python -m matching_gap.main --config=configs/cifar10.py --workdir=DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs the prepared TFDS ``cifar10`` (``tfds build cifar10`` on a machine with network).
A GPU-sized run (200 epochs); on a 2-core CPU a step of this model takes seconds.
Variants: ``:strong`` (colour jitter etc.), ``:smoke``.
"""

from matching_gap import config_lib


def get_config(arg: str | None = None):
    words = config_lib.parse_arg(arg, ("smoke", "strong"))
    c = config_lib.base_config()
    c.data.update(
        source="tfds",
        name="cifar10",
        train_split="train",
        eval_train_split="train",
        eval_split="test",
        image_size=32,
        channels=3,
        in_memory=True,
    )
    c.augment.update(
        crop_size=32,
        crop_scale=(0.2, 1.0),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
    c.model.update(
        variant="Ti/4",
        image_size=32,
        channels=3,
        drop_path_rate=0.1,
        projector_hidden_dim=2048,
        projector_dim=256,
        use_predictor=True,
        predictor_hidden_dim=2048,
    )
    c.loss.update(name="matching_gap", epsilon=0.4, group_size=0)
    c.teacher.update(ema=True, momentum=0.99, momentum_end=1.0)
    c.optim.update(
        batch_size=512,
        num_epochs=200.0,
        base_lr=5e-4,
        warmup_epochs=10.0,
        weight_decay=0.04,
        weight_decay_end=0.4,
    )
    c.train.update(log_every=100, checkpoint_every=2000, knn_every=5000)
    if "strong" in words:
        config_lib.strong_augmentations(c)
    if "smoke" in words:
        config_lib.make_smoke(c)
    return config_lib.finalize(c)
