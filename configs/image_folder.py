"""Your own images: the CPU demo's recipe on a folder of labelled images.

    python -m matching_gap.main --config=configs/image_folder.py --workdir=DIR \
        --config.data.data_dir=/path/to/images

Layout: ``/path/to/images/train/<class>/*.jpg|png`` for pretraining (the labels are not used
for it) and ``/path/to/images/val/<class>/...`` with the same class folders for the k-NN and
linear-probe evaluations (``--config.data.eval_split=train`` evaluates on the training images
if there is no ``val``). The files are streamed (``data.in_memory=False``): each view is a
random crop of the whole original image resized to ``augment.crop_size`` (bicubic), and the
evaluation view is the shorter side resized to ``data.image_size``, then the centre
``augment.crop_size``. ``--config.data.in_memory=True`` decodes a small folder once into
memory instead (each image's centre square at ``data.image_size``). A small ViT (patch 8 on
64-pixel crops) trains on a CPU; for a GPU and more images start from ``configs/vits16.py``
with ``--config.data.source=image_folder``.

Variant ``:smoke``: three steps (the tests run it on ``tfds.testing.mock_data``).
"""

from matching_gap import config_lib, schema


def get_config(arg: str | None = None):
    words = config_lib.parse_arg(arg, ("smoke",))
    c = config_lib.base_config()
    c.data.update(
        source="image_folder",
        data_dir="",
        train_split="train",
        eval_train_split="train",
        eval_split="val",
        image_size=72,
        channels=3,
        in_memory=False,
    )
    c.augment.update(
        crop_size=64,
        crop_scale=(0.25, 1.0),
        mean=schema.IMAGENET_MEAN,
        std=schema.IMAGENET_STD,
        eval_crop_fraction=64 / 72,
    )
    c.model.update(image_size=64, channels=3, patch_size=8)
    c.optim.num_epochs = 100.0  # small folders: many passes
    if "smoke" in words:
        config_lib.make_smoke(c, image_size=64)
    return config_lib.finalize(c)
