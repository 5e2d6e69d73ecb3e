"""Training-step throughput of a config with the matching gap and with InfoNCE, side by side.

Prints one markdown table: median step time, images/s (per device too), model FLOPs
utilisation (MFU: the model's analytic matmul FLOPs per step, ``efficiency.analytic_flops``, / step
time / the devices' peak; augmentation and the loss are not counted as useful work) and the
ratio of each loss's step to the InfoNCE step. Batches are synthetic uint8 images
(no dataset or TensorFlow needed); the step is the real ``train.make_train_step`` (views,
forward, loss, backward, AdamW, EMA), on a mesh over all devices.

    python benchmarks/train_throughput.py --config=configs/default.py
    python benchmarks/train_throughput.py --config=configs/vitb16.py \
        --config.optim.batch_size=256 --losses=matching_gap,info_nce

The losses are timed in alternating rounds (A B A B ...) so that a noisy machine affects
both alike. A line below the table gives XLA's own FLOP and byte counts of the compiled step
(a check on the analytic FLOPs; the bytes depend on the backend's fusion). A last line times
the view-making on the device (``augment.views_for``) alone in the same rounds, as a share of
the step: the first thing to check when MFU is low.
"""

import dataclasses
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from matching_gap import augment, data, efficiency, schema, train
from matching_gap import sharding as sharding_lib
from matching_gap import state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_LOSSES = flags.DEFINE_list("losses", ["matching_gap", "info_nce"], "Losses to time.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
_STEPS = flags.DEFINE_integer("steps_per_round", 5, "Steps per loss per round.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: look up).")
flags.mark_flags_as_required(["config"])


def peak_tflops(device, dtype: str) -> float | None:
    """The flag's value, else the device's published peak (``efficiency.PEAK_FLOPS``)."""
    if _PEAK.value:
        return _PEAK.value
    peak = efficiency.peak_flops(device.device_kind, dtype)
    return None if peak is None else peak / 1e12


def _xla_cost(compiled) -> tuple[float, float] | None:
    """XLA's count of the compiled step's FLOPs and bytes accessed, as the executable reports
    it (for the whole step on the CPU backend, also with several devices); None if absent."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost:
        return None
    return cost.get("flops", float("nan")), cost.get("bytes accessed", float("nan"))


def build(config, loss_name, mesh, *, donate=True):
    """The train step exactly as ``train.train_and_evaluate`` jits it, and a fresh state."""
    teacher = dataclasses.replace(config.teacher, ema=config.teacher.ema or loss_name == "byol")
    loss = dataclasses.replace(config.loss, name=loss_name)
    config = dataclasses.replace(config, loss=loss, teacher=teacher)
    optimizer, schedules = state_lib.make_optimizer(config, 1000, 100)
    graphdef, _, shardings = state_lib.abstract_train_state(config, optimizer, mesh)
    step = train.jit_train_step(
        config, graphdef, optimizer, schedules, mesh, shardings, donate=donate
    )
    return step, state_lib.init_train_state(config, optimizer, shardings)


def _memory(compiled) -> str:
    """XLA's memory figure of a compiled step (arguments, outputs, temporaries, aliased)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return "not reported by this backend"
    if m is None:
        return "not reported by this backend"
    gb = lambda n: f"{n / 1e9:.3f} GB"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (
        f"arguments {gb(m.argument_size_in_bytes)}, outputs {gb(m.output_size_in_bytes)}, "
        f"temporaries {gb(m.temp_size_in_bytes)}, aliased {gb(m.alias_size_in_bytes)}; "
        f"peak without aliasing {gb(total - m.alias_size_in_bytes)}"
    )


def main(argv):
    del argv
    config = schema.parse(_CONFIG.value)
    mesh = sharding_lib.make_mesh()
    b = config.optim.batch_size
    local = data.synthetic_batch(config, b // jax.process_count())
    batch = sharding_lib.model_inputs(local, mesh)

    # Buffer donation (the train loop's default) against none, as XLA reports it.
    for donate in (False, True):
        step, state = build(config, _LOSSES.value[-1], mesh, donate=donate)
        print(
            f"memory, {_LOSSES.value[-1]} step, donation {'on ' if donate else 'off'}: "
            f"{_memory(step.lower(state, batch).compile())}"
        )
        del step, state

    runs = {}
    for name in _LOSSES.value:
        step, state = build(config, name, mesh)
        compiled = step.lower(state, batch).compile()
        state, _ = compiled(state, batch)  # warm-up
        jax.block_until_ready(state)
        runs[name] = {"fn": compiled, "state": state, "times": []}

    aug_config = config.augment
    key = jax.random.key(0)
    jax.block_until_ready(augment.views_for(key, batch, aug_config))  # compile (it is jitted)
    views_times = []

    for _ in range(_ROUNDS.value):
        start = time.perf_counter()
        for i in range(_STEPS.value):
            views = augment.views_for(jax.random.fold_in(key, i), batch, aug_config)
        jax.block_until_ready(views)
        views_times.append((time.perf_counter() - start) / _STEPS.value)
        for run in runs.values():
            state = run["state"]
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                state, metrics = run["fn"](state, batch)
            jax.block_until_ready((state, metrics))
            run["times"].append((time.perf_counter() - start) / _STEPS.value)
            run["state"] = state

    device = jax.devices()[0]
    peak = peak_tflops(device, config.model.dtype)
    flops = efficiency.analytic_flops(config)["total"]
    sizes = config.model.encoder_sizes()
    base = statistics.median(runs[_LOSSES.value[-1]]["times"])
    print(
        f"model FLOPs per step: {flops / 1e12:.2f} TFLOP | peak per device: "
        f"{peak or 'unknown (pass --peak_tflops)'} TFLOP/s"
    )
    print(
        f"device: {device.device_kind} x{jax.device_count()} | model: "
        f"{config.model.variant or 'custom'} width {sizes['width']} depth "
        f"{sizes['depth']} patch {sizes['patch_size']} | crop {config.augment.crop_size} | "
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
        if peak:
            mfu = f"{100 * flops / t / (peak * 1e12 * jax.device_count()):.1f}%"
        print(
            f"| {name} | {1e3 * t:.1f} | {b / t:.0f} | {b / t / jax.device_count():.0f} | "
            f"{mfu} | {t / base:.3f}x |"
        )
    cost = _xla_cost(runs[_LOSSES.value[-1]]["fn"])
    if cost:
        # A second count of the MFU numerator (it adds augmentation, loss and optimizer
        # FLOPs), and the bytes the step moves as this backend fused it.
        xla_flops, xla_bytes = cost
        print(
            f"\nXLA cost analysis of the {_LOSSES.value[-1]} step: {xla_flops / 1e12:.4g} "
            f"TFLOP ({xla_flops / flops:.3f}x the model FLOPs above), "
            f"{xla_bytes / 1e9:.4g} GB accessed"
        )
    t_views = statistics.median(views_times)
    print(
        f"\nview-making on the device alone (augment.views_for, same rounds): "
        f"{1e3 * t_views:.1f} ms per step, {100 * t_views / base:.1f}% of the "
        f"{_LOSSES.value[-1]} step"
    )


if __name__ == "__main__":
    app.run(main)
