"""Planning a run on a slice before renting it: the real train step compiled for the slice.

``plan_run(config, topology)`` compiles the jitted train step that training runs (the same
function, shardings, donation, dtype, remat and batch) for the devices of a Cloud TPU slice,
without any TPU (``jax.experimental.topologies`` with libtpu, ``pip install -e '.[tpu]'``),
or for ``cpu-N``, N simulated CPU devices. It reports what XLA's compiler says of one step
on one device (memory by kind, FLOPs, the collectives and the bytes they move) beside an
analytic count of the model's matmul FLOPs (:func:`efficiency.analytic_flops`), and projects
throughput and chip-hours from the chip's published peak at a given model-FLOPs
utilisation (MFU). ``python -m matching_gap.main --config=C --mode=plan --topology=v4-32``.

Slice names are Cloud TPU's accelerator types: ``v4-N`` and ``v5p-N`` count TensorCores
(two per chip; JAX sees one megacore device per chip), ``v5litepod-N`` (or ``v5e-N``) and
``v6e-N`` count chips. Their physical layouts follow MaxText's ``accelerator_to_spec_map``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

# efficiency: one count of the model's FLOPs and one table of peaks, shared with the trainer.
from matching_gap import data, efficiency, errors, schema, state, train
from matching_gap import sharding as sharding_lib
from matching_gap.efficiency import ASSUMED_MFU, PEAK_FLOPS, analytic_flops

GiB = 2**30
MFU_LEVELS = (0.3, 0.4, 0.5)
CHIP_HOURS_MFU = ASSUMED_MFU


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: published HBM and bf16 peak per chip (one JAX device per chip)."""

    kind: str  # the name's prefix, e.g. "v5p"
    topology_prefix: str  # get_topology_desc's, e.g. "v5"
    dims: int  # torus dimensions
    cores_in_name: bool  # the accelerator type counts TensorCores (2 per chip), not chips
    hbm_bytes: int
    device_kind: str  # what JAX reports, the key of efficiency.PEAK_FLOPS

    @property
    def peak_flops(self) -> float:
        """bf16 FLOP/s per chip (one JAX device per chip)."""
        return PEAK_FLOPS[self.device_kind].bfloat16


CHIPS = {
    "v4": Chip("v4", "v4", 3, True, 32 * GiB, "TPU v4"),
    "v5p": Chip("v5p", "v5", 3, True, 95 * GiB, "TPU v5"),
    "v5litepod": Chip("v5litepod", "v5e", 2, False, 16 * GiB, "TPU v5 lite"),
    "v6e": Chip("v6e", "v6e", 2, False, 32 * GiB, "TPU v6 lite"),
}
CHIPS["v5e"] = CHIPS["v5litepod"]
_MAX_CHIPS = 4096


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given: "v4-32", "cpu-4"
    devices: tuple  # the (compile-only) devices, one per chip
    chip: Chip | None  # None for simulated CPU devices
    layout: str = ""  # get_topology_desc's name, e.g. "v4:2x2x4"


def _layout(chips: int, dims: int) -> tuple[int, ...]:
    """MaxText's physical layouts: from 2x2(x1), double the smallest axis, the last on ties
    (8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4; 2-D: 8 -> 2x4, 32 -> 4x8)."""
    if chips == 1:
        return (1,) * dims
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return tuple(shape)


def _topology_error(name: str) -> errors.ConfigError:
    kinds = ", ".join(sorted(k for k in CHIPS if k != "v5e"))
    return errors.ConfigError(
        f"--topology={name!r} is not a slice name: use a Cloud TPU accelerator type "
        f"(<kind>-<size> with kind one of {kinds}; v4 and v5p count TensorCores, e.g. v4-32, "
        "v5p-128; v5litepod and v6e count chips, e.g. v5litepod-256, v6e-64; sizes are powers "
        "of two) or cpu-N for N simulated CPU devices."
    )


