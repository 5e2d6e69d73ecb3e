"""The images as the sources hand them out, as tf.data functions: decoding, the square held
in memory, DINO's evaluation view and the training views cut on the host.

Every source calls these, so an image is decoded, brought to its channels and cut the same
way whichever source it comes from (the cuts themselves are ``matching_gap.crops``).

TensorFlow is imported only through :func:`import_tensorflow`, inside the functions that
need it, so that machines without TensorFlow can import the package.
"""

from __future__ import annotations

from matching_gap import crops
from matching_gap.schema import AugmentConfig

import_tensorflow = crops.import_tensorflow


def import_tfds():
    import_tensorflow()  # first, so that TFDS finds TensorFlow with the GPUs hidden
    import tensorflow_datasets as tfds

    return tfds


def plain_tf(fn):
    """``fn`` for tf.data as it is written: its TF ops already are graph ops (``tf.cond``,
    ``tf.where``), and AutoGraph's attempt to rewrite it only adds a warning."""
    return import_tensorflow().autograph.experimental.do_not_convert(fn)


def tf_decode(contents):
    """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 [h, w, 3], whatever the file's
    extension says (ImageNet has a PNG named .JPEG) and its colour model (CMYK and grey
    JPEGs become RGB). Always RGB: decoders asked for one channel use their own grey
    weights (libpng's differ from libjpeg's); the grey conversion uses LUMA."""
    tf = import_tensorflow()
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def prepare_fn(*, encoded: bool, image_size: int, channels: int):
    """``{"image", "label"}`` -> ``{"image": uint8 [S, S, channels], "label": int32}``: the
    images held in memory, the evaluation view of their whole square (``S = image_size``)."""
    return eval_view_fn(encoded=encoded, resize=image_size, crop=image_size, channels=channels)


def eval_view_fn(*, encoded: bool, resize: int, crop: int, channels: int):
    """``{"image", "label"}`` -> DINO's evaluation view ``{"image": uint8 [crop, crop, c],
    "label"}``: the shorter side resized to ``resize``, the centre ``crop`` square."""
    tf = import_tensorflow()

    def prepare(example):
        image = tf_decode(example["image"]) if encoded else example["image"]
        image = crops.tf_eval_view(crops.tf_to_channels(image, channels), resize, crop)
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    return plain_tf(prepare)


def training_views_fn(*, encoded: bool, channels: int, aug: AugmentConfig, base_seed):
    """``(position, {"image", "label"})`` -> the example's host-cut training views
    (``crops.tf_training_views``) under the stateless seed ``(base_seed, position)``."""
    tf = import_tensorflow()

    def cut(position, example):
        image = tf_decode(example["image"]) if encoded else example["image"]
        image = crops.tf_to_channels(image, channels)
        seed = tf.stack([tf.constant(base_seed, tf.int64), position])
        out = crops.tf_training_views(image, seed, aug)
        out = {k: v for k, v in out.items() if not k.endswith("boxes")}
        out["label"] = tf.cast(example["label"], tf.int32)
        for key in ("ok", "path"):
            if key in example:
                out[key] = example[key]
        return out

    return plain_tf(cut)


def deterministic(ds):
    options = import_tensorflow().data.Options()
    options.deterministic = True
    return ds.with_options(options)
