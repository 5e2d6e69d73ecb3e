"""Training-step throughput of a config with the matching gap and with InfoNCE, side by side.

Prints one markdown table: median step time, images/s (per device too), model FLOPs
utilisation (MFU: XLA's FLOP count of the compiled step / step time / the device's peak)
and the ratio of each loss's step to the InfoNCE step. Batches are synthetic uint8 images
(no dataset or TensorFlow needed); the step is the real ``train.make_train_step`` (views,
forward, loss, backward, AdamW, EMA), on a mesh over all devices.

    python benchmarks/train_throughput.py --config=configs/default.py
    python benchmarks/train_throughput.py --config=configs/vitb16.py \
        --config.optim.batch_size=256 --losses=matching_gap,info_nce

The losses are timed in alternating rounds (A B A B ...) so that a noisy machine affects
both alike.
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from matching_gap import sharding as sharding_lib
from matching_gap import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_LOSSES = flags.DEFINE_list("losses", ["matching_gap", "info_nce"], "Losses to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
_STEPS = flags.DEFINE_integer("steps_per_round", 5, "Steps per loss per round.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: look up).")
flags.mark_flags_as_required(["config"])

# Dense bf16 peak TFLOP/s per device (vendor figures).
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(device) -> float | None:
    if _PEAK.value:
        return _PEAK.value
    for name, value in PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return value
    return None


def build(config, loss_name, mesh):
    config = config.copy_and_resolve_references()
    config.loss.name = loss_name
    if loss_name == "byol":
        config.teacher.ema = True
    optimizer, schedules = train.make_optimizer(config, 1000, 100)
    graphdef, state = train.create_train_state(config, optimizer)
    replicated = sharding_lib.replicated(mesh)
    step = jax.jit(
        train.make_train_step(config, graphdef, optimizer, schedules, mesh),
        in_shardings=(replicated, sharding_lib.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
    )
    return step, jax.device_put(state, replicated)


def main(argv):
    del argv
    config = _CONFIG.value
    mesh = sharding_lib.make_mesh()
    b, s, c = config.optim.batch_size, config.data.image_size, config.data.channels
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b // jax.process_count(), s, s, c), dtype=np.uint8)
    batch = sharding_lib.global_batch(images, mesh)

    runs = {}
    for name in _LOSSES.value:
        step, state = build(config, name, mesh)
        compiled = step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        state, _ = compiled(state, batch)  # warm-up
        jax.block_until_ready(state)
        runs[name] = {"fn": compiled, "state": state, "times": [], "flops": flops}

    for _ in range(_ROUNDS.value):
        for run in runs.values():
            state = run["state"]
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                state, metrics = run["fn"](state, batch)
            jax.block_until_ready((state, metrics))
            run["times"].append((time.perf_counter() - start) / _STEPS.value)
            run["state"] = state

    device = jax.devices()[0]
    peak = peak_tflops(device)
    base = statistics.median(runs[_LOSSES.value[-1]]["times"])
    print(
        f"device: {device.device_kind} x{jax.device_count()} | model: "
        f"{config.model.variant or 'custom'} width {config.model.width} depth "
        f"{config.model.depth} patch {config.model.patch_size} | image {s} | "
        f"views {config.augment.num_views}+{config.augment.num_local_crops} local | batch {b} | "
        f"dtype {config.model.dtype} | median of {_ROUNDS.value} rounds x "
        f"{_STEPS.value} steps"
    )
    print()
    print(f"| loss | step (ms) | images/s | images/s/device | MFU | vs {_LOSSES.value[-1]} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        t = statistics.median(run["times"])
        mfu = "-"
        if peak and run["flops"]:
            # cost_analysis counts the FLOPs of one device's share of the program.
            mfu = f"{100 * run['flops'] / t / (peak * 1e12):.1f}%"
        print(
            f"| {name} | {1e3 * t:.1f} | {b / t:.0f} | {b / t / jax.device_count():.0f} | "
            f"{mfu} | {t / base:.3f}x |"
        )


if __name__ == "__main__":
    app.run(main)
