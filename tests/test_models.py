"""Tests for matching_gap.models: ViT encoder, MLP heads, SSLModel and create_model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from matching_gap.errors import ConfigError
from matching_gap.models import (
    Attention,
    MLPHead,
    SSLModel,
    ViT,
    create_model,
)
from matching_gap.schema import VIT_VARIANTS, ModelConfig, parse_variant

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=7, image_size=28, channels=1)


def _num_params(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _images(batch=4, size=28, channels=1, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def _tiny_vit(**overrides):
    return ViT(**{**TINY, **overrides}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "variant, expected",
    [
        # timm vit_base_patch16_224: 86,567,656 including the 768*1000+1000 classifier.
        ("B/16", 86_567_656 - (768 * 1000 + 1000)),
        # timm vit_small_patch16_224: 22,050,664 including the 384*1000+1000 classifier.
        ("S/16", 22_050_664 - (384 * 1000 + 1000)),
    ],
)
def test_param_count_matches_reference_vit(variant, expected):
    model = nnx.eval_shape(
        lambda: ViT(**parse_variant(variant), image_size=224, channels=3, rngs=nnx.Rngs(0))
    )
    assert _num_params(model) == expected
    # Everything in the state is a parameter, so split/merge round-trips only params.
    assert len(jax.tree.leaves(nnx.state(model))) == len(
        jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    assert model.num_features == VIT_VARIANTS[variant.split("/")[0]]["width"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_shapes(pooling):
    model = _tiny_vit(pooling=pooling)
    out = model(_images(3))
    assert out.shape == (3, TINY["width"])
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert model.num_features == TINY["width"]
    # Mean pooling has no CLS token, so one token fewer.
    n_tokens = model.tokens(_images(3)).shape[1]
    assert n_tokens == 16 + (pooling == "cls")


def test_position_embedding_interpolation():
    model = _tiny_vit()  # 4x4 patch grid
    out = model(_images(2, size=14))  # 2x2 patch grid
    assert out.shape == (2, TINY["width"]) and np.all(np.isfinite(out))
    # Bilinear 4x4 -> 2x2 with half-pixel centres averages each 2x2 block.
    pos = np.asarray(model.pos_embed[...])
    expected = pos.reshape(2, 2, 2, 2, -1).mean(axis=(1, 3)).reshape(1, 4, -1)
    np.testing.assert_allclose(model._position_embedding(2, 2), expected, atol=1e-6)
    # Non-square, larger inputs work too.
    assert model(_images(1, size=28)[:, :, :21]).shape == (1, TINY["width"])
    with pytest.raises(ValueError, match="divisible"):
        model(_images(1, size=15))


@pytest.mark.slow
def test_drop_path():
    images = _images(8)
    model = _tiny_vit(drop_path_rate=0.5)
    np.testing.assert_array_equal(model(images), model(images))
    key = jax.random.key(1)
    a, b = model(images, key=key), model(images, key=jax.random.key(2))
    np.testing.assert_array_equal(a, model(images, key=key))
    assert not np.allclose(a, b)
    assert not np.allclose(a, model(images))

    no_drop = _tiny_vit(drop_path_rate=0.0)
    np.testing.assert_array_equal(no_drop(images, key=key), no_drop(images))


def test_drop_path_rates_increase_linearly():
    model = _tiny_vit(depth=5, drop_path_rate=0.2)
    rates = [block.drop_path_rate for block in model.blocks]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.slow
def test_bfloat16_compute():
    images = _images(4)
    f32 = _tiny_vit()
    bf16 = _tiny_vit(dtype=jnp.bfloat16)
    out = bf16(images)
    assert out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    ref = f32(images)
    np.testing.assert_allclose(out, ref, atol=0.1 * float(np.abs(ref).max()), rtol=0.1)


@pytest.mark.slow
def test_remat_matches_plain():
    images, key = _images(4), jax.random.key(3)
    plain = _tiny_vit(drop_path_rate=0.3)
    remat = _tiny_vit(drop_path_rate=0.3, remat=True)

    def loss(model):
        return jnp.sum(model(images, key=key) ** 2)

    np.testing.assert_allclose(remat(images, key=key), plain(images, key=key), atol=1e-6)
    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_plain, g_remat
    )


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.slow
def test_pure_jit_split_merge(remat):
    model = SSLModel(
        _tiny_vit(drop_path_rate=0.1, remat=remat),
        MLPHead(TINY["width"], 16, 8, rngs=nnx.Rngs(1)),
        MLPHead(8, 16, 8, rngs=nnx.Rngs(2)),
    )
    graphdef, params = nnx.split(model)
    images = _images(4)

    @jax.jit
    def loss_fn(params, images, key):
        out = nnx.merge(graphdef, params)(images, key=key)
        return jnp.mean(out["predictions"] ** 2) + jnp.mean(out["features"] ** 2)

    key = jax.random.key(0)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, images, key)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, loss_fn(params, images, key), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
    # Merging must not mutate anything: the state after a call is identical.
    _, params_after = nnx.split(nnx.merge(graphdef, params))
    jax.tree.map(np.testing.assert_array_equal, params, params_after)


def test_mlp_head_layers():
    one = MLPHead(8, 32, 4, num_layers=1, rngs=nnx.Rngs(0))
    assert len(one.layers) == 1 and _num_params(one) == 8 * 4 + 4
    three = MLPHead(8, 32, 4, num_layers=3, rngs=nnx.Rngs(0))
    assert _num_params(three) == (8 * 32 + 32) + (32 * 32 + 32) + (32 * 4 + 4)
    assert three(jnp.ones((2, 8))).shape == (2, 4)
    with pytest.raises(ValueError):
        MLPHead(8, 32, 4, num_layers=0, rngs=nnx.Rngs(0))


def test_batchnorm_head_normalises_over_the_batch():
    """BatchNorm on batch statistics: every hidden unit has mean 0 / variance 1 over the
    batch before the activation, so shifting every input by the same vector changes nothing
    (it does change a head without the norm)."""
    x = jax.random.normal(jax.random.key(1), (16, 8))
    shift = jnp.linspace(-3.0, 3.0, 8)
    head = MLPHead(8, 32, 4, num_layers=2, batchnorm=True, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(head(x + shift), head(x), atol=1e-4)
    plain = MLPHead(8, 32, 4, num_layers=2, rngs=nnx.Rngs(0))
    assert not np.allclose(plain(x + shift), plain(x), atol=1e-2)
    pre = np.asarray(head.layers[0](x), np.float64)
    expected = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-5)  # scale 1, bias 0 at init
    np.testing.assert_allclose(head.norms[0](head.layers[0](x)), expected, atol=1e-4)
    assert _num_params(head) == _num_params(plain) + 2 * 32  # a scale and a bias per unit


def test_conv_stem_feeds_the_patch_embedding():
    vit = _tiny_vit(stem_channels=8)
    assert vit.stem.kernel.shape == (3, 3, 1, 8)
    assert vit.patch_embed.kernel.shape == (7, 7, 8, 32)
    x = _images(2)
    # By hand: the 3x3 convolution + GELU, then the same ViT from its patch embedding on.
    stem = jax.lax.conv_general_dilated(
        x, vit.stem.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    hidden = jax.nn.gelu(stem + vit.stem.bias[...], approximate=False)
    vit_without = nnx.clone(vit)
    vit_without.stem, vit_without.channels = None, 8
    np.testing.assert_allclose(vit(x), vit_without.tokens(hidden)[:, 0], atol=1e-5)


def test_parse_variant():
    assert parse_variant("B/16") == dict(
        width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16
    )
    assert parse_variant("Ti/4")["width"] == 192
    assert parse_variant("L/16")["depth"] == 24
    assert parse_variant("S/8")["patch_size"] == 8
    for bad in ["X/16", "B", "B/", "B/x", "b16", "", "B/0"]:
        with pytest.raises(ValueError, match="B/16|patch"):
            parse_variant(bad)


def _config(**overrides):
    """A small model with a predictor; the other fields keep the schema's defaults."""
    sizes = dict(width=32, depth=2, num_heads=4, mlp_dim=64, drop_path_rate=0.1)
    heads = dict(projector_hidden_dim=48, projector_dim=16, predictor_hidden_dim=24)
    return ModelConfig(**{**sizes, **heads, "use_predictor": True, **overrides})


