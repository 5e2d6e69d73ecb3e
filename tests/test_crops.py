"""The views are torchvision's RandomResizedCrop on the whole image, resampled once (bicubic,
antialiased, as PIL), and the evaluation view is DINO's Resize(256) + CenterCrop(224).

The references are transcriptions written here, from torchvision's
``transforms.RandomResizedCrop.get_params``, ``F.resize`` (``int(size * long / short)``) and
``transforms.CenterCrop`` (``int(round((size - crop) / 2.0))``), drawn with numpy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from matching_gap import augment, crops
from matching_gap.schema import AugmentConfig

RATIO = (3.0 / 4.0, 4.0 / 3.0)
SIZES = [(375, 500), (500, 375), (200, 1000)]  # (height, width)
DRAWS = 4000


def torchvision_box(rng: np.random.Generator, height: int, width: int, scale):
    """``RandomResizedCrop.get_params`` as torchvision writes it: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(RATIO):
        w = width
        h = int(round(w / min(RATIO)))
    elif in_ratio > max(RATIO):
        h = height
        w = int(round(h * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def reference_boxes(height, width, scale, n=DRAWS, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([torchvision_box(rng, height, width, scale) for _ in range(n)])


def host_boxes(height, width, scale, n=DRAWS, seed=1):
    """Boxes from ``crops.tf_crop_box``, the op ``tf_training_views`` cuts with."""
    tf = crops.import_tensorflow()
    u = tf.random.stateless_uniform([n, 2 * crops.CROP_TRIES + 2], seed=[seed, 0])
    return tf.stack(crops.tf_crop_box(u, height, width, scale), axis=1).numpy()


def device_boxes(height, width, scale, n=DRAWS, seed=2):
    """Boxes from ``augment._sample_crop_box``, the in-memory path's (on the device)."""
    u = jax.random.uniform(jax.random.key(seed), (n, augment._U_COUNT))
    box = jax.vmap(lambda row: jnp.stack(augment._sample_crop_box(row, height, width, scale)))
    return np.asarray(box(u)).astype(int)


def statistics(boxes, height, width):
    top, left, h, w = boxes.T
    share = h * w / (height * width)
    aspect = w / h
    strip = 0.1 * width
    edge = (left < strip) | (left + w > width - strip)
    return share, aspect, edge


def check_like_torchvision(boxes, height, width, scale):
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    share, aspect, edge = statistics(boxes, height, width)
    ref_share, ref_aspect, ref_edge = statistics(
        reference_boxes(height, width, scale), height, width
    )
    assert stats.ks_2samp(share, ref_share).pvalue > 1e-3
    assert stats.ks_2samp(aspect, ref_aspect).pvalue > 1e-3
    # Two proportions of DRAWS draws each: within 4 standard errors.
    p = ref_edge.mean()
    assert abs(edge.mean() - p) < 4 * math.sqrt(2 * p * (1 - p) / DRAWS) + 1e-9
    return share.mean(), edge.mean(), ref_share.mean(), ref_edge.mean()


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4), (0.08, 1.0)])
def test_host_boxes_are_torchvisions(height, width, scale):
    check_like_torchvision(host_boxes(height, width, scale), height, width, scale)


@pytest.mark.parametrize("height, width", SIZES)
def test_device_boxes_are_torchvisions(height, width):
    check_like_torchvision(device_boxes(height, width, (0.4, 1.0)), height, width, (0.4, 1.0))


def test_boxes_from_a_centre_square_fail_the_comparison():
    """The comparison catches the old rule: boxes drawn in the centre 375 x 375 square."""
    height, width, scale = 375, 500, (0.4, 1.0)
    boxes = host_boxes(height, height, scale)
    boxes[:, 1] += (width - height) // 2
    with pytest.raises(AssertionError):
        check_like_torchvision(boxes, height, width, scale)


def test_the_fallback_is_torchvisions():
    """A 1000 x 100 strip: no try fits a (0.9, 1) box, so every box is the centred fallback."""
    boxes = host_boxes(100, 1000, (0.9, 1.0), n=50)
    expected = reference_boxes(100, 1000, (0.9, 1.0), n=1)[0]
    np.testing.assert_array_equal(boxes, np.tile(expected, (50, 1)))


