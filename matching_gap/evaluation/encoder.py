"""The encoder as the evaluation sees it: the evaluation view (centre crop,
normalisation), then the configured features, computed in ``eval.dtype``
(:func:`make_encode`); :func:`load_encoder`, the newest checkpoint of a training run as such
a frozen feature extractor.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from matching_gap import augment, errors, models, schema, state, storage
from matching_gap import sharding as sharding_lib


def evaluated_model(config) -> schema.ModelConfig:
    """The ``model`` section the evaluation builds the encoder from: ``eval.dtype`` as its
    compute dtype (DINO's ``eval_knn.py`` and ``eval_linear.py`` run the encoder in float32,
    whatever it trained in), and XLA's attention where cuDNN's cannot run (it needs bfloat16
    on a GPU), the same function of the same parameters."""
    model = dataclasses.replace(config.model, dtype=config.eval.dtype)
    if model.attention == "cudnn" and (model.dtype != "bfloat16" or jax.default_backend() != "gpu"):
        model = dataclasses.replace(model, attention="xla")
    return model


def evaluated_graphdef(config, graphdef):
    """``graphdef`` (of ``config.model``) as :func:`evaluated_model` computes. The parameters
    are float32 whatever ``model.dtype`` says (a compute dtype), so the same ones merge into
    either."""
    model = evaluated_model(config)
    if graphdef is None or model == config.model:
        return graphdef
    return nnx.graphdef(nnx.eval_shape(lambda: models.create_model(model, rngs=nnx.Rngs(0))))


def make_encode(
    config, graphdef, mesh=None, *, raw_pixels: bool = False, features: str | None = None
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``encode(params, images) -> features``: the evaluation view (centre crop,
    normalisation), then ``features`` of the encoder (default ``config.eval.features``, see
    ``schema.FEATURES``) computed in ``eval.dtype`` (:func:`evaluated_graphdef`); with
    ``raw_pixels``, the view's pixels flattened (``params`` unused: the bar a learned encoder
    should clear). With a ``mesh``, the features stay split over the devices like the
    images."""
    kind = config.eval.features if features is None else features
    graphdef = None if raw_pixels else evaluated_graphdef(config, graphdef)

    def encode(params, images):
        view = augment.center_view(images, config.augment)
        if raw_pixels:
            return view.reshape(view.shape[0], -1)
        model = nnx.merge(graphdef, params)
        return model.encode(view, kind)

    if mesh is None:
        return jax.jit(encode)
    return jax.jit(encode, out_shardings=sharding_lib.batch_sharding(mesh))


def load_encoder(workdir: str) -> tuple[Callable[[Any], jax.Array], schema.Config]:
    """The newest checkpoint of a training run as a frozen feature extractor.

    Reads the config the run saved (``<workdir>/config.json``), restores the newest
    checkpoint and returns ``(encode, config)``. ``encode(images)`` maps images
    ``[N, H, W, C]`` (uint8, or floats in [0, 1]) of the stored size
    ``config.data.image_size`` to features ``[N, D]``: the evaluation view (centre crop,
    normalisation), then ``config.eval.features`` of the encoder (the EMA teacher's when the
    run had one) computed in ``eval.dtype``, as the k-NN and linear-probe evaluators see
    them. A run trained with ``model.attention='cudnn'`` is read with XLA's attention on a
    machine without a GPU.
    """
    path = storage.path(workdir, "config.json")
    if not path.exists():
        raise errors.WorkdirError(
            f"{path} not found: is {workdir} the --workdir of a training run?"
        )
    config = schema.parse(json.loads(path.read_text()))
    if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
        # the same function of the same parameters
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, attention="xla")
        )
    graphdef, params, _ = state.restore_encoder(config, workdir)
    size, channels = config.data.image_size, config.data.channels
    _encode = make_encode(config, graphdef)

    def encode(images) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (size, size, channels):
            raise ValueError(
                f"encode expects images [N, {size}, {size}, {channels}] (the size "
                f"the model was trained on), got {images.shape}."
            )
        return _encode(params, images)

    return encode, config