def test_create_model_custom():
    model = create_model(_config(), rngs=nnx.Rngs(0))
    out = model(_images(3), key=jax.random.key(0))
    assert out["features"].shape == (3, 32)
    assert out["projections"].shape == (3, 16)
    assert out["predictions"].shape == (3, 16)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert model.predictor.layers[0].kernel.shape == (16, 24)
    np.testing.assert_array_equal(model.encode(_images(3)), model(_images(3))["features"])

    no_pred = create_model(_config(use_predictor=False, dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = no_pred(_images(2))
    assert no_pred.predictor is None
    np.testing.assert_array_equal(out["predictions"], out["projections"])
    assert out["projections"].dtype == jnp.float32


def test_create_model_variant():
    cfg = _config(variant="S/16", image_size=224, channels=3, projector_hidden_dim=4096)
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
    assert _num_params(model.encoder) == 21_665_664
    assert model.encoder.num_features == 384


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_size=30), "image_size"),
        (dict(num_heads=5), "num_heads"),
        (dict(dtype="float16"), "dtype"),
        (dict(pooling="max"), "pooling"),
        (dict(variant="Q/16"), "variant"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(projector_layers=0), "projector_layers"),
        (dict(attention="flash"), "attention"),
        (dict(attention="cudnn"), "needs a GPU and model.dtype='bfloat16'"),
    ],
)
def test_create_model_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        create_model(_config(**overrides), rngs=nnx.Rngs(0))  # the config or the model says