def parse_topology(name: str) -> tuple[Chip | None, int, tuple[int, ...]]:
    """``(chip, number of devices, layout)`` of a slice name; ``chip`` is None for cpu-N."""
    kind, _, digits = name.partition("-")
    if not digits.isdigit() or int(digits) < 1:
        raise _topology_error(name)
    size = int(digits)
    if kind == "cpu":
        return None, size, (size,)
    chip = CHIPS.get(kind)
    if chip is None or size & (size - 1):
        raise _topology_error(name)
    chips = size // 2 if chip.cores_in_name else size
    if chips < 1 or chips > _MAX_CHIPS or (chip.dims == 3 and chips < 4):
        raise _topology_error(name)
    return chip, chips, _layout(chips, chip.dims)


def get_topology(name: str) -> Topology:
    """The devices of a slice. TPU slices are compile-only devices from libtpu; ``cpu-N``
    takes N of this process's CPU devices (``jax_num_cpu_devices`` must allow N)."""
    chip, count, layout = parse_topology(name)
    if chip is None:
        cpus = jax.devices("cpu")
        if len(cpus) < count:
            raise errors.ConfigError(
                f"--topology={name} needs {count} CPU devices, this process has {len(cpus)}: "
                "start it with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{count} (main.py's --mode=plan does this itself)."
            )
        return Topology(name, tuple(cpus[:count]), None)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise errors.ConfigError(
            f"--topology={name} compiles for TPUs through libtpu, which is not installed: "
            "pip install -e '.[tpu]' (Linux x86-64), or plan on cpu-N."
        ) from None
    from jax.experimental import topologies

    # Compile-only: no TPU is opened, so the lock that keeps two processes off one TPU is
    # not needed (without this, two plans at once fail on /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM, libtpu looks these up in GCE's metadata and prints warnings without them.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    layout_name = f"{chip.topology_prefix}:{'x'.join(map(str, layout))}"
    bounds = tuple(min(2, s) for s in layout[:2]) + (1,)
    try:
        topo = topologies.get_topology_desc(
            topology_name=layout_name,
            platform="tpu",
            chip_config_name="megacore" if chip.cores_in_name else "default",
            chips_per_host_bounds=bounds,
            num_slices=1,
            wrap=(False, False, False),
        )
    except Exception as e:  # noqa: BLE001 (libtpu's errors have no type of their own)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.ConfigError(
            f"--topology={name}: libtpu could not describe {layout_name}: {first}"
        ) from None
    return Topology(name, tuple(topo.devices), chip, layout_name)


# ------------------------------------------------------------------ what XLA reports


_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # "all-gather", ...
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result

    @property
    def bytes(self) -> int:
        return sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in self.arrays)


def collectives(hlo: str) -> list[Collective]:
    """The collective operations of an optimised HLO module (``compiled.as_text()``), with
    the arrays each one produces. An asynchronous ``*-start`` counts once (its ``-done`` is
    not counted); an all-gather or permute start holds (operands, results): the results
    are its second half."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE_RE.search(line)
        if match is None:
            continue
        arrays = [
            (dtype, tuple(int(x) for x in dims.split(",") if x))
            for dtype, dims in _ARRAY_RE.findall(match.group("type"))
        ]
        if match.group("start") and match.group("op") != "all-reduce" and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2 :]
        found.append(Collective(match.group("op"), tuple(arrays)))
    return found


def summarize_collectives(found: list[Collective]) -> dict:
    """``{kind: {"count": ..., "bytes": ...}}`` (bytes each device receives or sends)."""
    out: dict[str, dict[str, int]] = {}
    for c in found:
        entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return out


def memory(compiled) -> dict:
    """Bytes per device of a compiled step, by kind, and the peak: arguments + outputs -
    aliased (donated) buffers + temporaries."""
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of one call, per device."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


# ------------------------------------------------------------------ compiling the step


def compile_train_step(config, mesh, *, num_steps: int = 1000, epoch_steps: int = 100):
    """The jitted train step of :func:`matching_gap.train.train_and_evaluate`, lowered and
    compiled for ``mesh`` from abstract inputs (nothing is allocated). Returns the
    ``jax.stages.Compiled``; an executable that does not fit raises XLA's error."""
    optimizer, schedules = state.make_optimizer(config, num_steps, epoch_steps)
    graphdef, abstract, shardings = state.abstract_train_state(config, optimizer, mesh)
    step = train.jit_train_step(config, graphdef, optimizer, schedules, mesh, shardings)
    return step.lower(abstract, abstract_batch(config, mesh)).compile()


