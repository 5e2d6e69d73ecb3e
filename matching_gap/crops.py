"""Training views and the evaluation view cut on the host, from the whole original image.

This is where a view's pixels come from when the images have their own sizes (ImageNet as
TFDS or as a folder of JPEGs, streamed): DINO's ``DataAugmentationDINO`` and
``eval_linear.py`` as TensorFlow ops that run inside tf.data.

* :func:`tf_training_views`: each view is torchvision's ``RandomResizedCrop`` on the
  original image (``transforms.RandomResizedCrop.get_params``: area a ``scale`` share of the
  image's own area, aspect ratio log-uniform in (3/4, 4/3), 10 tries, then the centred
  fallback), resampled once from the original pixels to its output size, bicubic with
  antialiasing (PIL's ``BICUBIC``, which DINO's crops use). Global views and local crops
  alike. Flips, colour and the rest happen on the device (:func:`augment.finish_views`).
* :func:`tf_eval_view`: DINO's evaluation transform, ``Resize(resize, BICUBIC)`` then
  ``CenterCrop(crop)``, with torchvision's integer rules.
* :func:`training_views`: the same ops on a list of numpy images of any size, for people:
  the views and each view's box in its image's own pixels (``pictures/views.png``).

The randomness of an image's views is ``tf.random.stateless_uniform`` under a seed pair the
caller gives, so a view is a pure function of that pair and the image, whichever tf.data
thread cuts it.

TensorFlow is imported inside the functions (the loss, the model and the train step import
without it).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from absl import logging

from matching_gap.augment import LUMA
from matching_gap.schema import AugmentConfig

# torchvision's RandomResizedCrop defaults, which DINO keeps.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
# Uniforms per view: area and ratio per try, then the top and left offsets.
_UNIFORMS = 2 * CROP_TRIES + 2


@functools.cache
def import_tensorflow():
    """Imports TensorFlow for input pipelines with the GPUs hidden from it; returns ``tf``.

    Left visible, TensorFlow would reserve accelerator memory that JAX needs. Hiding fails
    (RuntimeError) once TensorFlow has initialised its devices; that is logged and kept.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        logging.warning("TensorFlow had already initialised its devices: %s", e)
    return tf


_tf = import_tensorflow


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """What to cut: ``count`` views of ``size`` x ``size`` at area share ``scale``."""

    count: int
    size: int
    scale: tuple[float, float]


def view_specs(cfg: AugmentConfig) -> tuple[ViewSpec, ViewSpec | None]:
    """The global views' and the local crops' specs (None without local crops)."""
    (low, high), (local_low, local_high) = cfg.crop_scale, cfg.local_crop_scale  # the schema: 2
    glob = ViewSpec(cfg.num_views, cfg.crop_size, (low, high))
    if not cfg.num_local_crops:
        return glob, None
    return glob, ViewSpec(cfg.num_local_crops, cfg.local_crop_size, (local_low, local_high))


def tf_to_channels(image, channels: int):
    """uint8 [h, w, 1 | 3 | 4] -> uint8 [h, w, channels] (grey with the weights ``LUMA``)."""
    tf = _tf()
    have = image.shape[-1]
    if have == 4:
        image, have = image[..., :3], 3
    if have not in (1, 3):
        raise ValueError(f"images have {have} channels; only 1 (grey) and 3 (RGB) are read")
    if have == 1 and channels == 3:
        return tf.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        gray = tf.tensordot(tf.cast(image, tf.float32), tf.constant(LUMA, tf.float32), 1)
        return tf.cast(tf.clip_by_value(tf.round(gray), 0.0, 255.0), tf.uint8)[..., None]
    return image


