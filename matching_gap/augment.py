"""Random image views for self-supervised training, in pure JAX (jittable, no TensorFlow).

The pipeline per view follows SimCLR/BYOL: random resized crop -> horizontal flip ->
colour jitter -> grayscale -> gaussian blur -> solarize -> normalise. Every view of every
image draws its own randomness from the key passed in, so the functions are pure:
the same key and images give the same views.

The settings are the ``augment`` section of a config (``schema.AugmentConfig``), a frozen
(hashable) dataclass passed as a static argument: :func:`make_views` and
:func:`center_view` are already jitted (one compilation per config and input shape), and
can also be called inside a caller's jit.

Two ways in, one way out:

* :func:`make_views` cuts the crops here, on the device, from images of one size held in
  memory (Fashion-MNIST, CIFAR): each is torchvision's ``RandomResizedCrop`` box on the
  whole stored image, resampled once (bicubic, antialiased).
* :func:`finish_views` takes views already cut on the host from each image's original
  pixels (``matching_gap.crops``, for streamed images of any size: ImageNet) and applies
  the rest.

Inputs are uint8 (or float on the same 0..255 scale); outputs are float32
``(x / 255 - mean) / std``. :func:`views_for` picks the way from the batch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from matching_gap.schema import AugmentConfig

# SimCLR/BYOL aspect-ratio range of the random resized crop, and the number of tries
# before falling back to the whole image (as torchvision does).
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10
# ITU-R BT.601 luma weights (those of PIL's convert("L")): the one RGB -> grey weighting of
# the package, used here and by the loaders in matching_gap.data. They sum to 1, so grey
# pixels keep their value.
LUMA = (0.299, 0.587, 0.114)
_BLUR_SIGMA = (0.1, 2.0)

# All the randomness of one view is one row of uniforms, drawn for every view of the batch
# by a single jax.random call: each random call inlines a threefry hash, and a dozen of
# them per view made compilation ~3x slower. Positions in the row:
_U_AREA = slice(0, _CROP_TRIES)
_U_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
(
    _U_TOP,
    _U_LEFT,
    _U_FLIP,
    _U_JITTER,
    _U_BRIGHT,
    _U_CONTRAST,
    _U_SATURATION,
    _U_HUE,
    _U_GRAY,
    _U_BLUR,
    _U_SIGMA,
    _U_SOLARIZE,
) = range(2 * _CROP_TRIES, 2 * _CROP_TRIES + 12)
_U_COUNT = 2 * _CROP_TRIES + 12
# With color_jitter_order="random" each row has 4 more uniforms, whose ranks order the four
# jitter operations (a uniformly random permutation, as torch.randperm(4) in ColorJitter).
# The row grows only then, so that the fixed order draws the same numbers as before.
_U_ORDER = slice(_U_COUNT, _U_COUNT + 4)


def _row_size(cfg: AugmentConfig) -> int:
    return _U_COUNT + (4 if cfg.color_jitter_order == "random" else 0)


# --------------------------------------------------------------------------------------
# Helpers on one image [H, W, c] with values in [0, 1].


def _to_unit(images: jax.Array) -> jax.Array:
    return jnp.asarray(images).astype(jnp.float32) / 255.0


def _normalise(x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    c = x.shape[-1]
    if len(cfg.mean) not in (1, c):
        raise ValueError(f"mean/std have {len(cfg.mean)} entries for {c}-channel images")
    mean = jnp.asarray(cfg.mean, jnp.float32)
    std = jnp.asarray(cfg.std, jnp.float32)
    return (x - mean) / std


def _crop_resize(image: jax.Array, top, left, height, width, size: int) -> jax.Array:
    """Bicubic (antialiased, Keys a = -0.5 as PIL's BICUBIC, which DINO's crops use)
    resample of the box [top, top+height) x [left, left+width)."""
    scale = jnp.stack([size / height, size / width]).astype(jnp.float32)
    translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
    return jax.image.scale_and_translate(
        image,
        (size, size, image.shape[-1]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=translation,
        method="cubic",
        antialias=True,
    )


def _lerp(u: jax.Array, lo: float, hi: float) -> jax.Array:
    """Maps uniforms on [0, 1) to [lo, hi)."""
    return lo + (hi - lo) * u


def _sample_crop_box(u: jax.Array, height: int, width: int, scale: tuple[float, float]):
    """torchvision's RandomResizedCrop box (integer pixels), vectorised over its tries."""
    target = height * width * _lerp(u[_U_AREA], *scale)
    log_ratio = _lerp(u[_U_RATIO], math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    aspect = jnp.exp(log_ratio)
    w = jnp.round(jnp.sqrt(target * aspect))
    h = jnp.round(jnp.sqrt(target / aspect))
    ok = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = jnp.argmax(ok)
    found = jnp.any(ok)
    # Fallback when no try fits: the largest centred box within the ratio range.
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        fb_w, fb_h = width, round(width / _CROP_RATIO[0])
    elif in_ratio > _CROP_RATIO[1]:
        fb_w, fb_h = round(height * _CROP_RATIO[1]), height
    else:
        fb_w, fb_h = width, height
    crop_w = jnp.where(found, w[first], fb_w)
    crop_h = jnp.where(found, h[first], fb_h)
    # Uniform integer offsets in [0, size - crop], as randint(0, size - crop + 1).
    top = jnp.floor(u[_U_TOP] * (height - crop_h + 1))
    left = jnp.floor(u[_U_LEFT] * (width - crop_w + 1))
    top = jnp.where(found, jnp.minimum(top, height - crop_h), (height - crop_h) // 2)
    left = jnp.where(found, jnp.minimum(left, width - crop_w), (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def _gray(x: jax.Array) -> jax.Array:
    """[H, W, 3] -> [H, W, 1] luminance."""
    return x @ jnp.asarray(LUMA, x.dtype)[:, None]


def _rgb_to_hsv(x: jax.Array) -> jax.Array:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    delta = maxc - minc
    sat = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return jnp.stack([hue, sat, maxc], axis=-1)


def _hsv_to_rgb(x: jax.Array) -> jax.Array:
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    sector = [i == k for k in range(6)]
    r = jnp.select(sector, [v, q, p, p, t, v])
    g = jnp.select(sector, [t, v, v, q, p, p])
    b = jnp.select(sector, [p, p, t, v, v, q])
    return jnp.stack([r, g, b], axis=-1)


def _color_jitter(
    u: jax.Array, x: jax.Array, strength: float, random_order: bool = False
) -> jax.Array:
    """BYOL's jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, times
    ``strength``), each factor drawn as torchvision's ``ColorJitter.get_params``; in the fixed
    order brightness, contrast, saturation, hue, or with ``random_order`` in the order of
    the ranks of ``u[_U_ORDER]`` (torchvision applies them in ``torch.randperm(4)``'s order).
    Saturation and hue leave a one-channel image as it is (as torchvision's)."""
    colour = x.shape[-1] == 3

    def factor(position, amount):
        return _lerp(u[position], max(0.0, 1.0 - amount), 1.0 + amount)

    def brightness(x):
        return jnp.clip(x * factor(_U_BRIGHT, 0.4 * strength), 0.0, 1.0)

    def contrast(x):
        mean = jnp.mean(_gray(x) if colour else x)
        return jnp.clip((x - mean) * factor(_U_CONTRAST, 0.4 * strength) + mean, 0.0, 1.0)

    def saturation(x):
        if not colour:
            return x
        gray = _gray(x)
        return jnp.clip((x - gray) * factor(_U_SATURATION, 0.2 * strength) + gray, 0.0, 1.0)

    def hue(x):
        if not colour:
            return x
        shift = _lerp(u[_U_HUE], -0.1 * strength, 0.1 * strength)
        hsv = _rgb_to_hsv(x)
        hsv = hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)
        return jnp.clip(_hsv_to_rgb(hsv), 0.0, 1.0)

    ops = [brightness, contrast, saturation, hue]
    if not random_order:
        for op in ops:
            x = op(x)
        return x
    order = jnp.argsort(u[_U_ORDER])
    for position in range(4):
        x = jax.lax.switch(order[position], ops, x)
    return x


def _blur_kernel_size(size: int) -> int:
    # ~10% of the view, odd (23 for 224 as in BYOL), at least 3.
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def _gaussian_blur(u: jax.Array, x: jax.Array, size: int, in_pixels: bool = False) -> jax.Array:
    """Separable gaussian blur with edge padding; sigma ~ U(0.1, 2.0) * size / 224 on a
    kernel of ~10% of the view, or with ``in_pixels`` (DINO's ``GaussianBlur``: PIL's
    ``GaussianBlur(radius=sigma)`` on each crop) U(0.1, 2.0) pixels whatever the size, on a
    kernel of 3 sigma_max = 6 pixels each side (PIL approximates the gaussian by three box
    blurs; this is the exact one)."""
    sigma = _lerp(u[_U_SIGMA], *_BLUR_SIGMA)
    if in_pixels:
        radius = min(int(math.ceil(3 * _BLUR_SIGMA[1])), size - 1)
    else:
        sigma = sigma * size / 224
        radius = _blur_kernel_size(size) // 2
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-(offsets**2) / (2.0 * sigma**2))
    weights = weights / jnp.sum(weights)
    height, width = x.shape[0], x.shape[1]
    padded = jnp.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    # Started from the first term (not sum's 0): the same additions, and an array out.
    x = sum(
        (weights[i] * padded[i : i + height] for i in range(1, 2 * radius + 1)),
        weights[0] * padded[:height],
    )
    padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(
        (weights[i] * padded[:, i : i + width] for i in range(1, 2 * radius + 1)),
        weights[0] * padded[:, :width],
    )


def _one_view(
    u: jax.Array,
    image: jax.Array,
    cfg: AugmentConfig,
    size: int,
    scale: tuple[float, float],
    blur_prob: jax.Array,
    solarize_prob: jax.Array,
) -> jax.Array:
    """[H, W, c] in [0, 1] and uniforms [_U_COUNT] -> one view [size, size, c] in [0, 1].

    ``blur_prob`` and ``solarize_prob``: this view's probabilities (they may differ per view).
    """
    height, width = image.shape[0], image.shape[1]
    top, left, crop_h, crop_w = _sample_crop_box(u, height, width, scale)
    x = _crop_resize(image, top, left, crop_h, crop_w, size)
    return _finish_view(u, x, cfg, blur_prob, solarize_prob)


def _finish_view(
    u: jax.Array, x: jax.Array, cfg: AugmentConfig, blur_prob: jax.Array, solarize_prob: jax.Array
) -> jax.Array:
    """Everything after the crop: a cut view [size, size, c] in [0, 1] -> the view."""
    size = x.shape[0]
    colour = x.shape[-1] == 3
    # The resampler can overshoot [0, 1] slightly; later ops assume that range.
    x = jnp.clip(x, 0.0, 1.0)
    # Ops with probability 0 are left out of the traced graph (the config is static).
    if cfg.flip:
        x = jnp.where(u[_U_FLIP] < 0.5, x[:, ::-1], x)
    if cfg.color_jitter_prob > 0:
        random_order = cfg.color_jitter_order == "random"
        jittered = _color_jitter(u, x, cfg.color_jitter_strength, random_order)
        x = jnp.where(u[_U_JITTER] < cfg.color_jitter_prob, jittered, x)
    if colour and cfg.grayscale_prob > 0:
        gray = jnp.broadcast_to(_gray(x), x.shape)
        x = jnp.where(u[_U_GRAY] < cfg.grayscale_prob, gray, x)
    if max((cfg.blur_prob,) + cfg.view_blur_probs) > 0:
        blurred = _gaussian_blur(u, x, size, cfg.blur_sigma == "pixels")
        x = jnp.where(u[_U_BLUR] < blur_prob, blurred, x)
    if max((cfg.solarize_prob,) + cfg.view_solarize_probs) > 0:
        solarized = jnp.where(x > 0.5, 1.0 - x, x)
        x = jnp.where(u[_U_SOLARIZE] < solarize_prob, solarized, x)
    return x


def _view_probs(cfg: AugmentConfig, count: int, local: bool) -> tuple[jax.Array, jax.Array]:
    """Blur and solarize probabilities ``[count]`` of the global (or local) views."""
    blur = (cfg.blur_prob,) * count if local or not cfg.view_blur_probs else cfg.view_blur_probs
    solarize = (
        (cfg.solarize_prob,) * count
        if local or not cfg.view_solarize_probs
        else cfg.view_solarize_probs
    )
    return jnp.asarray(blur, jnp.float32), jnp.asarray(solarize, jnp.float32)


def _views(
    u: jax.Array, x: jax.Array, cfg: AugmentConfig, size: int, scale, *, local: bool = False
) -> jax.Array:
    """Uniforms [count, b, _U_COUNT], images [b, H, W, c] -> [count, b, size, size, c]."""
    blur, solarize = _view_probs(cfg, u.shape[0], local)
    one = lambda row, image, pb, ps: _one_view(row, image, cfg, size, scale, pb, ps)
    per_image = jax.vmap(one, in_axes=(0, 0, None, None))
    return jax.vmap(per_image, in_axes=(0, None, 0, 0))(u, x, blur, solarize)


# Jitted here because the vmapped pipeline is slow op-by-op (~100x); wrapping it in
# another jax.jit (static_argnums=2) simply inlines it.
@functools.partial(jax.jit, static_argnums=2)
def make_views(
    key: jax.Array, images: jax.Array, cfg: AugmentConfig
) -> tuple[jax.Array, jax.Array | None]:
    """Random normalised views of a batch of images.

    Args:
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      images: uint8 (or float, 0..255) ``[b, H, W, c]``.
      cfg: the (static, hashable) augmentation settings.

    Returns:
      ``(global_views, local_views)``: float32 ``[num_views, b, crop_size, crop_size, c]``
      and ``[num_local_crops, b, local_crop_size, local_crop_size, c]``, or None without
      local crops.
    """
    x = _to_unit(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [b, H, W, c], got shape {x.shape}")
    # One draw for all views: independent rows for every (view, image) pair.
    u = jax.random.uniform(key, (cfg.num_views + cfg.num_local_crops, x.shape[0], _row_size(cfg)))
    views = _views(u[: cfg.num_views], x, cfg, cfg.crop_size, cfg.crop_scale)
    views = _normalise(views, cfg)
    if not cfg.num_local_crops:
        return views, None
    local = _views(
        u[cfg.num_views :], x, cfg, cfg.local_crop_size, cfg.local_crop_scale, local=True
    )
    return views, _normalise(local, cfg)


def _finish(
    u: jax.Array, views: jax.Array, cfg: AugmentConfig, *, local: bool = False
) -> jax.Array:
    """Uniforms [count, b, _U_COUNT], cut views [b, count, S, S, c] in [0, 1] ->
    [count, b, S, S, c]."""
    blur, solarize = _view_probs(cfg, u.shape[0], local)
    one = lambda row, view, pb, ps: _finish_view(row, view, cfg, pb, ps)
    per_image = jax.vmap(one, in_axes=(0, 0, None, None))
    return jax.vmap(per_image, in_axes=(0, 1, 0, 0))(u, views, blur, solarize)


@functools.partial(jax.jit, static_argnums=3)
def finish_views(
    key: jax.Array, views: jax.Array, local_views: jax.Array | None, cfg: AugmentConfig
) -> tuple[jax.Array, jax.Array | None]:
    """The views of :func:`make_views` from views already cut on the host
    (``matching_gap.crops``): flips, colour, blur, solarisation and normalisation.

    Args:
      key: a PRNG key.
      views: uint8 ``[b, num_views, crop_size, crop_size, c]``.
      local_views: uint8 ``[b, num_local_crops, local_crop_size, local_crop_size, c]`` or None.
      cfg: the augmentation settings.

    Returns:
      float32 ``[num_views, b, S, S, c]`` and ``[num_local_crops, b, s, s, c]`` (or None).
    """
    x = _to_unit(views)
    if x.ndim != 5 or x.shape[1] != cfg.num_views:
        raise ValueError(
            f"views must be [b, {cfg.num_views}, S, S, c] (augment.num_views), got {x.shape}"
        )
    count = cfg.num_views + cfg.num_local_crops
    u = jax.random.uniform(key, (count, x.shape[0], _row_size(cfg)))
    out = _normalise(_finish(u[: cfg.num_views], x, cfg), cfg)
    if not cfg.num_local_crops:
        return out, None
    if local_views is None or local_views.shape[1] != cfg.num_local_crops:
        raise ValueError(f"expected {cfg.num_local_crops} local views per image")
    local = _finish(u[cfg.num_views :], _to_unit(local_views), cfg, local=True)
    return out, _normalise(local, cfg)


def views_for(key: jax.Array, batch, cfg: AugmentConfig):
    """The normalised ``(global, local)`` views of a training batch: images ``[b, H, W, c]``
    are cut here (:func:`make_views`); a dict of host-cut ``views`` (and ``local_views``)
    is finished here (:func:`finish_views`). The same key gives the same flips and colour."""
    if isinstance(batch, dict):
        return finish_views(key, batch["views"], batch.get("local_views"), cfg)
    return make_views(key, batch, cfg)


@functools.partial(jax.jit, static_argnums=1)
def center_view(images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Deterministic evaluation view: float32 ``[b, crop_size, crop_size, c]``.

    An image larger than ``crop_size`` is centre-cropped to a square of
    ``eval_crop_fraction`` of its shorter side (0.875 with 256 -> 224 is the ImageNet
    protocol); a smaller one keeps its whole centred square. Either is then resized
    (bicubic, antialiased) to ``crop_size`` and normalised like the training views.

    This works on images held in memory at ``data.image_size`` (shorter side resized to it,
    then its centre square). Streamed images arrive as DINO's view already
    (``crops.tf_eval_view``, at ``crop_size``), which this leaves as they are.
    """
    x = _to_unit(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [b, H, W, c], got shape {x.shape}")
    _, height, width, channels = x.shape
    size = cfg.crop_size
    side = float(min(height, width))
    if side > size:
        side *= cfg.eval_crop_fraction
    if not (height == width == side == size):
        scale = size / side
        x = jax.image.scale_and_translate(
            x,
            (x.shape[0], size, size, channels),
            spatial_dims=(1, 2),
            scale=jnp.array([scale, scale], jnp.float32),
            translation=-jnp.array([height - side, width - side], jnp.float32) / 2 * scale,
            method="cubic",
            antialias=True,
        )
        x = jnp.clip(x, 0.0, 1.0)
    return _normalise(x, cfg)
