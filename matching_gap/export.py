"""Weights out and in: the encoder as timm or Hugging Face ViT files, and such files as the
start of an encoder.

The project's :class:`~matching_gap.models.ViT` is the ViT of timm's ``VisionTransformer``
and of Hugging Face's ``ViTModel`` (pre-LayerNorm blocks, fused-qkv attention, exact GELU,
a learned CLS token and position embeddings), so its parameters map onto theirs exactly:

* Linear kernels ``[in, out]`` become PyTorch weights ``[out, in]`` (transposed); the patch
  embedding's HWIO kernel becomes OIHW; LayerNorm ``scale`` is ``weight``.
* ``cls_pos_embed`` and the ``[grid, grid, width]`` position grid are one ``pos_embed``
  ``[1, 1 + grid * grid, width]``, the CLS token's row first.
* Hugging Face splits the fused qkv (output features ordered ``[3, heads, head_dim]``, as
  the project and timm reshape them) into ``query``, ``key`` and ``value``.

timm's names are the hub between the two: :func:`to_timm` / :func:`from_timm` convert the
encoder's parameters, :func:`timm_to_hf` / :func:`hf_to_timm` rename and split. Every
conversion consumes each source tensor exactly once and leaves none over, and every file is
checked key by key and shape by shape against what its format expects for the model's
sizes (:func:`timm_shapes`, :func:`hf_shapes`). Tensors are float32, and a round trip is
bitwise (transposes, slices and concatenations only).

:func:`write_encoder` writes ``model.safetensors`` and the format's ``config.json`` (plus
Hugging Face's ``preprocessor_config.json``); :func:`read_encoder` reads a directory of
either format for ``model.init_from``. What a format cannot hold is refused in one line that
names the setting or the key, before anything is written or loaded.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from matching_gap import errors, models, schema

FORMATS = schema.EXPORT_FORMATS
WEIGHTS_FILE = "model.safetensors"  # the name timm and transformers (4.x and 5.x) look for
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"  # Hugging Face's image processor
# timm's VisionTransformer builds its LayerNorms as partial(nn.LayerNorm, eps=1e-6) and its
# config.json has no field to change that.
TIMM_LAYER_NORM_EPS = 1e-6
# The registered timm architecture the exported config names; model_args override every size.
TIMM_ARCHITECTURE = "vit_base_patch16_224"
# Tensors of the formats' classification models and poolers: not part of the encoder, skipped
# on import (timm's classifier; Hugging Face's pooler and ViTForImageClassification's head).
_TIMM_HEAD_KEYS = ("head.weight", "head.bias")
_HF_HEAD_PREFIXES = ("pooler.", "classifier.")
_HF_PREFIX = "vit."  # ViTForImageClassification's and ViTForMaskedImageModeling's base model
# PIL's resample code for bicubic, what the evaluation view uses (DINO's; Hugging Face's
# processors take PIL codes).
_PIL_BICUBIC = 3

# A block's tensors: timm's name -> Hugging Face's (both relative to the block), for all but
# the fused qkv (split in three on the way to Hugging Face).
_HF_BLOCK_NAMES = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}
_HF_QKV = ("query", "key", "value")  # the order of the fused qkv's three parts
_HF_TOP_NAMES = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


# ------------------------------------------------------------------------- the mapping


def _sizes(model: models.ModelConfig) -> dict[str, int]:
    sizes = model.encoder_sizes()
    grid = model.image_size // sizes["patch_size"]
    return dict(sizes, channels=model.channels, grid=grid, image_size=model.image_size)


def timm_shapes(model: models.ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of timm's ``VisionTransformer`` with this model's sizes (no classifier:
    ``num_classes=0``), name -> shape."""
    s = _sizes(model)
    d, m, p, c = s["width"], s["mlp_dim"], s["patch_size"], s["channels"]
    cls = model.pooling == "cls"
    shapes = {
        "pos_embed": (1, int(cls) + s["grid"] ** 2, d),
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if cls:
        shapes["cls_token"] = (1, 1, d)
    for i in range(s["depth"]):
        shapes.update(
            {
                f"blocks.{i}.norm1.weight": (d,),
                f"blocks.{i}.norm1.bias": (d,),
                f"blocks.{i}.attn.qkv.weight": (3 * d, d),
                f"blocks.{i}.attn.qkv.bias": (3 * d,),
                f"blocks.{i}.attn.proj.weight": (d, d),
                f"blocks.{i}.attn.proj.bias": (d,),
                f"blocks.{i}.norm2.weight": (d,),
                f"blocks.{i}.norm2.bias": (d,),
                f"blocks.{i}.mlp.fc1.weight": (m, d),
                f"blocks.{i}.mlp.fc1.bias": (m,),
                f"blocks.{i}.mlp.fc2.weight": (d, m),
                f"blocks.{i}.mlp.fc2.bias": (d,),
            }
        )
    return shapes


def hf_shapes(model: models.ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of Hugging Face's ``ViTModel(add_pooling_layer=False)`` with this model's
    sizes, name -> shape (a CLS model only: ``ViTModel`` always has the token)."""
    shapes = {}
    for key, shape in timm_shapes(model).items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if block is None:
            shapes[_HF_TOP_NAMES[key]] = shape
        elif block.group(2).startswith("attn.qkv."):
            kind = block.group(2).rsplit(".", 1)[1]
            for part in _HF_QKV:
                shapes[f"encoder.layer.{block.group(1)}.attention.attention.{part}.{kind}"] = (
                    shape[0] // 3,
                    *shape[1:],
                )
        else:
            shapes[f"encoder.layer.{block.group(1)}.{_HF_BLOCK_NAMES[block.group(2)]}"] = shape
    return shapes


def _check_tensors(
    tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], what: str
) -> None:
    """Refuses tensors whose names or shapes are not exactly ``expected``'s."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != expected[k]
    ]
    if missing or extra or wrong:
        parts = [
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", extra),
                ("wrong shape", wrong),
            )
            if items
        ]
        raise errors.ConfigError(f"{what} does not fit the model ({'; '.join(parts)}).")


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"blocks": {0: {"norm1": {"scale": x}}}}`` -> ``{"blocks.0.norm1.scale": x}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = np.asarray(value)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of :func:`_flatten`; block indices become ints, as in ``nnx`` states."""
    tree: dict = {}
    for name, value in flat.items():
        node, parts = tree, [int(p) if p.isdigit() else p for p in name.split(".")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


class _Writer:
    """Collects converted tensors: each name once, float32, C-contiguous (safetensors writes
    the buffer of a transposed, non-contiguous array as if it were contiguous)."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def __setitem__(self, name: str, value) -> None:
        if name in self.tensors:
            raise AssertionError(f"{name} written twice")
        self.tensors[name] = np.ascontiguousarray(value, dtype=np.float32)


