"""Vision Transformer encoder and projection heads for self-supervised learning (Flax NNX).

The modules are written so that a training loop can work with pure functions: it splits the
model once with ``nnx.split`` and re-merges it inside a jitted step. Nothing random is stored in
the modules; ``nnx.Rngs`` is only used at construction to initialise parameters, and the
stochastic parts (drop path) take an explicit ``key`` argument at call time, where ``key=None``
means deterministic (evaluation) behaviour.

Contents:

* :class:`ViT`: a standard pre-LayerNorm ViT (as in DINO / timm) returning pooled features.
* :class:`MLPHead`: ``Linear -> GELU -> ... -> Linear`` projector / predictor.
* :class:`DINOHead`: DINO's projection head (MLP to a bottleneck, L2 normalisation, a
  weight-normalised last layer).
* :class:`SSLModel`: encoder + projector + optional predictor.
* :func:`create_model` builds an :class:`SSLModel` from the ``model`` section of a config
  (``schema.ModelConfig``; ``schema.VIT_VARIANTS`` names the standard sizes).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from matching_gap import errors
from matching_gap.schema import ATTENTIONS, FEATURES, ModelConfig
from matching_gap.schema import check_encoder as _check_encoder

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# LayerNorm's epsilon in DINO / timm ViTs (the schema's default); Hugging Face's ViTConfig
# defaults to 1e-12, so a ViT imported from such a file needs its own (model.layer_norm_eps).
LAYER_NORM_EPS = ModelConfig.layer_norm_eps


def _check_cudnn_attention(dtype) -> None:
    """cuDNN's flash attention runs on GPUs in 16-bit floats only: say so before it fails."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise errors.ConfigError(
            "model.attention='cudnn' (cuDNN flash attention) needs a GPU and "
            f"model.dtype='bfloat16'; got backend {jax.default_backend()!r} and dtype "
            f"{jnp.dtype(dtype).name!r}. Use model.attention='xla', which computes the same "
            "function."
        )


# The weights of every linear layer and the learned tokens (schema.INITS, model.init):
# "jax": JAX's truncated_normal(0.02), cut at +-2 standard deviations and not rescaled, so its
# std is 0.0176; what the project trained with before 2026-12 (the demo keeps it).
# "torch": DINO's trunc_normal_(std=.02), whose bounds a=-2, b=2 are absolute (torch's
# convention), i.e. +-100 standard deviations: in effect N(0, 0.02^2). The ImageNet recipes
# take it, with torch's default initialisation of the patch embedding (a Conv2d that DINO's
# _init_weights does not touch): see _patch_embed_init.
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)
_WEIGHT_INITS = {"jax": _trunc_normal, "torch": nnx.initializers.normal(stddev=0.02)}


def weight_init(rule: str = "jax"):
    """The initialiser of linear weights and learned tokens under ``model.init = rule``."""
    return _WEIGHT_INITS[rule]


def _patch_embed_init(rule: str, fan_in: int) -> tuple[Any, Any]:
    """``(kernel_init, bias_init)`` of the patch embedding: torch's Conv2d default
    (:func:`torch_default_uniform`, weights and bias) under ``"torch"``, else LeCun normal
    weights and a zero bias."""
    if rule == "torch":
        return torch_default_uniform(fan_in), torch_default_uniform(fan_in)
    return nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()


def torch_default_uniform(fan_in: int):
    """torch's default ``nn.Linear`` / ``nn.Conv2d`` initialiser of weights *and* biases:
    ``kaiming_uniform_(a=sqrt(5))`` is U(-b, b) with ``b = gain * sqrt(3 / fan_in)``,
    ``gain = sqrt(2 / (1 + 5))``, i.e. ``b = 1 / sqrt(fan_in)``; the bias is U(±1/sqrt(fan_in))
    (``fan_in``: inputs per output, ``in_channels * k * k`` for a convolution)."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _drop_path(x: Array, rate: float, key: Array | None) -> Array:
    """Stochastic depth: zeroes whole residual branches per sample, rescaled by 1/keep_prob."""
    if key is None or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    mask = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


def _linear(
    in_features: int, out_features: int, *, dtype, param_dtype, rngs, init: str = "jax"
) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=weight_init(init),
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _attention_implementation(name: str) -> Literal["xla", "cudnn"]:
    """``jax.nn.dot_product_attention``'s ``implementation`` for one of :data:`ATTENTIONS`."""
    if name == "xla":
        return "xla"
    if name == "cudnn":
        return "cudnn"
    raise errors.ConfigError(f"attention must be one of {ATTENTIONS}, got {name!r}.")


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (same parameters as timm).

    ``implementation`` is ``"xla"`` or ``"cudnn"`` (:data:`schema.ATTENTIONS`); both compute
    the same function of the same parameters, so a checkpoint works with either.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        implementation: str = "xla",
        init: str = "jax",
    ):
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.dtype = dtype
        self.implementation = _attention_implementation(implementation)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=init)
        self.qkv = _linear(width, 3 * width, **kw)
        self.proj = _linear(width, width, **kw)

    def __call__(self, x: Array) -> Array:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.implementation == "cudnn":
            _check_cudnn_attention(q.dtype)
        out = jax.nn.dot_product_attention(
            q, k, v, scale=self.head_dim**-0.5, implementation=self.implementation
        )
        return self.proj(out.reshape(b, n, -1))


