"""Tests of matching_gap.augment: shapes, exactness of the identity cases, randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matching_gap import augment, schema
from matching_gap.augment import LUMA, AugmentConfig, center_view, make_views

UNIT = dict(mean=(0.0,), std=(1.0,))  # views equal x / 255, easy to compare
RGB_UNIT = dict(mean=(0.0,) * 3, std=(1.0,) * 3)
IDENTITY = dict(crop_scale=(1.0, 1.0), flip=False, **UNIT)


def _images(b=4, size=16, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, c), dtype=np.uint8)


def test_shapes_and_dtypes():
    images = _images(b=3, size=20, c=3)
    cfg = AugmentConfig(crop_size=12, num_views=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    views, no_local = make_views(jax.random.key(0), images, cfg)
    assert views.shape == (3, 3, 12, 12, 3) and views.dtype == jnp.float32
    assert no_local is None  # the same (global, local) pair without local crops

    cfg = AugmentConfig(crop_size=12, num_local_crops=4, local_crop_size=6)
    global_views, local_views = make_views(jax.random.key(0), _images(b=3, size=20), cfg)
    assert global_views.shape == (2, 3, 12, 12, 1) and local_views.shape == (4, 3, 6, 6, 1)
    assert local_views.dtype == jnp.float32


def test_full_crop_without_flip_is_the_image():
    images = _images()
    views = make_views(jax.random.key(1), images, AugmentConfig(crop_size=16, **IDENTITY))[0]
    for view in views:
        np.testing.assert_allclose(view, images / 255.0, atol=1e-5)
    # To another size it is the bicubic resize of the whole image (clipped to [0, 1]).
    views = make_views(jax.random.key(1), images, AugmentConfig(crop_size=8, **IDENTITY))[0]
    expected = jax.image.resize(images / 255.0, (4, 8, 8, 1), "cubic", antialias=True)
    expected = np.clip(expected, 0.0, 1.0)
    np.testing.assert_allclose(views[0], expected, atol=1e-5)


def test_flip_only_is_np_flip():
    images = _images(b=32)
    cfg = AugmentConfig(crop_size=16, crop_scale=(1.0, 1.0), flip=True, **UNIT)
    views = np.asarray(make_views(jax.random.key(2), images, cfg)[0])
    unit = images / 255.0
    flipped = [
        np.allclose(v, np.flip(x, axis=1), atol=1e-5) for v, x in zip(views[0], unit, strict=True)
    ]
    kept = [np.allclose(v, x, atol=1e-5) for v, x in zip(views[0], unit, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # exactly one of the two
    assert 4 <= sum(flipped) <= 28


def test_random_crop_stays_inside_the_image():
    # A constant image stays constant under any crop box and resample.
    images = np.full((8, 16, 16, 1), 200, np.uint8)
    views = make_views(jax.random.key(3), images, AugmentConfig(crop_size=10, **UNIT))[0]
    np.testing.assert_allclose(views, 200 / 255.0, atol=1e-5)


def test_determinism_and_independence():
    images = np.repeat(_images(b=1), 4, axis=0)  # the same image four times
    cfg = AugmentConfig(crop_size=12, color_jitter_prob=0.8, blur_prob=0.5, solarize_prob=0.2)
    a = make_views(jax.random.key(4), images, cfg)[0]
    b = make_views(jax.random.key(4), images, cfg)[0]
    c = make_views(jax.random.key(5), images, cfg)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    flat = np.asarray(a).reshape(8, -1)  # 2 views x 4 copies of one image
    for i in range(8):
        for j in range(i):
            assert not np.allclose(flat[i], flat[j]), (i, j)
    # Legacy uint32 keys work too.
    assert make_views(jax.random.PRNGKey(0), images, cfg)[0].shape == (2, 4, 12, 12, 1)


def test_jit_inside_jit():
    images = _images(c=3)
    cfg = AugmentConfig(
        crop_size=12,
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_prob=0.5,
        solarize_prob=0.2,
        num_local_crops=2,
        local_crop_size=6,
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.2, 0.2),
    )
    jitted = jax.jit(make_views, static_argnums=2)
    # make_views is jitted already; an outer jit must inline it to the same result.
    for direct, compiled in zip(
        make_views(jax.random.key(6), images, cfg),
        jitted(jax.random.key(6), images, cfg),
        strict=True,
    ):
        np.testing.assert_allclose(direct, compiled, atol=1e-4)
        assert np.all(np.isfinite(compiled))
    views = jitted(jax.random.key(6), images, cfg)[0]
    assert float(views.min()) >= -2.5 - 1e-5 and float(views.max()) <= 2.5 + 1e-5


def test_grayscale_gives_equal_channels():
    cfg = AugmentConfig(crop_size=16, grayscale_prob=1.0, **{**IDENTITY, **RGB_UNIT})
    views = np.asarray(make_views(jax.random.key(7), _images(c=3), cfg)[0])
    np.testing.assert_allclose(views[..., 0], views[..., 1], atol=1e-6)
    np.testing.assert_allclose(views[..., 0], views[..., 2], atol=1e-6)
    assert views.std() > 0.1  # not blanked out


def test_grayscale_uses_the_package_luma():
    # The loaders in matching_gap.data convert colour to grey with the same constant.
    images = _images(b=2, size=8, c=3) / 255.0
    expected = images @ np.asarray(LUMA, np.float64)
    gray = augment._gray(jnp.asarray(images, jnp.float32))
    np.testing.assert_allclose(gray[..., 0], expected, atol=2e-6)
    assert sum(LUMA) == pytest.approx(1.0, abs=1e-12)  # grey pixels keep their value


def test_colour_ops_change_the_image_and_keep_range():
    images = _images(b=8, size=64, c=3)
    # Blur's sigma scales with crop_size / 224: at 16 pixels it is invisible, so use 64.
    for field in ("color_jitter_prob", "blur_prob", "solarize_prob"):
        cfg = AugmentConfig(crop_size=64, **{**IDENTITY, **RGB_UNIT, field: 1.0})
        views = np.asarray(make_views(jax.random.key(8), images, cfg)[0])
        assert views.min() >= 0.0 and views.max() <= 1.0, field
        assert not np.allclose(views[0], images / 255.0, atol=1e-3), field
        if field != "solarize_prob":  # blur and jitter keep the overall brightness
            assert abs(views.mean() - images.mean() / 255.0) < 0.15, field


@pytest.mark.parametrize("field", ["blur", "solarize"])
def test_per_view_probabilities_apply_to_their_own_view(field):
    """BYOL's asymmetric views: view 1 always, view 2 never (the same uniforms otherwise),
    so each view equals the one made with that probability for every view."""
    images = _images(b=6, size=64, c=3)
    key = jax.random.key(10)
    make = lambda **kw: np.asarray(
        make_views(key, images, AugmentConfig(crop_size=64, **{**RGB_UNIT, **kw}))[0]
    )
    per_view = make(**{f"view_{field}_probs": (1.0, 0.0)})
    always, never = make(**{f"{field}_prob": 1.0}), make()
    np.testing.assert_array_equal(per_view[0], always[0])
    np.testing.assert_array_equal(per_view[1], never[1])
    assert not np.allclose(always[1], never[1])  # the op does change view 2 when applied


def test_solarize_inverts_bright_pixels():
    images = np.array([0, 64, 128, 192, 255], np.uint8).reshape(1, 1, 5, 1)
    images = np.broadcast_to(images, (1, 5, 5, 1))
    cfg = AugmentConfig(crop_size=5, solarize_prob=1.0, **IDENTITY)
    views = np.asarray(make_views(jax.random.key(9), images, cfg)[0])[0, 0, 0, :, 0]
    np.testing.assert_allclose(views, [0, 64 / 255, 127 / 255, 63 / 255, 0], atol=1e-5)


def test_normalisation():
    images = np.full((2, 8, 8, 3), 51, np.uint8)  # 0.2
    cfg = AugmentConfig(crop_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 1.0, 2.0))
    views = np.asarray(make_views(jax.random.key(10), images, cfg)[0])
    np.testing.assert_allclose(views[..., 0], 0.2, atol=1e-5)
    np.testing.assert_allclose(views[..., 1], 0.0, atol=1e-5)
    np.testing.assert_allclose(views[..., 2], -0.05, atol=1e-5)
    np.testing.assert_allclose(center_view(images, cfg)[0, 0, 0], [0.2, 0.0, -0.05], atol=1e-5)
    with pytest.raises(ValueError, match="mean/std"):
        make_views(
            jax.random.key(0),
            _images(c=1),
            AugmentConfig(crop_size=8, **{"mean": (0.5, 0.5), "std": (0.5, 0.5)}),
        )


def test_center_view():
    images = _images(b=2, size=16)
    same = center_view(images, AugmentConfig(crop_size=16, **UNIT))
    assert same.shape == (2, 16, 16, 1) and same.dtype == jnp.float32
    np.testing.assert_allclose(same, images / 255.0, atol=1e-6)
    # A 0.5 centre crop of 16 pixels to 8 is exactly the middle 8x8.
    cfg = AugmentConfig(crop_size=8, eval_crop_fraction=0.5, **UNIT)
    np.testing.assert_allclose(center_view(images, cfg), images[:, 4:12, 4:12] / 255.0, atol=1e-5)
    small = center_view(_images(b=2, size=6), AugmentConfig(crop_size=12, eval_crop_fraction=0.5))
    assert small.shape == (2, 12, 12, 1)


def test_the_augment_section_of_a_config():
    cfg = {"crop_size": 28, "crop_scale": [0.3, 1.0], "mean": (0.28,), "std": (0.35,)}
    aug = schema.parse({"augment": cfg, "model": {"image_size": 28}}).augment
    assert aug.crop_scale == (0.3, 1.0) and aug.num_views == 2 and aug.crop_size == 28
    hash(aug)  # usable as a static jit argument
    with pytest.raises(ValueError, match="colour_jitter"):
        schema.parse({"augment": {**cfg, "colour_jitter": 0.5}})
    with pytest.raises(ValueError, match="local_crop_size"):
        AugmentConfig(crop_size=8, num_local_crops=2)