def _encode_config(depth):
    """A tiny CLS model (width 16, 8 x 8 images of 4 x 4 patches) for the encode tests."""
    return ModelConfig(
        width=16,
        depth=depth,
        num_heads=2,
        mlp_dim=32,
        patch_size=4,
        image_size=8,
        projector_hidden_dim=8,
        projector_dim=4,
    )


def test_encode_cls_avgpool_concatenates_cls_and_mean_patch_token():
    cfg = _encode_config(depth=1)
    model = create_model(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    tokens = model.encoder.tokens(images)
    feats = model.encode(images, "cls_avgpool")
    assert feats.shape == (3, 32)
    np.testing.assert_allclose(feats[:, :16], model.encode(images), rtol=1e-6)
    np.testing.assert_allclose(feats[:, 16:], tokens[:, 1:].mean(axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown features"):
        model.encode(images, "last4")


def test_encode_last4_cls_and_mean_patch_follow_dino_and_ijepa():
    cfg = _encode_config(depth=5)
    model = create_model(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    # By hand: run the blocks one by one; DINO applies the final norm to each kept output.
    vit = model.encoder
    x = vit.patch_embed(images).reshape(3, 4, 16) + vit._position_embedding(2, 2)
    cls = jnp.broadcast_to(vit.cls_token[...] + vit.cls_pos_embed[...], (3, 1, 16))
    x = jnp.concatenate([cls, x], axis=1)
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(vit.norm(x)[:, 0])
    feats = model.encode(images, "last4_cls")
    assert feats.shape == (3, 64)
    np.testing.assert_allclose(feats, jnp.concatenate(outputs[-4:], axis=-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.encode(images, "mean_patch"), vit.norm(x)[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-6
    )
    shallow = create_model(_encode_config(depth=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="depth >= 4"):
        shallow.encode(images, "last4_cls")


def dino_linear_features(intermediate_output, avgpool):
    """DINO's eval_linear.py (facebookresearch/dino), given ``get_intermediate_layers(inp, n)``
    (the final norm applied to each of the last n blocks' outputs):

    output = [x[:, 0] for x in intermediate_output]
    if avgpool:
        output.append(torch.mean(intermediate_output[-1][:, 1:], dim=1))
    output = torch.cat(output, dim=-1)
    """
    output = [x[:, 0] for x in intermediate_output]
    if avgpool:
        output.append(jnp.mean(intermediate_output[-1][:, 1:], axis=1))
    return jnp.concatenate(output, axis=-1)


@pytest.mark.parametrize(
    "features,n_last_blocks,avgpool",
    [("last4_cls", 4, False), ("cls_avgpool", 1, True)],  # DINO's ViT-S and ViT-B settings
)
def test_probe_features_are_dinos_eval_linear_features(features, n_last_blocks, avgpool):
    model = create_model(_encode_config(depth=5), rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    vit = model.encoder
    # get_intermediate_layers by hand: the blocks one by one, the final norm on each output.
    x = vit.patch_embed(images).reshape(3, 4, 16) + vit._position_embedding(2, 2)
    cls = jnp.broadcast_to(vit.cls_token[...] + vit.cls_pos_embed[...], (3, 1, 16))
    x = jnp.concatenate([cls, x], axis=1)
    intermediate = []
    for block in vit.blocks:
        x = block(x)
        intermediate.append(vit.norm(x))
    expected = dino_linear_features(intermediate[-n_last_blocks:], avgpool)
    got = model.encode(images, features)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # DINO's eval_knn.py votes on model(samples): the normed last block's CLS token.
    np.testing.assert_allclose(
        model.encode(images, "cls"), intermediate[-1][:, 0], rtol=1e-5, atol=1e-6
    )


def test_attention_matches_the_textbook_formula():
    attn = Attention(16, 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    qkv = attn.qkv(x).reshape(2, 5, 3, 4, 4)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    expected = attn.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 16))
    np.testing.assert_allclose(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_attention_alone_refuses_an_implementation_jax_does_not_have():
    """The module built on its own (without a ViT's checks) refuses at once, not at its first
    call inside ``jax.nn.dot_product_attention``."""
    with pytest.raises(ConfigError, match="attention must be one of .*got 'flash'"):
        Attention(
            16,
            4,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            rngs=nnx.Rngs(0),
            implementation="flash",
        )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN attention runs on GPUs")
def test_cudnn_attention_off_gpu_says_to_use_xla():
    with pytest.raises(ValueError, match="needs a GPU.*Use model.attention='xla'"):
        create_model(_config(attention="cudnn", dtype="bfloat16"), rngs=nnx.Rngs(0))
    vit = _tiny_vit(attention="cudnn", dtype=jnp.bfloat16)  # the module alone checks too
    with pytest.raises(ValueError, match="needs a GPU.*Use model.attention='xla'"):
        vit(_images(2))