def abstract_batch(config, mesh):
    """The train step's input as the run feeds it (``data.batch_shapes``), abstract: the
    stored images (in memory, the device cuts the views) or the host-cut views (streamed)."""
    sharding = sharding_lib.batch_sharding(mesh)
    specs = {
        k: jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding)
        for k, shape in data.batch_shapes(config, config.optim.batch_size).items()
    }
    return specs.get("image", specs)


# Training-split sizes of the datasets the recipes use, so that a plan needs no data.
KNOWN_TRAIN_EXAMPLES = {
    ("imagenet2012", "train"): 1_281_167,
    ("cifar10", "train"): 50_000,
    ("fashion_mnist", "train"): 60_000,
}


def recipe_steps(config) -> int | None:
    """The run's number of steps, from ``optim.num_steps`` or the epochs and the training
    split's size (known datasets only; None otherwise)."""
    if config.optim.num_steps > 0:
        return int(config.optim.num_steps)
    d = config.data
    # The IDX files hold Fashion-MNIST; an image folder's size is unknown without reading it.
    name = {"tfds": d.name, "fashion_mnist_idx": "fashion_mnist"}.get(d.source)
    n = KNOWN_TRAIN_EXAMPLES.get((name, d.train_split)) if name else None
    if n is None:
        return None
    if d.max_examples:
        n = min(n, d.max_examples)
    return state.total_steps(config, n)


_OOM_RE = re.compile(r"(?:Used|used)\s+([\d.]+)([KMGT]?)(?:i?B)?\s+of\s+([\d.]+)([KMGT]?)(?:i?B)?")


def _oom_bytes(message: str) -> tuple[float, float] | None:
    """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message, if it says them."""
    match = _OOM_RE.search(message)
    if match is None:
        return None
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return (
        float(match.group(1)) * unit[match.group(2)],
        float(match.group(3)) * unit[match.group(4)],
    )


class DoesNotFitError(errors.UserError):
    """The step needs more memory per device than the slice's devices have."""


def _levers(config) -> str:
    tips = [f"a smaller per-device batch (optim.batch_size, now {config.optim.batch_size})"]
    if not config.model.remat:
        tips.append("model.remat=True")
    if not config.train.fsdp:
        tips.append("train.fsdp=True")
    if config.augment.num_local_crops:
        tips.append(
            f"fewer local crops (augment.num_local_crops, now {config.augment.num_local_crops})"
        )
    return ", ".join(tips)