class MLP(nnx.Module):
    """Transformer feed-forward block: Linear -> GELU -> Linear."""

    def __init__(
        self, width: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, init: str = "jax"
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=init)
        self.fc1 = _linear(width, mlp_dim, **kw)
        self.fc2 = _linear(mlp_dim, width, **kw)

    def __call__(self, x: Array) -> Array:
        # Exact (erf) GELU as in the PyTorch ViT/DINO reference implementations.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block with per-sample drop path on both residual branches."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        drop_path_rate: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        attention: str = "xla",
        layer_norm_eps: float = LAYER_NORM_EPS,
        init: str = "jax",
    ):
        self.drop_path_rate = float(drop_path_rate)
        norm_kw = dict(epsilon=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, **norm_kw)
        self.attn = Attention(
            width,
            num_heads,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            implementation=attention,
            init=init,
        )
        self.norm2 = nnx.LayerNorm(width, **norm_kw)
        self.mlp = MLP(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=init)

    def __call__(self, x: Array, key: Array | None = None) -> Array:
        key_attn, key_mlp = (None, None) if key is None else jax.random.split(key)
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path_rate, key_attn)
        x = x + _drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, key_mlp)
        return x


def _call_block(block: EncoderBlock, x: Array, key: Array | None) -> Array:
    # A free function (not a bound method) because nnx.remat only lifts unbound callables.
    return block(x, key)


_call_block_remat = nnx.remat(_call_block)