def tf_crop_box(u, height, width, scale: tuple[float, float]):
    """torchvision's ``RandomResizedCrop.get_params`` as TF ops: ``(top, left, h, w)``, int32.

    ``u``: float32 ``[..., 2 * CROP_TRIES + 2]`` uniforms on [0, 1), one row per box: per try
    an area share and a log aspect ratio, then the top and left offsets. ``height``,
    ``width``: int32 scalars. Returns four int32 tensors of shape ``u.shape[:-1]``; all the
    boxes of an image are drawn by one set of ops.
    """
    tf = _tf()
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * u[..., :CROP_TRIES])
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = tf.exp(lo + (hi - lo) * u[..., CROP_TRIES : 2 * CROP_TRIES])
    # Python's round (half to even), as int(round(...)) in torchvision.
    w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    pick = tf.one_hot(tf.argmax(tf.cast(ok, tf.int32), axis=-1), CROP_TRIES, dtype=tf.int32)
    found = tf.reduce_any(ok, axis=-1)
    # The fallback: the largest centred box whose ratio is within the range.
    in_ratio = w_f / h_f
    narrow, wide = in_ratio < CROP_RATIO[0], in_ratio > CROP_RATIO[1]
    fb_w = tf.where(wide, tf.cast(tf.round(h_f * CROP_RATIO[1]), tf.int32), width)
    fb_h = tf.where(narrow, tf.cast(tf.round(w_f / CROP_RATIO[0]), tf.int32), height)
    crop_w = tf.where(found, tf.reduce_sum(w * pick, axis=-1), fb_w)
    crop_h = tf.where(found, tf.reduce_sum(h * pick, axis=-1), fb_h)
    # randint(0, size - crop + 1): uniform integers in [0, size - crop].
    top = tf.cast(tf.floor(u[..., -2] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[..., -1] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    top = tf.where(found, tf.minimum(top, height - crop_h), (height - crop_h) // 2)
    left = tf.where(found, tf.minimum(left, width - crop_w), (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def _resize_uint8(image, height, width):
    """Bicubic, antialiased resample (PIL's BICUBIC) of uint8 [h, w, c] to [height, width]."""
    tf = _tf()
    out = tf.image.resize(image, [height, width], method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def tf_training_views(image, seed, cfg: AugmentConfig) -> dict:
    """One image's training views, cut from the whole image (TF ops, for tf.data).

    Args:
      image: uint8 ``[h, w, c]`` with ``c`` the config's channels (see :func:`tf_to_channels`).
      seed: int64 ``[2]``, the stateless seed of this image's views.
      cfg: the augmentation settings (sizes, scales, counts).

    Returns:
      ``{"views": uint8 [V, S, S, c], "boxes": int32 [V, 4]}`` and, with local crops,
      ``"local_views": uint8 [L, s, s, c]``, ``"local_boxes": int32 [L, 4]``; a box is
      ``(top, left, height, width)`` in the image's pixels.
    """
    tf = _tf()
    glob, loc = view_specs(cfg)
    total = glob.count + (loc.count if loc else 0)
    u = tf.random.stateless_uniform([total, _UNIFORMS], seed=seed, dtype=tf.float32)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    out, row = {}, 0
    for name, spec in (("", glob), ("local_", loc)):
        if spec is None:
            continue
        boxes = tf.stack(tf_crop_box(u[row : row + spec.count], height, width, spec.scale), 1)
        views = []
        for k in range(spec.count):
            top, left, h, w = tf.unstack(boxes[k])
            crop = image[top : top + h, left : left + w]
            views.append(_resize_uint8(crop, spec.size, spec.size))
        out[f"{name}views"] = tf.stack(views)
        out[f"{name}boxes"] = boxes
        row += spec.count
    return out


def eval_resize_shape(height, width, resize: int):
    """torchvision's ``Resize(resize)`` output size: the shorter side becomes ``resize``, the
    longer ``int(resize * long / short)`` (truncated). TF int32 scalars."""
    tf = _tf()
    h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    short = tf.minimum(h_f, w_f)
    new_h = tf.where(h_f <= w_f, resize, tf.cast(tf.floor(resize * h_f / short), tf.int32))
    new_w = tf.where(w_f < h_f, resize, tf.cast(tf.floor(resize * w_f / short), tf.int32))
    return new_h, new_w


def tf_eval_view(image, resize: int, crop: int):
    """DINO's evaluation view of uint8 ``[h, w, c]``: ``Resize(resize)`` (bicubic,
    antialiased), then ``CenterCrop(crop)`` (offsets ``round((size - crop) / 2)``)."""
    tf = _tf()
    shape = tf.shape(image)
    new_h, new_w = eval_resize_shape(shape[0], shape[1], resize)
    same = tf.logical_and(tf.equal(new_h, shape[0]), tf.equal(new_w, shape[1]))
    resized = tf.cond(
        same, lambda: tf.cast(image, tf.uint8), lambda: _resize_uint8(image, new_h, new_w)
    )
    # Python's round(x / 2.0): half to even, as tf.round.
    top = tf.cast(tf.round(tf.cast(new_h - crop, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop, tf.float32) / 2.0), tf.int32)
    out = resized[top : top + crop, left : left + crop]
    return tf.ensure_shape(out, [crop, crop, image.shape[-1]])


def seed_pair(seed: int, stream: int) -> np.int64:
    """A stateless seed's first half from ``(seed, stream)``; the second half is the
    example's position in the stream (int64 [2] once stacked)."""
    mixed = np.random.SeedSequence([seed % 2**32, stream]).generate_state(2, np.uint32)
    return np.int64((int(mixed[0]) << 31) ^ int(mixed[1]))


def training_views(images, cfg: AugmentConfig, *, seed: int = 0, channels: int = 3) -> list[dict]:
    """The training views of ``images`` (a list of uint8 ``[h, w, 3]`` or ``[h, w]`` arrays
    of any sizes) as ``channels``-channel views, through the code the training uses
    (:func:`tf_training_views`).

    Returns one dict per image: ``views`` uint8 ``[V, S, S, c]`` and ``boxes`` int32
    ``[V, 4]`` (``top, left, height, width`` in that image's pixels), plus ``local_views``
    and ``local_boxes`` with local crops. Image ``i`` gets seed ``(seed, i)``. The views are
    as cut on the host, before the device's flips and colour (``augment.finish_views``).
    """
    tf = _tf()
    base = seed_pair(seed, 0)
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 pixels, got {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image {i}: expected [h, w] or [h, w, c], got {image.shape}")
        x = tf_to_channels(tf.constant(image), channels)
        views = tf_training_views(x, tf.constant([base, i], tf.int64), cfg)
        out.append({k: v.numpy() for k, v in views.items()})
    return out