def to_timm(encoder: dict, model: models.ModelConfig) -> dict[str, np.ndarray]:
    """The encoder's parameters (``nnx`` pure dict) as timm's ``VisionTransformer`` tensors.

    Raises:
        errors.ConfigError: if the encoder does not fit ``model`` (checked name by name).
    """
    src = _flatten(encoder)
    take = src.pop  # each parameter is read exactly once: a second read is a KeyError
    out = _Writer()
    s = _sizes(model)
    grid = take("pos_embed").reshape(1, s["grid"] ** 2, s["width"])
    if model.pooling == "cls":
        out["cls_token"] = take("cls_token")
        grid = np.concatenate([take("cls_pos_embed"), grid], axis=1)
    out["pos_embed"] = grid
    out["patch_embed.proj.weight"] = take("patch_embed.kernel").transpose(3, 2, 0, 1)  # HWIO->OIHW
    out["patch_embed.proj.bias"] = take("patch_embed.bias")
    for i in range(s["depth"]):
        for norm in ("norm1", "norm2"):
            out[f"blocks.{i}.{norm}.weight"] = take(f"blocks.{i}.{norm}.scale")
            out[f"blocks.{i}.{norm}.bias"] = take(f"blocks.{i}.{norm}.bias")
        for linear in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            out[f"blocks.{i}.{linear}.weight"] = take(f"blocks.{i}.{linear}.kernel").T
            out[f"blocks.{i}.{linear}.bias"] = take(f"blocks.{i}.{linear}.bias")
    out["norm.weight"] = take("norm.scale")
    out["norm.bias"] = take("norm.bias")
    if src:
        raise errors.ConfigError(f"Encoder parameters with no timm name: {sorted(src)}.")
    _check_tensors(out.tensors, timm_shapes(model), "The encoder")
    return out.tensors