class ViT(nnx.Module):
    """Pre-LN Vision Transformer returning pooled features ``[b, width]`` in float32.

    Args:
        width, depth, num_heads, mlp_dim, patch_size: architecture sizes.
        image_size: training resolution; defines the learned position-embedding grid. Other
            resolutions (multiples of ``patch_size``) are handled by bilinear interpolation.
        channels: number of input channels.
        pooling: ``"cls"`` (CLS token) or ``"mean"`` (mean of patch tokens, no CLS token).
        drop_path_rate: stochastic depth rate of the last block; increases linearly from 0.
        dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay in ``param_dtype``.
        remat: rematerialise each block in the backward pass (saves activation memory).
        attention: ``"xla"`` or ``"cudnn"`` (flash attention; GPU and bfloat16 only).
        layer_norm_eps: the epsilon of every LayerNorm.
        init: ``"jax"`` or ``"torch"`` (DINO's): see :func:`weight_init`, :func:`_patch_embed_init`.
        rngs: used for initialisation only.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        patch_size: int,
        image_size: int,
        channels: int,
        pooling: str = "cls",
        drop_path_rate: float = 0.0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool = False,
        attention: str = "xla",
        stem_channels: int = 0,
        layer_norm_eps: float = LAYER_NORM_EPS,
        init: str = "jax",
        rngs: nnx.Rngs,
    ):
        sizes = dict(
            width=width,
            depth=depth,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            patch_size=patch_size,
            image_size=image_size,
            channels=channels,
        )
        _check_encoder(
            sizes,
            pooling=pooling,
            drop_path_rate=drop_path_rate,
            attention=attention,
            layer_norm_eps=layer_norm_eps,
            prefix="",
        )
        self.width = width
        self.num_features = width
        self.depth = depth
        self.patch_size = patch_size
        self.image_size = image_size
        self.channels = channels
        self.pooling = pooling
        self.dtype = dtype
        self.remat = remat

        # An optional convolutional stem (Xiao et al., 2021, "Early convolutions help
        # transformers see better"): a 3x3 convolution at full resolution + GELU before the
        # patchify, so that each token starts from local edges rather than raw pixels.
        self.stem = nnx.data(None)
        if stem_channels:
            self.stem = nnx.Conv(
                channels,
                stem_channels,
                kernel_size=(3, 3),
                padding="SAME",
                kernel_init=nnx.initializers.lecun_normal(),
                bias_init=nnx.initializers.zeros_init(),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        in_channels = stem_channels or channels
        kernel_init, bias_init = _patch_embed_init(init, in_channels * patch_size**2)
        self.patch_embed = nnx.Conv(
            in_channels,
            width,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        grid = image_size // patch_size
        self.grid_size = grid
        tokens = weight_init(init)
        self.pos_embed = nnx.Param(tokens(rngs.params(), (grid, grid, width), param_dtype))
        if pooling == "cls":
            self.cls_token = nnx.Param(tokens(rngs.params(), (1, 1, width), param_dtype))
            # The CLS token gets its own position embedding, as in the original ViT.
            self.cls_pos_embed = nnx.Param(tokens(rngs.params(), (1, 1, width), param_dtype))
        rates = np.linspace(0.0, drop_path_rate, depth)
        self.blocks = nnx.List(
            [
                EncoderBlock(
                    width,
                    num_heads,
                    mlp_dim,
                    drop_path_rate=float(rate),
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                    attention=attention,
                    layer_norm_eps=layer_norm_eps,
                    init=init,
                )
                for rate in rates
            ]
        )
        self.norm = nnx.LayerNorm(
            width, epsilon=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def _position_embedding(self, grid_h: int, grid_w: int) -> Array:
        pos = self.pos_embed[...]
        if (grid_h, grid_w) != pos.shape[:2]:
            # Interpolate in float32 so bf16 params do not add rounding on top of resampling.
            # No antialiasing, as torch's F.interpolate in DINO. DINO interpolates bicubically;
            # this is bilinear (what the project has always trained with; JAX's cubic kernel,
            # Keys a = -0.5, is not torch's a = -0.75 either, so neither matches DINO exactly).
            pos = jax.image.resize(
                pos.astype(jnp.float32),
                (grid_h, grid_w, self.width),
                method="bilinear",
                antialias=False,
            )
        return pos.reshape(1, grid_h * grid_w, self.width)

    def tokens(self, images: Array, *, key: Array | None = None, last_blocks: int = 0):
        """All output tokens after the final norm, ``[b, (1 +) n_patches, width]``; with
        ``last_blocks=n``, the list of the last n blocks' tokens, each after the final norm."""
        if images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(
                f"Expected images of shape [b, h, w, {self.channels}], got {images.shape}."
            )
        h, w = images.shape[1:3]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"Image size {h}x{w} is not divisible by patch_size {self.patch_size}; "
                "resize or crop the images to a multiple of the patch size."
            )
        x = images.astype(self.dtype)
        if self.stem is not None:
            x = jax.nn.gelu(self.stem(x), approximate=False)
        x = self.patch_embed(x)
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, self.width)
        x = x + self._position_embedding(gh, gw).astype(self.dtype)
        if self.pooling == "cls":
            cls = (self.cls_token[...] + self.cls_pos_embed[...]).astype(self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)

        keys = [None] * len(self.blocks) if key is None else jax.random.split(key, len(self.blocks))
        call = _call_block_remat if self.remat else _call_block
        outputs = []
        for block, block_key in zip(self.blocks, keys, strict=True):
            x = call(block, x, block_key)
            outputs.append(x)
        if last_blocks:
            # DINO's get_intermediate_layers: the final norm applied to each block's output.
            return [self.norm(out) for out in outputs[-last_blocks:]]
        return self.norm(x)

    def __call__(self, images: Array, *, key: Array | None = None) -> Array:
        x = self.tokens(images, key=key)
        if self.pooling == "cls":
            return x[:, 0].astype(jnp.float32)
        # Average in float32 rather than in the (possibly bf16) compute dtype.
        return jnp.mean(x.astype(jnp.float32), axis=1)