def plan_run(config, topology: Topology) -> dict:
    """Compiles the train step for ``topology`` and returns the plan (see the module doc).

    Raises:
      DoesNotFitError: one step needs more than a device's memory (bytes and the levers).
      errors.ConfigError: the config does not fit the slice (e.g. the batch does not split).
    """
    config = schema.parse(config)
    devices = len(topology.devices)
    schema.check_devices(config, devices)
    mesh = sharding_lib.make_mesh(topology.devices)
    hbm = topology.chip.hbm_bytes if topology.chip else None
    steps = recipe_steps(config)
    try:
        compiled = compile_train_step(config, mesh, num_steps=steps or 1000)
    except Exception as e:  # noqa: BLE001 (XLA raises a generic error type)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        sizes = _oom_bytes(str(e))
        needed = f"{sizes[0] / GiB:.2f} GiB of {sizes[1] / GiB:.2f} GiB" if sizes else "more"
        raise DoesNotFitError(
            f"{topology.name}: one train step needs {needed} per device "
            f"(XLA: RESOURCE_EXHAUSTED). Levers: {_levers(config)}."
        ) from None
    mem = memory(compiled)
    fits = hbm is None or mem["peak"] <= hbm
    analytic = analytic_flops(config)
    plan = {
        "topology": topology.name,
        "layout": topology.layout,
        "devices": devices,
        "device_kind": topology.devices[0].device_kind,
        "global_batch": int(config.optim.batch_size),
        "per_device_batch": int(config.optim.batch_size) // devices,
        "hbm_per_device_bytes": hbm,
        "memory": mem,
        "fits": fits,
        "flops_per_device_compiler": compiled_flops(compiled),
        "flops_per_device_analytic": analytic["total"] / devices,
        "collectives": summarize_collectives(collectives(compiled.as_text())),
        "recipe_steps": steps,
        "remat": bool(config.model.remat),
        "fsdp": bool(config.train.fsdp),
        "dtype": str(config.model.dtype),
    }
    peak = topology.chip.peak_flops if topology.chip else None
    plan["peak_flops_per_device"] = peak
    plan["images_per_second_per_device"] = {
        f"{round(m * 100)}%": (
            efficiency.images_per_second_per_device(config, peak, m) if peak else None
        )
        for m in MFU_LEVELS
    }
    plan["chip_hours_for_recipe"] = (
        steps * analytic["total"] / (CHIP_HOURS_MFU * peak) / 3600 if peak and steps else None
    )
    if not fits and hbm is not None:
        raise DoesNotFitError(
            f"{topology.name}: one train step needs {mem['peak'] / GiB:.2f} GiB per device, "
            f"a {plan['device_kind']} has {hbm / GiB:.2f} GiB. Levers: {_levers(config)}."
        )
    return plan


def format_plan(plan: dict) -> str:
    """The plan as a short table for the terminal."""

    def gib(x):
        return f"{x / GiB:.2f} GiB"

    m, hbm = plan["memory"], plan["hbm_per_device_bytes"]
    layout = f", {plan['layout']}" if plan["layout"] else ""
    xla, model = plan["flops_per_device_compiler"], plan["flops_per_device_analytic"]
    rows = [
        ("slice", f"{plan['topology']} ({plan['devices']} x {plan['device_kind']}{layout})"),
        ("batch", f"{plan['global_batch']} global, {plan['per_device_batch']} per device"),
        ("settings", f"dtype {plan['dtype']}, remat {plan['remat']}, fsdp {plan['fsdp']}"),
        (
            "memory per device",
            f"peak {gib(m['peak'])} = arguments {gib(m['argument'])} + outputs "
            f"{gib(m['output'])} - donated {gib(m['alias'])} + temporaries {gib(m['temp'])}",
        ),
        ("HBM per device", gib(hbm) if hbm else "n/a (CPU)"),
        ("fits", "yes" if plan["fits"] else "no"),
        (
            "FLOPs per device per step",
            f"XLA {xla / 1e12:.3f} T, model matmuls {model / 1e12:.3f} T "
            f"(XLA / matmuls {xla / max(model, 1.0):.2f})",
        ),
    ]
    for kind, c in sorted(plan["collectives"].items()):
        rows.append((f"  {kind}", f"{c['count']} ops, {c['bytes'] / 2**20:.1f} MiB per device"))
    if plan["peak_flops_per_device"]:
        rates = plan["images_per_second_per_device"].items()
        rows.append(("images/s per device", ", ".join(f"{v:.0f} at {k} MFU" for k, v in rates)))
    if plan["chip_hours_for_recipe"]:
        hours = f"{plan['chip_hours_for_recipe']:,.1f} for {plan['recipe_steps']:,} steps"
        rows.append((f"chip-hours at {CHIP_HOURS_MFU:.0%} MFU", hours + " (a projection)"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(plan: dict) -> dict:
    """The plan with numpy scalars turned into Python numbers (for json.dump)."""
    return jax.tree.map(lambda x: x.item() if isinstance(x, np.generic) else x, plan)


def write_plan(workdir: str, plan: dict) -> str:
    """Writes ``<workdir>/plan.json`` (a local folder or a bucket) and returns its path."""
    import json

    from matching_gap import storage

    path = storage.path(workdir, "plan.json")
    storage.write_text(path, json.dumps(to_json(plan), indent=2))
    return str(path)
