"""Every recipe of experiments/recipes.md planned on a TPU slice, from this (CPU) machine.

    pip install -e '.[tpu]'
    JAX_PLATFORMS=cpu python benchmarks/tpu_plan.py --topology=v4-32

For each recipe, compiles the real train step for the slice (``matching_gap.plan``, as
``--mode=plan`` does) and prints one markdown table: whether it fits, the peak memory per
device, XLA's FLOPs per device beside the analytic matmul count, the collectives, and the
chip-hours of the whole recipe on v4, v5e and v5p at 40% MFU (a projection from the
chips' published bf16 peaks: ``analytic FLOPs x steps / (0.4 x peak) / 3600``; the v5e
figure assumes the step is made to fit its 16 GiB, e.g. with ``model.remat=True``).

A compile of ViT-B/16 takes minutes on 2 cores: each finished recipe is kept in
``benchmarks/results/tpu_plan_<topology>.json`` and a rerun only compiles the missing ones
(``--fresh`` starts over). The table goes to ``tpu_plan_<topology>.txt`` beside it.
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matching_gap import config_lib, plan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# (recipes.md section, config file, argument)
RECIPES = [
    ("Check the pipeline first: DINO ViT-S/16, 100 epochs", "dino_vits16.py", None),
    ("1. ViT-B/16, crop + flip", "vitb16.py", None),
    ("2. strong augmentation", "vitb16.py", "strong"),
    ("3. M3G k = 2", "m3g_vitb16.py", "k=2"),
    ("3. M3G k = 3 (and 4. the epsilon ablation)", "m3g_vitb16.py", "k=3"),
    ("3. M3G k = 4", "m3g_vitb16.py", "k=4"),
]
CHIP_KINDS = ("v4", "v5litepod", "v5p")

_TOPOLOGY = flags.DEFINE_string("topology", "v4-32", "The slice to plan on.")
_ONLY = flags.DEFINE_list("only", [], "Plan only these recipes (config[:arg], e.g. vitb16.py).")
_FRESH = flags.DEFINE_bool("fresh", False, "Forget the kept plans and compile every recipe.")


def _name(config_file, arg):
    return config_file + (f":{arg}" if arg else "")


def chip_hours(analytic_per_device: float, devices: int, steps: int, kind: str) -> float:
    peak = plan.CHIPS[kind].peak_flops
    return analytic_per_device * devices * steps / (plan.CHIP_HOURS_MFU * peak) / 3600


def row(section: str, name: str, p: dict) -> str:
    gib = p["memory"]["peak"] / plan.GiB
    hbm = p["hbm_per_device_bytes"] / plan.GiB
    xla, model = p["flops_per_device_compiler"], p["flops_per_device_analytic"]
    coll = ", ".join(
        f"{k} {v['count']} ({v['bytes'] / 2**20:.0f} MiB)"
        for k, v in sorted(p["collectives"].items())
    )
    hours = " | ".join(
        f"{chip_hours(model, p['devices'], p['recipe_steps'], kind):,.0f}" for kind in CHIP_KINDS
    )
    return (
        f"| {section} | `{name}` | {p['per_device_batch']} | {'yes' if p['fits'] else 'no'} | "
        f"{gib:.2f} / {hbm:.0f} | {p['remat']} / {p['fsdp']} | {xla / 1e12:.2f} | "
        f"{model / 1e12:.2f} | {xla / model:.2f} | {coll} | {hours} |"
    )


def main(argv):
    del argv
    topology_name = _TOPOLOGY.value
    store = os.path.join(RESULTS, f"tpu_plan_{topology_name}.json")
    kept = {}
    if os.path.exists(store) and not _FRESH.value:
        with open(store) as f:
            kept = json.load(f)
    topology = plan.get_topology(topology_name)
    for _, config_file, arg in RECIPES:
        name = _name(config_file, arg)
        if name in kept or (_ONLY.value and name not in _ONLY.value):
            continue
        config = config_lib.load_config_file(os.path.join(ROOT, "configs", config_file), arg)
        start = time.time()
        try:
            result = plan.plan_run(config, topology)
        except plan.DoesNotFitError as e:
            print(f"{name}: {e}", flush=True)
            continue
        result["compile_seconds"] = round(time.time() - start, 1)
        kept[name] = plan.to_json(result)
        print(f"{name}: planned in {result['compile_seconds']:.0f} s", flush=True)
        with open(store, "w") as f:
            json.dump(kept, f, indent=2)

    device_kind = topology.devices[0].device_kind
    lines = [
        f"Recipes planned on {topology_name} ({len(topology.devices)} x {device_kind}, "
        f"{topology.layout}), compiled on a CPU machine with libtpu: "
        f"`JAX_PLATFORMS=cpu python benchmarks/tpu_plan.py --topology={topology_name}`.",
        "Memory: XLA's peak per device (arguments + outputs - donated + temporaries) / HBM.",
        "FLOPs per device per step: XLA's count and the analytic matmul count "
        "(`plan.analytic_flops`).",
        "Chip-hours of the whole recipe at 40% MFU: projections, not measurements.",
        "",
        "| recipe | config | images per device | fits | GiB per device | remat / FSDP | "
        "XLA TFLOP | matmul TFLOP | XLA / matmul | collectives per step | "
        + " | ".join(f"chip-hours {k}" for k in CHIP_KINDS)
        + " |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---|" + "---:|" * len(CHIP_KINDS),
    ]
    for section, config_file, arg in RECIPES:
        name = _name(config_file, arg)
        if name in kept:
            lines.append(row(section, name, kept[name]))
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(RESULTS, f"tpu_plan_{topology_name}.txt"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