class BatchStatNorm(nnx.Module):
    """BatchNorm on the batch's own statistics (no running averages): the heads' norm.

    BYOL, SimSiam and solo-learn put BatchNorm in the projector and predictor; the heads are
    used in training only (the evaluators read the encoder), so the running averages an
    inference-time BatchNorm keeps are never needed. Under ``jit`` on a mesh the mean over
    the global batch axis is the synchronised (all-device) statistic.
    """

    def __init__(self, features: int, *, param_dtype: Any = jnp.float32, epsilon: float = 1e-5):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=0)
        var = jnp.mean(jnp.square(x32 - mean), axis=0)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class MLPHead(nnx.Module):
    """``Linear(in, hidden) -> [BatchNorm] -> GELU -> ... -> Linear(hidden, out)``.

    One layer = one Linear; ``batchnorm=True`` normalises every hidden layer over the batch
    (:class:`BatchStatNorm`), as BYOL's heads do.
    """

    def __init__(
        self,
        in_features: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        *,
        rngs: nnx.Rngs,
        batchnorm: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init: str = "jax",
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        dims = [in_features] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.dtype = dtype
        self.layers = nnx.List(
            [
                _linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=init)
                for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
            ]
        )
        self.norms = nnx.data(None)
        if batchnorm:
            self.norms = nnx.List([BatchStatNorm(d, param_dtype=param_dtype) for d in dims[1:-1]])

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        for i, layer in enumerate(self.layers):
            if i:
                if self.norms is not None:
                    x = self.norms[i - 1](x)
                x = jax.nn.gelu(x, approximate=False)
            x = layer(x)
        return x.astype(jnp.float32)


