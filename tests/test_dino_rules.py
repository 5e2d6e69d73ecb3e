"""DINO's remaining rules, the ImageNet recipes' defaults, against transcriptions of the code
DINO runs: torch's ``trunc_normal_`` and ``nn.Conv2d`` initialisation, torchvision's
``ColorJitter`` order, ``DataAugmentationDINO``'s probabilities and its ``GaussianBlur`` in
each crop's own pixels. The demo (configs/default.py) keeps the project's earlier rules.
Each test's docstring names the mistake it catches.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage, special, stats

from matching_gap import augment, config_lib, models, schema

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load(name, arg=None):
    return schema.parse(config_lib.load_config_file(os.path.join(ROOT, "configs", name), arg))


# -------------------------------------------------------------------- initialisation


def torch_trunc_normal(rng, n, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """``torch.nn.init.trunc_normal_`` (``_no_grad_trunc_normal_``): a and b are bounds on the
    values, not in standard deviations."""
    norm_cdf = lambda x: (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0  # noqa: E731
    lo, hi = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
    x = rng.uniform(2 * lo - 1, 2 * hi - 1, n)
    x = special.erfinv(x) * std * math.sqrt(2.0) + mean
    return np.clip(x, a, b)


def torch_conv2d_bounds(in_channels, kernel):
    """``nn.Conv2d.reset_parameters``: ``kaiming_uniform_(weight, a=sqrt(5))`` and the bias's
    U(±1/sqrt(fan_in)); returns (weight bound, bias bound)."""
    fan_in = in_channels * kernel * kernel
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # calculate_gain("leaky_relu", sqrt(5))
    weight_bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    return weight_bound, 1 / math.sqrt(fan_in)


def test_torch_weights_are_dinos_trunc_normal_and_jax_weights_are_not():
    """Catches: JAX's truncated_normal(0.02) (cut at ±2 std, std 0.0176) taken for DINO's
    ``trunc_normal_(std=.02)``, whose ±2 bounds are absolute (effectively N(0, 0.02²))."""
    reference = torch_trunc_normal(np.random.default_rng(0), 200_000, std=0.02)
    key = jax.random.key(0)
    torch_rule = np.asarray(models.weight_init("torch")(key, (200_000,))).astype(np.float64)
    jax_rule = np.asarray(models.weight_init("jax")(key, (200_000,))).astype(np.float64)
    assert stats.ks_2samp(torch_rule, reference).pvalue > 0.01
    assert np.std(torch_rule) == pytest.approx(0.02, rel=0.01)
    assert stats.ks_2samp(jax_rule, reference).pvalue < 1e-6
    assert np.std(jax_rule) == pytest.approx(0.0176, rel=0.01)


def _vit(init):
    return models.ViT(
        width=192, depth=1, num_heads=3, mlp_dim=384, patch_size=16, image_size=64,
        channels=3, init=init, rngs=nnx.Rngs(0),
    )  # fmt: skip


def test_the_torch_rule_initialises_the_vit_as_dino():
    """Catches: the patch embedding left LeCun-normal with a zero bias (DINO's PatchEmbed is a
    Conv2d its _init_weights never touches: torch's uniform default, bias included), or the
    tokens and linear layers off DINO's N(0, 0.02²)."""
    vit = _vit("torch")
    weight_bound, bias_bound = torch_conv2d_bounds(3, 16)
    kernel = np.asarray(vit.patch_embed.kernel[...])
    bias = np.asarray(vit.patch_embed.bias[...])
    assert np.abs(kernel).max() <= weight_bound and np.abs(kernel).max() > 0.98 * weight_bound
    assert np.std(kernel) == pytest.approx(weight_bound / np.sqrt(3), rel=0.02)
    assert np.abs(bias).max() <= bias_bound and np.std(bias) > 0.4 * bias_bound
    qkv = np.asarray(vit.blocks[0].attn.qkv.kernel[...])
    assert np.std(qkv) == pytest.approx(0.02, rel=0.02)
    assert np.std(np.asarray(vit.pos_embed[...])) == pytest.approx(0.02, rel=0.05)
    legacy = _vit("jax")
    assert np.all(np.asarray(legacy.patch_embed.bias[...]) == 0)
    assert np.std(np.asarray(legacy.blocks[0].attn.qkv.kernel[...])) == pytest.approx(
        0.0176, rel=0.02
    )


@pytest.mark.parametrize("name", ["vitb16.py", "vits16.py", "m3g_vitb16.py", "dino_vits16.py"])
def test_the_imagenet_recipes_take_dinos_rules_and_the_demo_keeps_its_own(name):
    """Catches: a recipe left on the earlier rules, or the demo's figures changed by them."""
    recipe = load(name)
    assert recipe.model.init == "torch"
    assert (recipe.augment.color_jitter_order, recipe.augment.blur_sigma) == ("random", "pixels")
    demo = load("default.py")
    assert demo.model.init == "jax"
    assert (demo.augment.color_jitter_order, demo.augment.blur_sigma) == ("fixed", "scaled")


# ----------------------------------------------------------------- the strong set


def test_dinos_views_get_dinos_blur_and_solarisation_probabilities():
    """``DataAugmentationDINO``: global crop 1 blur 1.0, no solarisation; global crop 2 blur
    0.1, solarisation 0.2; local crops blur 0.5 and never solarised. Catches: local crops
    solarised with p 0.1 (the earlier strong set), or the global pair swapped."""
    for name, arg in (("dino_vits16.py", None), ("vits16.py", "strong"), ("vitb16.py", "strong")):
        cfg = load(name, arg).augment
        blur, solarize = augment._view_probs(cfg, 2, local=False)
        np.testing.assert_allclose(blur, [1.0, 0.1])
        np.testing.assert_allclose(solarize, [0.0, 0.2])
        blur, solarize = augment._view_probs(cfg, cfg.num_local_crops, local=True)
        np.testing.assert_allclose(blur, 0.5)
        np.testing.assert_allclose(solarize, 0.0)


def _rgb_to_hsv(rgb):
    import colorsys

    return np.apply_along_axis(lambda p: colorsys.rgb_to_hsv(*p), -1, rgb)


def _hsv_to_rgb(hsv):
    import colorsys

    return np.apply_along_axis(lambda p: colorsys.hsv_to_rgb(*p), -1, hsv)


def torchvision_color_jitter(img, fn_idx, b, c, s, h):
    """``ColorJitter.forward`` on a float image [H, W, 3] in [0, 1]: the four adjustments in
    ``fn_idx``'s order (``torch.randperm(4)``), each as torchvision's functional ops (a blend
    clamped to [0, 1]; contrast against the mean grey; hue rotated in HSV)."""
    gray = lambda x: x @ np.array(augment.LUMA)  # noqa: E731 (DINO jitters PIL images: PIL's weights)
    blend = lambda x, y, r: np.clip(r * x + (1 - r) * y, 0, 1)  # noqa: E731
    for fn_id in fn_idx:
        if fn_id == 0:
            img = blend(img, 0.0, b)
        elif fn_id == 1:
            img = blend(img, gray(img).mean(), c)
        elif fn_id == 2:
            img = blend(img, gray(img)[..., None], s)
        else:
            hsv = _rgb_to_hsv(img)
            hsv[..., 0] = (hsv[..., 0] + h) % 1.0
            img = np.clip(_hsv_to_rgb(hsv), 0, 1)
    return img


def test_the_jitter_runs_in_torchvisions_random_order():
    """Catches: the fixed order brightness, contrast, saturation, hue kept under
    ``color_jitter_order="random"``, or the order read from the wrong uniforms."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0.05, 0.95, (6, 6, 3))
    gaps = []
    for seed in range(6):
        u = np.asarray(jax.random.uniform(jax.random.key(seed), (augment._U_COUNT + 4,)))
        order = np.argsort(u[augment._U_ORDER])
        lerp = lambda v, lo, hi: lo + (hi - lo) * v  # noqa: E731
        b = lerp(u[augment._U_BRIGHT], 0.6, 1.4)
        c = lerp(u[augment._U_CONTRAST], 0.6, 1.4)
        s = lerp(u[augment._U_SATURATION], 0.8, 1.2)
        h = lerp(u[augment._U_HUE], -0.1, 0.1)
        expected = torchvision_color_jitter(img, order, b, c, s, h)
        ours = augment._color_jitter(jnp.asarray(u), jnp.asarray(img, jnp.float32), 1.0, True)
        np.testing.assert_allclose(ours, expected, atol=2e-4)
        fixed = torchvision_color_jitter(img, [0, 1, 2, 3], b, c, s, h)
        gaps.append(np.abs(fixed - expected).max())
    assert max(gaps) > 1e-2  # the orders drawn change the picture


def test_every_order_is_drawn_equally_often_and_the_seed_draws_them():
    """Catches: a permutation that is not uniform (torch.randperm's is), or one draw shared
    by every view (ColorJitter draws one per call, i.e. per crop)."""
    cfg = schema.AugmentConfig(color_jitter_order="random", color_jitter_prob=1.0)
    rows = jax.random.uniform(jax.random.key(0), (24_000, augment._row_size(cfg)))
    orders = np.argsort(np.asarray(rows[:, augment._U_ORDER]), axis=1)
    codes = orders @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    assert stats.chisquare(counts).pvalue > 0.001
    # The fixed order keeps the rows as they were, so the demo's views do not change.
    assert augment._row_size(schema.AugmentConfig()) == augment._U_COUNT


@pytest.mark.parametrize("size", [28, 96])
@pytest.mark.parametrize("sigma_u", [0.2, 0.6, 1.0])
def test_the_blur_sigma_is_in_each_crops_own_pixels(size, sigma_u):
    """DINO's ``GaussianBlur``: sigma ~ U(0.1, 2) pixels on every crop, a 96-pixel local crop
    as a 224 one; checked against an exact gaussian (scipy, edges replicated). Catches:
    sigma scaled by size / 224 (local crops 2.3x less blurred), or a kernel cut too short for
    sigma 2."""
    rng = np.random.default_rng(size)
    x = rng.uniform(0, 1, (size, size, 3)).astype(np.float32)
    u = np.zeros(augment._U_COUNT, np.float32)
    u[augment._U_SIGMA] = sigma_u
    sigma = 0.1 + 1.9 * sigma_u
    expected = ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest", truncate=3.0)
    ours = augment._gaussian_blur(jnp.asarray(u), jnp.asarray(x), size, in_pixels=True)
    np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_a_recipe_run_from_before_the_rules_resumes(tmp_path):
    """Catches: a workdir of an ImageNet recipe written before ``model.init`` existed refused
    as "a different model" (the initialisation only chooses a run's start)."""
    from matching_gap import checkpointing

    config = load("vits16.py", "smoke")
    saved = config.to_dict()
    del saved["model"]["init"]  # the config.json of a run from before the field
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "config.json").write_text(__import__("json").dumps(saved))
    checkpointing.check_workdir(str(tmp_path), config)  # no WorkdirError