def from_timm(tensors: dict[str, np.ndarray], model: models.ModelConfig) -> dict:
    """timm tensors (checked against :func:`timm_shapes`) as the encoder's parameters."""
    _check_tensors(tensors, timm_shapes(model), "The timm tensors")
    src = dict(tensors)
    take = src.pop
    out = _Writer()
    s = _sizes(model)
    pos = take("pos_embed")[0]
    if model.pooling == "cls":
        out["cls_token"] = take("cls_token")
        out["cls_pos_embed"] = pos[None, :1]
        pos = pos[1:]
    out["pos_embed"] = pos.reshape(s["grid"], s["grid"], s["width"])
    out["patch_embed.kernel"] = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)
    out["patch_embed.bias"] = take("patch_embed.proj.bias")
    for i in range(s["depth"]):
        for norm in ("norm1", "norm2"):
            out[f"blocks.{i}.{norm}.scale"] = take(f"blocks.{i}.{norm}.weight")
            out[f"blocks.{i}.{norm}.bias"] = take(f"blocks.{i}.{norm}.bias")
        for linear in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            out[f"blocks.{i}.{linear}.kernel"] = take(f"blocks.{i}.{linear}.weight").T
            out[f"blocks.{i}.{linear}.bias"] = take(f"blocks.{i}.{linear}.bias")
    out["norm.scale"] = take("norm.weight")
    out["norm.bias"] = take("norm.bias")
    assert not src, sorted(src)  # _check_tensors admitted exactly these names
    return _unflatten(out.tensors)


def timm_to_hf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's names -> Hugging Face ``ViTModel``'s, the fused qkv split into three."""
    out = _Writer()
    for key, value in tensors.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if block is None:
            out[_HF_TOP_NAMES[key]] = value
            continue
        layer, name = f"encoder.layer.{block.group(1)}", block.group(2)
        if name.startswith("attn.qkv."):
            kind = name.rsplit(".", 1)[1]
            for part, piece in zip(_HF_QKV, np.split(value, 3, axis=0), strict=True):
                out[f"{layer}.attention.attention.{part}.{kind}"] = piece
        else:
            out[f"{layer}.{_HF_BLOCK_NAMES[name]}"] = value
    return out.tensors


def hf_to_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`timm_to_hf` (names checked beforehand: see :func:`hf_shapes`)."""
    src = dict(tensors)
    take = src.pop
    out = _Writer()
    top = {hf: timm for timm, hf in _HF_TOP_NAMES.items()}
    block_names = {hf: timm for timm, hf in _HF_BLOCK_NAMES.items()}
    for key in list(src):
        if key in top:
            out[top[key]] = take(key)
            continue
        layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if layer and layer.group(2) in block_names:
            out[f"blocks.{layer.group(1)}.{block_names[layer.group(2)]}"] = take(key)
    depth = {int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer.")}
    for i in sorted(depth):
        for kind in ("weight", "bias"):
            parts = [
                take(f"encoder.layer.{i}.attention.attention.{part}.{kind}") for part in _HF_QKV
            ]
            out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    assert not src, sorted(src)
    return out.tensors


# ------------------------------------------------------------------------------ export


def check_exportable(model: models.ModelConfig, fmt: str) -> None:
    """Refuses, in one line naming the setting, a model that ``fmt`` files cannot hold."""
    if model.stem_channels:
        raise errors.ConfigError(
            f"model.stem_channels={model.stem_channels}: a convolutional stem has no "
            "counterpart in timm's or Hugging Face's ViT, so this encoder cannot be exported."
        )
    if fmt == "hf" and model.pooling != "cls":
        raise errors.ConfigError(
            f"export.format='hf' cannot hold model.pooling={model.pooling!r}: Hugging Face's "
            "ViTModel always has a CLS token. Use export.format='timm'."
        )
    if fmt == "timm" and model.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        raise errors.ConfigError(
            f"export.format='timm' cannot hold model.layer_norm_eps={model.layer_norm_eps}: "
            f"timm's VisionTransformer fixes it at {TIMM_LAYER_NORM_EPS}. Use export.format='hf'."
        )
    s = _sizes(model)
    if fmt == "timm" and int(s["width"] * (s["mlp_dim"] / s["width"])) != s["mlp_dim"]:
        raise errors.ConfigError(
            f"model.mlp_dim={s['mlp_dim']} is not int(width * mlp_ratio) for any float "
            f"mlp_ratio at width {s['width']}, as timm builds it. Use export.format='hf'."
        )


def _timm_config(model: models.ModelConfig, preprocessing: dict) -> dict:
    s = _sizes(model)
    pool = "token" if model.pooling == "cls" else "avg"
    return {
        "architecture": TIMM_ARCHITECTURE,
        "num_classes": 0,
        "num_features": s["width"],
        "global_pool": pool,
        "model_args": {
            "img_size": s["image_size"],
            "patch_size": s["patch_size"],
            "in_chans": s["channels"],
            "embed_dim": s["width"],
            "depth": s["depth"],
            "num_heads": s["num_heads"],
            "mlp_ratio": s["mlp_dim"] / s["width"],
            "qkv_bias": True,
            "class_token": model.pooling == "cls",
            "global_pool": pool,
            # Mean pooling averages the final-normed tokens (no norm after the pool).
            "fc_norm": False,
            "num_classes": 0,
        },
        "pretrained_cfg": {
            "input_size": [s["channels"], s["image_size"], s["image_size"]],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": preprocessing["crop_pct"],
            "crop_mode": "center",
            "mean": list(preprocessing["mean"]),
            "std": list(preprocessing["std"]),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _hf_config(model: models.ModelConfig) -> dict:
    s = _sizes(model)
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": s["width"],
        "num_hidden_layers": s["depth"],
        "num_attention_heads": s["num_heads"],
        "intermediate_size": s["mlp_dim"],
        "hidden_act": "gelu",  # exact (erf) GELU, as the project's MLP
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        # ViTConfig's default is 1e-12: leaving it out moved ViT-B/16's outputs by 3.6e-4.
        "layer_norm_eps": model.layer_norm_eps,
        "image_size": s["image_size"],
        "patch_size": s["patch_size"],
        "num_channels": s["channels"],
        "qkv_bias": True,
        "encoder_stride": s["patch_size"],
        "torch_dtype": "float32",
    }


def _hf_preprocessor(model: models.ModelConfig, preprocessing: dict) -> dict:
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": model.image_size, "width": model.image_size},
        "resample": _PIL_BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocessing["mean"]),
        "image_std": list(preprocessing["std"]),
    }