class WeightNormLinear(nnx.Module):
    """A bias-free linear layer with torch's ``weight_norm`` (dim 0): ``W = g * v / ||v||``,
    each output unit's weight vector normalised over its inputs (DINO's ``last_layer``).

    ``v`` (``kernel_v``, [in, out]) starts as torch's ``nn.Linear`` default (U(±1/sqrt(in))),
    as DINO's head creates its last layer after its ``trunc_normal_`` pass. ``g`` starts at 1
    (``weight_g.data.fill_(1)``); with ``learn_norm=False`` (DINO's ``norm_last_layer=True``)
    it stays 1 and is not a parameter. ``g`` is [1, out], 2-D as torch's [out, 1], so that
    DINO's rule decays it (``get_params_groups`` spares biases and 1-D tensors only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        learn_norm: bool,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        self.dtype = dtype
        init = torch_default_uniform(in_features)
        self.kernel_v = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.scale_g = nnx.data(None)
        if learn_norm:
            self.scale_g = nnx.Param(jnp.ones((1, out_features), param_dtype))

    def __call__(self, x: Array) -> Array:
        v = self.kernel_v[...].astype(jnp.float32)
        # torch's norm_except_dim has no epsilon; v is never zero in practice.
        w = v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
        if self.scale_g is not None:
            w = w * self.scale_g[...].astype(jnp.float32)
        return (x.astype(self.dtype) @ w.astype(self.dtype)).astype(jnp.float32)


class DINOHead(nnx.Module):
    """DINO's ``DINOHead`` (``vision_transformer.py``): ``mlp`` (``num_layers`` Linear layers
    with GELU between, the last to ``bottleneck_dim``; BatchNorm with ``batchnorm``), then
    L2 normalisation (``F.normalize``, eps 1e-12), then :class:`WeightNormLinear` to
    ``out_dim`` (the ``last_layer`` that ``optim.freeze_last_layer_epochs`` holds still).
    The MLP's layers are initialised as the rest of the model (``init``; DINO:
    ``trunc_normal_(std=.02)`` and zero biases).
    """

    def __init__(
        self,
        in_features: int,
        hidden_dim: int,
        bottleneck_dim: int,
        out_dim: int,
        num_layers: int = 3,
        *,
        norm_last_layer: bool = True,
        batchnorm: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        init: str = "jax",
    ):
        self.mlp = MLPHead(
            in_features,
            hidden_dim,
            bottleneck_dim,
            num_layers,
            batchnorm=batchnorm,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            init=init,
        )
        self.last_layer = WeightNormLinear(
            bottleneck_dim,
            out_dim,
            learn_norm=not norm_last_layer,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        x = self.mlp(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return self.last_layer(x)


class SSLModel(nnx.Module):
    """Encoder + projector + optional predictor, as used by the student and the EMA teacher."""

    def __init__(
        self, encoder: ViT, projector: MLPHead | DINOHead, predictor: MLPHead | None = None
    ):
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor

    def __call__(self, images: Array, *, key: Array | None = None) -> dict[str, Array]:
        """Returns ``features [b, width]``, ``projections`` and ``predictions`` (float32).

        ``predictions`` equals ``projections`` when the model has no predictor.
        """
        features = self.encoder(images, key=key)
        projections = self.projector(features)
        predictions = projections if self.predictor is None else self.predictor(projections)
        return dict(features=features, projections=projections, predictions=predictions)

    def encode(self, images: Array, features: str = "pooled") -> Array:
        """Deterministic encoder features for evaluation (linear probe, k-NN).

        ``features="pooled"``: the encoder output (CLS token or mean of tokens), [b, width].
        ``"cls"``: the CLS token after the final norm, [b, width], what DINO's k-NN
        (``eval_knn.py``: ``model(samples)``) votes on (CLS models only).
        ``"cls_avgpool"``: the CLS token concatenated with the mean of the patch tokens,
        [b, 2 * width], DINO's linear-evaluation features for ViT-B (CLS models only).
        ``"last4_cls"``: the CLS tokens of the last 4 blocks (each after the final norm),
        [b, 4 * width], DINO's choice for ViT-S (CLS models of depth >= 4).
        ``"mean_patch"``: the mean of the patch tokens, [b, width] (what I-JEPA probes).
        """
        if features == "pooled":
            return self.encoder(images, key=None)
        if features == "cls":
            if self.encoder.pooling != "cls":
                raise ValueError('features="cls" needs a model with pooling="cls".')
            return self.encoder.tokens(images)[:, 0].astype(jnp.float32)
        if features == "mean_patch":
            tokens = self.encoder.tokens(images).astype(jnp.float32)
            start = 1 if self.encoder.pooling == "cls" else 0
            return jnp.mean(tokens[:, start:], axis=1)
        if features == "last4_cls":
            if self.encoder.pooling != "cls" or self.encoder.depth < 4:
                raise ValueError(
                    'features="last4_cls" needs a model with pooling="cls" and depth >= 4.'
                )
            blocks = self.encoder.tokens(images, last_blocks=4)
            return jnp.concatenate([t[:, 0].astype(jnp.float32) for t in blocks], axis=-1)
        if features == "cls_avgpool":
            if self.encoder.pooling != "cls":
                raise ValueError('features="cls_avgpool" needs a model with pooling="cls".')
            tokens = self.encoder.tokens(images).astype(jnp.float32)
            return jnp.concatenate([tokens[:, 0], jnp.mean(tokens[:, 1:], axis=1)], axis=-1)
        raise ValueError(f"Unknown features {features!r}; valid: {list(FEATURES)}.")


def create_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> SSLModel:
    """Builds an :class:`SSLModel` from the ``model`` section of a config. Raises
    :class:`errors.ConfigError` for ``attention="cudnn"`` without a GPU and bfloat16."""
    dtype = _DTYPES[cfg.dtype]
    if cfg.attention == "cudnn":
        _check_cudnn_attention(dtype)
    encoder = ViT(
        **cfg.encoder_sizes(),
        image_size=cfg.image_size,
        channels=cfg.channels,
        pooling=cfg.pooling,
        drop_path_rate=cfg.drop_path_rate,
        dtype=dtype,
        remat=cfg.remat,
        attention=cfg.attention,
        stem_channels=cfg.stem_channels,
        layer_norm_eps=cfg.layer_norm_eps,
        init=cfg.init,
        rngs=rngs,
    )
    projector: MLPHead | DINOHead
    if cfg.head == "dino":
        projector = DINOHead(
            encoder.num_features,
            cfg.projector_hidden_dim,
            cfg.head_bottleneck_dim,
            cfg.projector_dim,
            cfg.projector_layers,
            norm_last_layer=cfg.norm_last_layer,
            batchnorm=cfg.head_batchnorm,
            dtype=dtype,
            init=cfg.init,
            rngs=rngs,
        )
    else:
        projector = MLPHead(
            encoder.num_features,
            cfg.projector_hidden_dim,
            cfg.projector_dim,
            cfg.projector_layers,
            batchnorm=cfg.head_batchnorm,
            dtype=dtype,
            init=cfg.init,
            rngs=rngs,
        )
    predictor = None
    if cfg.use_predictor:
        predictor = MLPHead(
            cfg.projector_dim,
            cfg.predictor_hidden_dim,
            cfg.projector_dim,
            cfg.predictor_layers,
            batchnorm=cfg.head_batchnorm,
            dtype=dtype,
            init=cfg.init,
            rngs=rngs,
        )
    return SSLModel(encoder, projector, predictor)
