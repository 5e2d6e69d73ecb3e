"""How much of the chip a run uses: the model's FLOPs per step, each device kind's published
peak, and model-FLOPs utilisation (MFU).

One definition of each, shared by the plan (``--mode=plan``, which projects a run from an
assumed MFU) and the running trainer (which measures it): :func:`analytic_flops` counts the
model's matmul FLOPs of one training step, :data:`PEAK_FLOPS` holds the peak rate of the
devices JAX reports, keyed on ``jax.devices()[0].device_kind``, and :func:`peak_flops`
answers ``None`` for a device it does not know (a CPU, a new chip): MFU is then unknown, never
guessed.

Imports only the standard library and the config schema: ``--mode=plan`` and the
benchmarks use it without a device.
"""

from __future__ import annotations

import dataclasses

from matching_gap import schema

# The plan's assumption, until a run measures its own (the trainer's comparison line).
ASSUMED_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class Peak:
    """Peak dense matmul rates of one JAX device, FLOP/s.

    ``bfloat16``: bf16 inputs, f32 accumulation. ``float32``: a float32 matmul at JAX's
    default precision, which runs it as one bfloat16 pass on TPUs and as TensorFloat-32 on
    NVIDIA's tensor cores (Ampere and later): JAX's "Matmul precision" page (docs.jax.dev,
    201/precision) and ``jax.lax.Precision.DEFAULT``. A JAX device is one chip on TPU v4,
    v5p (megacore), v5e and v6e, one TensorCore (half a chip) on v2 and v3, one GPU.
    """

    bfloat16: float
    float32: float
    name: str  # what the tables call it ("TPU v5e", "NVIDIA H100 SXM")


def _tpu(tflops: float, name: str) -> Peak:
    return Peak(tflops * 1e12, tflops * 1e12, name)


def _gpu(bf16_tflops: float, tf32_tflops: float, name: str) -> Peak:
    return Peak(bf16_tflops * 1e12, tf32_tflops * 1e12, name)


