"""Does a mesh of N devices divide the train step? Images/s on 1 and on N devices, side by side.

    python benchmarks/device_scaling.py --config=configs/default.py --devices=4

Simulates ``--devices`` CPU devices in this process (``jax_num_cpu_devices``) and times the
real jitted train step (``train.jit_train_step``, as training runs it) on a 1-device mesh
and on an N-device mesh, in alternating rounds so that a noisy machine affects both alike.
The N simulated devices share this machine's cores, so no speed-up is expected: divided
work keeps images/s about equal to one device's, replicated work (every device computing
the whole batch) divides it by about N. The table also gives XLA's FLOPs per device.
Batches are synthetic uint8 images (no dataset needed).
"""

import os
import statistics
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matching_gap import data, plan, schema, train  # noqa: E402
from matching_gap import sharding as sharding_lib  # noqa: E402
from matching_gap import state as state_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_DEVICES = flags.DEFINE_integer("devices", 4, "Simulated devices of the second mesh.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per mesh (split over the rounds).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
flags.mark_flags_as_required(["config"])


def build(config, mesh):
    """The jitted train step and a fresh state on ``mesh``, with one batch."""
    optimizer, schedules = state_lib.make_optimizer(config, 1000, 100)
    graphdef, _, shardings = state_lib.abstract_train_state(config, optimizer, mesh)
    step = train.jit_train_step(config, graphdef, optimizer, schedules, mesh, shardings)
    batch = sharding_lib.model_inputs(data.synthetic_batch(config, config.optim.batch_size), mesh)
    state = state_lib.init_train_state(config, optimizer, shardings)
    compiled = step.lower(state, batch).compile()
    return compiled, state, batch


def main(argv):
    del argv
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    config = schema.parse(_CONFIG.value)
    runs = {}
    for n in (1, _DEVICES.value):
        mesh = sharding_lib.make_mesh(jax.devices()[:n])
        compiled, state, batch = build(config, mesh)
        state, _ = compiled(state, batch)  # warm-up
        jax.block_until_ready(state)
        runs[n] = {"fn": compiled, "state": state, "batch": batch, "times": []}
    per_round = max(_STEPS.value // _ROUNDS.value, 1)
    for _ in range(_ROUNDS.value):
        for run in runs.values():
            state = run["state"]
            start = time.perf_counter()
            for _ in range(per_round):
                state, metrics = run["fn"](state, run["batch"])
            jax.block_until_ready((state, metrics))
            run["times"].append((time.perf_counter() - start) / per_round)
            run["state"] = state

    b = config.optim.batch_size
    base = b / statistics.median(runs[1]["times"])
    print(
        f"{config.model.variant or 'custom ViT'}, batch {b}, {jax.devices()[0].device_kind} "
        f"devices simulated on {os.cpu_count()} cores, median of {_ROUNDS.value} rounds x "
        f"{per_round} steps"
    )
    print()
    print("| devices | step (ms) | images/s | vs 1 device | XLA GFLOP per device per step |")
    print("|---:|---:|---:|---:|---:|")
    for n, run in runs.items():
        t = statistics.median(run["times"])
        flops = plan.compiled_flops(run["fn"]) / 1e9
        print(f"| {n} | {1e3 * t:.1f} | {b / t:.0f} | {b / t / base:.2f}x | {flops:.2f} |")


if __name__ == "__main__":
    app.run(main)
