"""Evaluation throughput of a config's encoder: feature extraction next to the forward pass
alone, and the ``augmented`` linear probe's step, side by side in alternating rounds.

Prints one markdown table (median images/s over the rounds, and each path's ratio to the
forward pass) and the cost these rates project for the whole of ImageNet-1k: extraction of
the 1,281,167 training and 50,000 validation images (the k-NN and the ``features`` probe),
and ``eval.augmented_epochs`` epochs of the ``augmented`` probe. Images are synthetic uint8
at ``data.image_size`` (no dataset or TensorFlow needed); the parameters are a fresh
initialisation (the speed does not depend on their values).

    python benchmarks/eval_throughput.py --config=configs/default.py
    python benchmarks/eval_throughput.py --config=configs/vitb16.py --batch=1024   # GPU

* ``forward``: ``encode(params, images)`` (centre crop + the configured features) on images
  already on the devices.
* ``extraction``: what ``--mode=evaluate`` does per batch: host images to the devices
  (sharded), encode, write into the sharded feature buffer (``evaluation.features.extract``).
* ``augmented step``: one step of the ``augmented`` probe (random-resized crop + flip view,
  frozen forward, every head's SGD update), batch ``eval.augmented_batch_size`` unless
  ``--batch`` is given.
"""

import dataclasses
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from matching_gap import schema
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib
from matching_gap.evaluation import augmented_probe, encoder
from matching_gap.evaluation import features as features_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch (0: eval.batch_size).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
_BATCHES = flags.DEFINE_integer("batches_per_round", 4, "Batches per path per round.")
flags.mark_flags_as_required(["config"])

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def main(argv):
    del argv
    config = schema.parse(_CONFIG.value)
    mesh = sharding_lib.make_mesh()
    batch = _BATCH.value or config.eval.batch_size
    batch -= batch % mesh.size
    n = _BATCHES.value
    size, channels = config.data.image_size, config.data.channels
    rng = np.random.default_rng(0)
    host = rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    graphdef, state = state_lib.create_train_state(
        config, state_lib.make_optimizer(config, 2, 1)[0]
    )
    params = state_lib.encoder_params(config, state)
    params = jax.device_put(params, sharding_lib.replicated(mesh))
    encode = encoder.make_encode(config, graphdef, mesh)
    on_device = sharding_lib.global_batch(host, mesh)

    def forward():
        out = None
        for _ in range(n):
            out = encode(params, on_device)
        out.block_until_ready()

    def extraction():
        batches = (
            {
                "image": host,
                "label": labels,
                "mask": np.ones(batch, bool),
                "id": np.arange(batch, dtype=np.int32),
            }
            for _ in range(n)
        )
        feats = features_lib.extract(
            lambda x: encode(params, x), batches, num_batches=n, num_classes=10, mesh=mesh
        )
        feats.features.block_until_ready()

    dim = encode(params, on_device).shape[-1]
    settings = augmented_probe.AugmentedSettings.from_eval(config.eval)
    settings = dataclasses.replace(settings, batch_size=batch)
    step = augmented_probe._make_step(config, graphdef, settings, 10 * n, mesh)
    init = jax.jit(
        lambda: augmented_probe._init_state(
            len(settings.learning_rates), dim, 10, augmented_probe.init_key(0)
        ),
        out_shardings=sharding_lib.replicated(mesh),
    )
    device_labels = sharding_lib.global_batch(labels, mesh)

    def augmented():
        probe = init()
        loss = None
        for _ in range(n):
            probe, loss = step(probe, params, on_device, device_labels)
        loss.block_until_ready()

    paths = {"forward": forward, "extraction": extraction, "augmented step": augmented}
    for fn in paths.values():
        fn()  # compile
    times = {name: [] for name in paths}
    for _ in range(_ROUNDS.value):
        for name, fn in paths.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    rates = {name: batch * n / statistics.median(t) for name, t in times.items()}

    device = mesh.devices.flat[0]
    model = config.model.variant or f"width {config.model.width}, depth {config.model.depth}"
    print(
        f"device: {mesh.size} x {device.device_kind} ({device.platform}); model: ViT "
        f"{model}, {size} px stored, {config.augment.crop_size} px crops, "
        f"features {config.eval.features} (dim {dim}); batch {batch}; "
        f"{len(settings.learning_rates)} augmented heads"
    )
    print()
    print("| path | images/s | vs forward |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
        print(f"| {name} | {shown} | {rate / rates['forward']:.2f} |")
    extract_h = (IMAGENET_TRAIN + IMAGENET_VAL) / rates["extraction"] / 3600
    augmented_h = config.eval.augmented_epochs * IMAGENET_TRAIN / rates["augmented step"] / 3600
    print()
    epochs = config.eval.augmented_epochs
    print(
        f"ImageNet-1k at these rates: extraction of train + val {extract_h:,.2f} hours "
        f"(k-NN and features probe); augmented probe, {epochs} epochs, {augmented_h:,.1f} "
        f"hours (on {mesh.size} device(s); data loading not included)."
    )


if __name__ == "__main__":
    app.run(main)