# Keyed on what ``jax.devices()[0].device_kind`` reports. NVIDIA's datasheets quote tensor
# rates "with sparsity"; the dense rates here are half of those.
PEAK_FLOPS: dict[str, Peak] = {
    # cloud.google.com/tpu/docs/v2: 45 TFLOPS bf16 per chip, 2 TensorCores per chip.
    "TPU v2": _tpu(22.5, "TPU v2"),
    # cloud.google.com/tpu/docs/v3: 123 TFLOPS bf16 per chip, 2 TensorCores per chip.
    "TPU v3": _tpu(61.5, "TPU v3"),
    # cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16 per chip (one megacore device).
    "TPU v4": _tpu(275.0, "TPU v4"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip.
    "TPU v5 lite": _tpu(197.0, "TPU v5e"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip (one megacore device). JAX
    # reports "TPU v5" (its Pallas TPU tests map that name to v5p); some releases "TPU v5p".
    "TPU v5": _tpu(459.0, "TPU v5p"),
    "TPU v5p": _tpu(459.0, "TPU v5p"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip.
    "TPU v6 lite": _tpu(918.0, "TPU v6e"),
    # NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS, TF32 tensor 156 TFLOPS (dense).
    "NVIDIA A100-SXM4-40GB": _gpu(312.0, 156.0, "NVIDIA A100 SXM"),
    "NVIDIA A100-SXM4-80GB": _gpu(312.0, 156.0, "NVIDIA A100 SXM"),
    "NVIDIA A100-PCIE-40GB": _gpu(312.0, 156.0, "NVIDIA A100 PCIe"),
    "NVIDIA A100 80GB PCIe": _gpu(312.0, 156.0, "NVIDIA A100 PCIe"),
    # NVIDIA H100 datasheet: SXM BF16 1,979 / TF32 989 TFLOPS with sparsity; PCIe 1,513 /
    # 756; NVL 1,671 / 835.
    "NVIDIA H100 80GB HBM3": _gpu(989.5, 494.5, "NVIDIA H100 SXM"),
    "NVIDIA H100 PCIe": _gpu(756.5, 378.0, "NVIDIA H100 PCIe"),
    "NVIDIA H100 NVL": _gpu(835.5, 417.5, "NVIDIA H100 NVL"),
    # NVIDIA H200 datasheet: SXM BF16 1,979 / TF32 989 TFLOPS with sparsity (as H100 SXM);
    # NVL 1,671 / 835.
    "NVIDIA H200": _gpu(989.5, 494.5, "NVIDIA H200 SXM"),
    "NVIDIA H200 NVL": _gpu(835.5, 417.5, "NVIDIA H200 NVL"),
    # NVIDIA L4 datasheet: BF16 tensor 242.5 / TF32 tensor 120 TFLOPS with sparsity.
    "NVIDIA L4": _gpu(121.0, 60.0, "NVIDIA L4"),
}


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The peak FLOP/s of one device of ``device_kind`` for the compute ``dtype``
    (``model.dtype``: ``"bfloat16"`` or ``"float32"``); ``None`` when the kind is not in
    :data:`PEAK_FLOPS` (a CPU, an unlisted chip): MFU is then unknown."""
    peak = PEAK_FLOPS.get(device_kind)
    if peak is None:
        return None
    return peak.float32 if dtype == "float32" else peak.bfloat16


def mfu(flops_per_second_per_device: float, device_kind: str, dtype: str) -> float | None:
    """Model-FLOPs utilisation: the measured rate over the device's peak (None if unknown)."""
    peak = peak_flops(device_kind, dtype)
    return None if peak is None else flops_per_second_per_device / peak


# ------------------------------------------------------------------ the model's matmuls


def patch_embedding_flops(model_config: schema.ModelConfig, resolution: int) -> float:
    """Matmul FLOPs of the patch embedding of one image at ``resolution`` (on the stem's
    channels when there is a stem)."""
    patch = model_config.encoder_sizes()["patch_size"]
    width = model_config.encoder_sizes()["width"]
    channels = model_config.stem_channels or model_config.channels
    return float(2 * (resolution // patch) ** 2 * patch * patch * channels * width)


def encoder_forward_flops(model_config: schema.ModelConfig, resolution: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image through the ViT at ``resolution``:
    the stem and patch embedding, and per block the qkv, attention scores, attention x
    values, output projection and the MLP. Norms, softmax, GELU and adds are not counted."""
    s = model_config.encoder_sizes()
    width, mlp, patch = s["width"], s["mlp_dim"], s["patch_size"]
    patches = (resolution // patch) ** 2
    tokens = patches + (1 if model_config.pooling == "cls" else 0)
    stem = model_config.stem_channels
    flops = patch_embedding_flops(model_config, resolution)
    if stem:
        flops += 2 * resolution * resolution * 9 * model_config.channels * stem
    block = (
        2 * tokens * width * 3 * width  # qkv
        + 2 * tokens * tokens * width  # scores
        + 2 * tokens * tokens * width  # attention x values
        + 2 * tokens * width * width  # output projection
        + 2 * 2 * tokens * width * mlp  # MLP
    )
    return float(flops + s["depth"] * block)


def _head_flops(in_dim: int, hidden: int, out: int, layers: int) -> float:
    dims = [in_dim] + [hidden] * (layers - 1) + [out]
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)))


def analytic_flops(config: schema.Config) -> dict[str, float]:
    """The model's matmul FLOPs of one training step on the global batch:
    ``{"student", "teacher", "total"}``.

    Every student view (global and local crops) goes through the encoder, projector and
    predictor forward and backward (backward = 2 x forward; the patch embedding's backward
    needs no gradient of the pixels, so 1 x); the EMA teacher's forward runs the encoder
    and projector on the global views. Rematerialisation is not counted (these are model
    FLOPs, the basis of MFU); neither are the loss, the optimiser or elementwise work.
    """
    mc = config.model
    a, b = config.augment, config.optim.batch_size
    width = mc.encoder_sizes()["width"]
    projector = _head_flops(width, mc.projector_hidden_dim, mc.projector_dim, mc.projector_layers)
    predictor = 0.0
    if mc.use_predictor:
        predictor = _head_flops(
            mc.projector_dim,
            mc.predictor_hidden_dim,
            mc.projector_dim,
            mc.predictor_layers,
        )

    def student(resolution: int) -> float:  # forward + backward of one view
        forward = encoder_forward_flops(mc, resolution) + projector + predictor
        return 3 * forward - patch_embedding_flops(mc, resolution)

    views = [(a.num_views, a.crop_size)]
    if a.num_local_crops:
        views.append((a.num_local_crops, a.local_crop_size))
    out = {"student": float(sum(n * b * student(r) for n, r in views))}
    out["teacher"] = 0.0
    if config.teacher.ema:
        out["teacher"] = float(
            a.num_views * b * (encoder_forward_flops(mc, a.crop_size) + projector)
        )
    out["total"] = out["student"] + out["teacher"]
    return out


def images_per_second_per_device(config: schema.Config, peak: float, utilisation: float) -> float:
    """The images/s one device trains at ``utilisation`` of ``peak`` FLOP/s."""
    return utilisation * peak / (analytic_flops(config)["total"] / config.optim.batch_size)