def preprocessing(config) -> dict:
    """The evaluation view of a run's config as the formats state it: ``mean`` and ``std`` (of
    pixels in [0, 1]) and timm's ``crop_pct`` (the centre crop's share of the resized image:
    ``crop_size / data.image_size`` for streamed images, DINO's 224 / 256;
    ``augment.eval_crop_fraction`` for stored images larger than the crop)."""
    aug = config.augment
    larger = config.data.image_size > aug.crop_size
    crop_pct = 1.0
    if larger:
        streamed = not config.data.in_memory
        crop_pct = aug.crop_size / config.data.image_size if streamed else aug.eval_crop_fraction
    return {
        "mean": tuple(float(x) for x in aug.mean),
        "std": tuple(float(x) for x in aug.std),
        "crop_pct": float(crop_pct),
    }


def _write_json(path: str, content: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


def write_encoder(
    encoder: dict, model: models.ModelConfig, fmt: str, out_dir: str, *, preprocessing: dict
) -> list[str]:
    """Writes the encoder's parameters as ``fmt`` files in ``out_dir``; returns their paths.

    ``model.safetensors`` (float32, safetensors metadata ``format: pt``, which transformers
    requires) and ``config.json``: timm's ``architecture`` / ``model_args`` /
    ``pretrained_cfg``, or Hugging Face's ``ViTConfig`` (with ``preprocessor_config.json``).
    ``preprocessing``: see :func:`preprocessing`.

    Raises:
        errors.ConfigError: naming the setting a format cannot hold, or a parameter that
            does not fit (nothing is written then).
    """
    from safetensors.numpy import save_file  # only export and import need it

    check_exportable(model, fmt)
    tensors = to_timm(encoder, model)
    configs = {CONFIG_FILE: _timm_config(model, preprocessing)}
    if fmt == "hf":
        tensors = timm_to_hf(tensors)
        _check_tensors(tensors, hf_shapes(model), "The Hugging Face tensors")
        configs = {
            CONFIG_FILE: _hf_config(model),
            PREPROCESSOR_FILE: _hf_preprocessor(model, preprocessing),
        }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    paths = [path]
    for name, content in configs.items():
        paths.append(os.path.join(out_dir, name))
        _write_json(paths[-1], content)
    return paths


# ------------------------------------------------------------------------------ import


def _timm_heads(config: dict) -> int | None:
    """The number of heads a timm config states: ``model_args`` or the architecture's name
    (``vit_small_patch16_224.dino`` -> S's heads)."""
    heads = config.get("model_args", {}).get("num_heads")
    if heads is not None:
        return int(heads)
    names = {"tiny": "Ti", "small": "S", "base": "B", "large": "L"}
    match = re.match(r"vit_(tiny|small|base|large)_patch", config.get("architecture", ""))
    return schema.VIT_VARIANTS[names[match.group(1)]]["num_heads"] if match else None


def _refuse_timm_variants(tensors: dict[str, np.ndarray], source: str) -> None:
    """timm ViT variants the project's ViT cannot hold, each named by a key of the file."""
    variants = (
        (r"blocks\.\d+\.ls[12]\.gamma", "LayerScale"),
        (r"reg_token", "register tokens"),
        (r"norm_pre\.weight", "a norm before the blocks (norm_pre)"),
        (r"fc_norm\.weight", "a norm after the pooling (fc_norm)"),
        (r"blocks\.\d+\.attn\.[qk]_norm\.weight", "q/k normalisation"),
    )
    for pattern, what in variants:
        keys = sorted(k for k in tensors if re.fullmatch(pattern, k))
        if keys:
            raise errors.ConfigError(
                f"{source}: key {keys[0]!r} is {what}, which the project's "
                "ViT does not have; nothing was loaded."
            )
    for key in sorted(tensors):
        if key.endswith(".attn.qkv.weight") and key[: -len("weight")] + "bias" not in tensors:
            raise errors.ConfigError(
                f"{source}: key {key!r} has no bias (a qkv without bias), "
                "which the project's ViT does not have; nothing was "
                "loaded."
            )


def _check_hf_config(config: dict, model: models.ModelConfig, source: str) -> None:
    def refuse(key, value, why):
        raise errors.ConfigError(f"{source}: {key}={value!r} {why}; nothing was loaded.")

    if config.get("model_type") != "vit":
        refuse("model_type", config.get("model_type"), "is not a ViT (model_type 'vit')")
    if config.get("hidden_act", "gelu") != "gelu":
        refuse(
            "hidden_act",
            config["hidden_act"],
            "is not the exact GELU ('gelu') of the project's ViT",
        )
    if not config.get("qkv_bias", True):
        refuse("qkv_bias", config["qkv_bias"], "(a qkv without bias) is not the project's ViT")
    eps = config.get("layer_norm_eps", 1e-12)  # ViTConfig's default
    if eps != model.layer_norm_eps:
        refuse(
            "layer_norm_eps",
            eps,
            f"differs from model.layer_norm_eps="
            f"{model.layer_norm_eps}: set --config.model.layer_norm_eps={eps}",
        )


def _load_tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    # float32 whatever the file stores (float16 / bfloat16 hub files): the parameters' dtype.
    return {k: v.astype(np.float32) for k, v in load_file(path).items()}


def read_encoder(model: models.ModelConfig) -> tuple[dict, list[str]]:
    """The encoder's parameters from ``model.init_from``, a timm or Hugging Face ViT
    directory (``model.safetensors`` and ``config.json``; the format is told by the config).

    Returns ``(encoder, skipped)``: the parameters (``nnx`` pure dict of numpy float32
    arrays, the encoder's tree) and the file's keys that are not the encoder's (a classifier
    or a pooler), skipped.

    Raises:
        errors.ConfigError: for a missing file, a ViT variant the project's ViT cannot hold
            (LayerScale, register tokens, ``norm_pre``, qkv without bias, ...: named by a
            key), a size or LayerNorm epsilon that differs from ``model``'s, or any key or
            shape that does not fit. Nothing is loaded then.
    """
    source = model.init_from
    directory = os.path.dirname(source) if source.endswith(".safetensors") else source
    weights, config_path = (os.path.join(directory, n) for n in (WEIGHTS_FILE, CONFIG_FILE))
    for path in (weights, config_path):
        if not os.path.isfile(path):
            raise errors.ConfigError(
                f"model.init_from={source!r}: no {path} (a timm or Hugging Face ViT directory "
                "holds model.safetensors and config.json)."
            )
    with open(config_path) as f:
        file_config = json.load(f)
    tensors = _load_tensors(weights)
    if "model_type" in file_config:
        fmt = "hf"
        if model.pooling != "cls":
            raise errors.ConfigError(
                f"model.pooling={model.pooling!r} cannot start from "
                f"{source!r}, a Hugging Face ViT (always a CLS token); "
                "set model.pooling='cls'."
            )
        _check_hf_config(file_config, model, source)
        if all(k.startswith(_HF_PREFIX) or k.startswith(_HF_HEAD_PREFIXES) for k in tensors):
            tensors = {k.removeprefix(_HF_PREFIX): v for k, v in tensors.items()}
        skipped = sorted(k for k in tensors if k.startswith(_HF_HEAD_PREFIXES))
        heads = file_config.get("num_attention_heads")
    elif "architecture" in file_config:
        fmt = "timm"
        _refuse_timm_variants(tensors, source)
        if model.layer_norm_eps != TIMM_LAYER_NORM_EPS:
            raise errors.ConfigError(
                f"model.layer_norm_eps={model.layer_norm_eps} cannot start from {source!r}, a "
                f"timm ViT (LayerNorm eps {TIMM_LAYER_NORM_EPS}); set "
                f"model.layer_norm_eps={TIMM_LAYER_NORM_EPS}."
            )
        skipped = sorted(k for k in tensors if k in _TIMM_HEAD_KEYS)
        heads = _timm_heads(file_config)
    else:
        raise errors.ConfigError(
            f"model.init_from={source!r}: {config_path} is neither a "
            "timm config (architecture) nor a Hugging Face one "
            "(model_type)."
        )
    tensors = {k: v for k, v in tensors.items() if k not in skipped}
    _check_sizes(tensors, fmt, heads, model, source)
    if fmt == "hf":
        _check_tensors(tensors, hf_shapes(model), source)
        tensors = hf_to_timm(tensors)
    return from_timm(tensors, model), skipped


def _check_sizes(
    tensors: dict[str, np.ndarray],
    fmt: str,
    heads: int | None,
    model: models.ModelConfig,
    source: str,
) -> None:
    """One line naming every ``model.`` size that differs from the file's."""
    names = (
        "norm.weight",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.mlp.fc1.weight",
        r"blocks\.(\d+)\.norm1\.weight",
    )
    if fmt == "hf":
        names = (
            "layernorm.weight",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight",
            "encoder.layer.0.intermediate.dense.weight",
            r"encoder\.layer\.(\d+)\.layernorm_before\.weight",
        )
    norm, pos, patch, fc1, block = names
    ranks = {norm: 1, pos: 3, patch: 4, fc1: 2}
    if any(k not in tensors or tensors[k].ndim != r for k, r in ranks.items()):
        return  # not a plain ViT: the key-by-key check names what does not fit
    width, (_, channels, patch_size, _) = tensors[norm].shape[0], tensors[patch].shape
    tokens = tensors[pos].shape[1] - (model.pooling == "cls")
    grid = math.isqrt(max(tokens, 0))
    blocks = [int(m.group(1)) for k in tensors if (m := re.fullmatch(block, k))]
    file_sizes = {
        "width": width,
        "depth": 1 + max(blocks, default=-1),
        "mlp_dim": tensors[fc1].shape[0],
        "patch_size": patch_size,
        "channels": channels,
        "image_size": grid * patch_size,
        "num_heads": heads,
    }
    ours = _sizes(model)
    wrong = [
        f"model.{k}={ours[k]} (the file: {v})"
        for k, v in file_sizes.items()
        if v is not None and ours[k] != v
    ]
    if wrong:
        raise errors.ConfigError(
            f"{source} holds a different ViT: {', '.join(wrong)}; set "
            "those (or model.variant); nothing was loaded."
        )
    if heads is None:
        raise errors.ConfigError(
            f"{source}: its config.json does not say the number of "
            "heads (model_args.num_heads); add it; nothing was loaded."
        )