def recipe_config(**kw):
    base = dict(
        crop_size=224,
        crop_scale=(0.4, 1.0),
        num_views=2,
        num_local_crops=10,
        local_crop_size=96,
        local_crop_scale=(0.05, 0.4),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    return AugmentConfig(**{**base, **kw})


def smooth_image(height, width, seed=0):
    """A smooth colour image (resampling filters agree closely on it)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    channels = [
        127.5 + 120 * np.sin(x / (17 + 5 * c) + y / (23 + 3 * c) + phase[c]) for c in range(3)
    ]
    return np.clip(np.round(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def test_training_views_are_one_bicubic_resample_of_their_box():
    images = [smooth_image(375, 500), smooth_image(500, 375, 1), smooth_image(200, 1000, 2)]
    out = crops.training_views(images, recipe_config(), seed=3)
    for image, views in zip(images, out, strict=True):
        assert views["views"].shape == (2, 224, 224, 3) and views["views"].dtype == np.uint8
        assert views["local_views"].shape == (10, 96, 96, 3)
        for kind, size in (("", 224), ("local_", 96)):
            for view, (top, left, h, w) in zip(
                views[f"{kind}views"], views[f"{kind}boxes"], strict=True
            ):
                crop = Image.fromarray(image[top : top + h, left : left + w])
                expected = np.asarray(crop.resize((size, size), Image.BICUBIC)).astype(float)
                assert np.abs(view - expected).mean() < 0.6
                assert np.abs(view - expected).max() <= 6


def test_training_views_are_a_function_of_the_seed():
    images = [smooth_image(60, 90)]
    cfg = recipe_config(crop_size=32, local_crop_size=16)
    a, b = crops.training_views(images, cfg, seed=5), crops.training_views(images, cfg, seed=5)
    c = crops.training_views(images, cfg, seed=6)
    np.testing.assert_array_equal(a[0]["views"], b[0]["views"])
    np.testing.assert_array_equal(a[0]["local_boxes"], b[0]["local_boxes"])
    assert not np.array_equal(a[0]["boxes"], c[0]["boxes"])


def test_training_views_reject_bad_images():
    cfg = recipe_config(crop_size=32, local_crop_size=16)
    with pytest.raises(ValueError, match="uint8"):
        crops.training_views([np.zeros((8, 8, 3), np.float32)], cfg)
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        crops.training_views([np.zeros((2, 8, 8, 3), np.uint8)], cfg)


def torchvision_eval_box(height, width, resize, crop):
    """``Resize(resize)`` then ``CenterCrop(crop)``: the resized size and the crop's corner."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return new_h, new_w, top, left


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (256, 343), (1000, 200)])
def test_eval_view_is_dinos(height, width):
    tf = crops.import_tensorflow()
    image = smooth_image(height, width)
    new_h, new_w, top, left = torchvision_eval_box(height, width, 256, 224)
    got_h, got_w = crops.eval_resize_shape(height, width, 256)
    assert (int(got_h), int(got_w)) == (new_h, new_w)
    view = crops.tf_eval_view(tf.constant(image), 256, 224).numpy().astype(float)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    expected = resized[top : top + 224, left : left + 224].astype(float)
    if (new_h, new_w) == (height, width):  # no resample: the exact pixels
        np.testing.assert_array_equal(view, expected)
    assert np.abs(view - expected).mean() < 0.6
    assert np.abs(view - expected).max() <= 6


def test_the_views_picture_draws_each_box_where_it_is():
    from matching_gap import pictures

    image = smooth_image(120, 160)
    cfg = recipe_config(crop_size=48, local_crop_size=24, num_local_crops=3)
    views = crops.training_views([image], cfg, seed=2)[0]
    picture = pictures.views_picture(image, views, pad=6)
    boxes = np.concatenate([views["boxes"], views["local_boxes"]])
    for k, (top, left, h, w) in enumerate(boxes):
        colour = pictures._BOX_COLOURS[k]
        # Most of each box's top and left edges are in its colour (others may cross them).
        top_edge = picture[6 + top, 6 + left : 6 + left + w]
        left_edge = picture[6 + top : 6 + top + h, 6 + left]
        for edge in (top_edge, left_edge):
            assert (edge == colour).all(axis=-1).mean() > 0.5
    # The first global view is pasted right of the image, unchanged inside its frame.
    pasted = picture[6 : 6 + 48, 160 + 12 : 160 + 12 + 48]
    np.testing.assert_array_equal(pasted[3:-3, 3:-3], views["views"][0][3:-3, 3:-3])
