"""How many images a host core decodes and cuts into the recipe's views, against the need.

    python benchmarks/input_pipeline.py                       # the table on this machine
    python benchmarks/input_pipeline.py --mode=plan --topology=v4-32 --config=configs/vitb16.py

It writes ImageNet-sized JPEGs (most about 500 x 375 or 375 x 500, some up to 2000 px, about
110 kB each, as ImageNet's train set), stores them twice, as a folder (``train/<class>/
*.JPEG``) and as a prepared TFDS dataset (TFRecords of the same JPEG bytes, as
``imagenet2012``), and streams both through the training input pipeline
(``data.iterate_folder`` / ``data.iterate_tfds``: read, decode once, cut every view from the
whole image, bicubic and antialiased), for the recipe's 12 views (2 x 224 + 10 x 96) and the
2-view regime (2 x 224). A reference row does DINO's per-image work with PIL in one Python
thread (decode, then PIL's bicubic resize of each box: torchvision's ``resized_crop``), on the
same files and boxes. Each figure is one process pinned to ``k`` cores
(``os.sched_setaffinity``), after a warm-up: images per second, and per core.

The device's share of the view-making is printed beside it: XLA's count of one batch's
view-making on the device, cutting the views from images stored at 256 (the pipeline before
views were cut on the host) against finishing views cut on the host (flips and colour).

``--mode=plan`` adds, for ``--topology`` and ``--config``: the images per second one host of
the slice must feed at the plan's assumed MFU (chips per host from libtpu's topology x
``plan``'s images per second per chip), and how many host cores that is at the measured
one-core rate. Needs the ``tpu`` extra (libtpu) for the topology.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REGIMES = {"12 views (2 x 224 + 10 x 96)": 10, "2 views (2 x 224)": 0}


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) spread as ImageNet's: mostly 500 x 375 / 375 x 500, some larger."""
    r = rng.uniform()
    if r < 0.45:
        return 375 + int(rng.integers(-25, 26)), 500
    if r < 0.65:
        return 500, 375 + int(rng.integers(-25, 26))
    if r < 0.95:
        h = int(rng.integers(200, 800))
        return h, int(h * rng.uniform(0.6, 1.8))
    return int(rng.integers(1000, 2000)), int(rng.integers(1000, 2000))


def write_images(root: str, count: int, classes: int = 4, seed: int = 0) -> list[int]:
    """``root/train/c<k>/<i>.JPEG``: textured images (smooth shapes plus grain); sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        h, w = image_size(rng)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack(
            [
                127 + 100 * np.sin(x / rng.uniform(8, 40) + y / rng.uniform(8, 40) + c)
                for c in range(3)
            ],
            -1,
        )
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = os.path.join(root, "train", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i}.JPEG")
        Image.fromarray(pixels).save(path, quality=85)
        sizes.append(os.path.getsize(path))
    return sizes


def prepare_tfds(folder_root: str, data_dir: str) -> None:
    """The folder's JPEG bytes as a prepared TFDS dataset ``imagenet_like`` in ``data_dir``."""
    _register_tfds_builder()
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet_like", data_dir=data_dir, config=None)
    builder._folder = folder_root  # noqa: SLF001 (read by _generate_examples)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def _register_tfds_builder():
    import tensorflow_datasets as tfds

    if "imagenet_like" in tfds.list_builders():
        return

    class ImagenetLike(tfds.core.GeneratorBasedBuilder):
        """Encoded JPEGs and labels, stored like imagenet2012 (TFRecords of the bytes)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=4),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            train = os.path.join(self._folder, "train")
            for label, cls in enumerate(sorted(os.listdir(train))):
                for name in sorted(os.listdir(os.path.join(train, cls))):
                    yield f"{cls}/{name}", {"image": os.path.join(train, cls, name), "label": label}

    return ImagenetLike


def measure(args) -> dict:
    """One figure, in this process (already pinned to its cores): images per second."""
    from matching_gap import config_lib, data, schema

    config = schema.parse(config_lib.load_config_file(args.config))
    aug = config.augment
    import dataclasses

    aug = dataclasses.replace(aug, num_local_crops=args.local_crops)
    if args.source == "pil":
        return measure_pil(args, aug)
    if args.source == "tfds":
        _register_tfds_builder()
        cfg = dataclasses.replace(
            config.data,
            source="tfds",
            name="imagenet_like",
            data_dir=args.tfds_dir,
            in_memory=False,
            max_examples=0,
            shuffle_buffer=256,
        )
        iterate = data.iterate_tfds
    else:
        cfg = dataclasses.replace(
            config.data,
            source="image_folder",
            data_dir=args.folder,
            in_memory=False,
            max_examples=0,
        )
        iterate = data.iterate_folder
    where = dict(seed=0, start_step=0, process_index=0, process_count=1)
    batches = iterate(cfg, "train", batch_size=args.batch, augment=aug, **where)
    for _ in range(args.warmup):
        next(batches)
    tic = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    seconds = time.perf_counter() - tic
    assert batch["views"].shape[1:] == (aug.num_views, aug.crop_size, aug.crop_size, 3)
    return {"images_per_second": args.batches * args.batch / seconds}


def measure_pil(args, aug) -> dict:
    """The reference: what DINO's loader does per image, in one Python thread. PIL decodes
    the file and resamples each box (torchvision's ``resized_crop`` on PIL images), the same
    boxes as the pipeline draws (``crops.tf_crop_box``, drawn before the clock starts)."""
    from PIL import Image

    from matching_gap import crops

    tf = crops.import_tensorflow()
    paths = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(args.folder)
        for f in files
        if f.endswith("JPEG")
    )
    specs = [s for s in crops.view_specs(aug) if s is not None]
    work = []
    for i, path in enumerate(paths[: (args.warmup + args.batches) * args.batch]):
        with Image.open(path) as im:
            width, height = im.size
        boxes = []
        for j, spec in enumerate(specs):
            u = tf.random.stateless_uniform([spec.count, 2 * crops.CROP_TRIES + 2], seed=[i, j])
            top, left, h, w = (t.numpy() for t in crops.tf_crop_box(u, height, width, spec.scale))
            boxes += [
                (spec.size, (int(x), int(y), int(x + c), int(y + r)))
                for y, x, r, c in zip(top, left, h, w, strict=True)
            ]
        work.append((path, boxes))
    tic = None
    for i, (path, boxes) in enumerate(work):
        if i == args.warmup * args.batch:
            tic = time.perf_counter()
        with Image.open(path) as im:
            im = im.convert("RGB")
            views = [np.asarray(im.resize((s, s), Image.BICUBIC, box=box)) for s, box in boxes]
    assert views[0].shape == (aug.crop_size, aug.crop_size, 3)
    return {"images_per_second": args.batches * args.batch / (time.perf_counter() - tic)}


def run_pinned(cores: int, **flags) -> dict:
    """``measure`` in a fresh process pinned to the first ``cores`` cores."""
    argv = [sys.executable, __file__, "--measure", f"--cores={cores}"]
    argv += [f"--{k}={v}" for k, v in flags.items()]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", TF_ENABLE_ONEDNN_OPTS="0")
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_share(config_path: str, batch: int = 32) -> list[tuple[str, float, float]]:
    """XLA's FLOPs and bytes per image of the view-making on the device, both ways."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from matching_gap import augment, config_lib, schema

    config = schema.parse(config_lib.load_config_file(config_path))
    rows = []
    for label, local in REGIMES.items():
        aug = dataclasses.replace(config.augment, num_local_crops=local)
        key = jax.random.key(0)
        stored = jax.ShapeDtypeStruct((batch, 256, 256, 3), jnp.uint8)
        views = jax.ShapeDtypeStruct(
            (batch, aug.num_views, aug.crop_size, aug.crop_size, 3), jnp.uint8
        )
        local_views = None
        if local:
            s = aug.local_crop_size
            local_views = jax.ShapeDtypeStruct((batch, local, s, s, 3), jnp.uint8)
        before = jax.jit(augment.make_views, static_argnums=2).lower(key, stored, aug).compile()
        after = jax.jit(augment.finish_views, static_argnums=3).lower(key, views, local_views, aug)
        after = after.compile()
        for name, compiled in (
            ("cut on the device from 256 x 256", before),
            ("finished on the device", after),
        ):
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            rows.append((f"{label}: {name}", cost["flops"] / batch, cost["bytes accessed"] / batch))
    return rows


def plan_need(config_path: str, topology: str, local_crops: int) -> dict:
    """Images per second one host of the slice consumes at the plan's assumed MFU, with
    ``local_crops`` local crops per image."""
    import dataclasses

    from matching_gap import config_lib, plan, schema

    config = schema.parse(config_lib.load_config_file(config_path))
    config = dataclasses.replace(
        config, augment=dataclasses.replace(config.augment, num_local_crops=local_crops)
    )
    topo = plan.get_topology(topology)
    hosts = len({d.process_index for d in topo.devices})
    per_image = plan.analytic_flops(config)["total"] / config.optim.batch_size
    per_chip = plan.CHIP_HOURS_MFU * topo.chip.peak_flops / per_image
    return {
        "hosts": hosts,
        "chips_per_host": len(topo.devices) // hosts,
        "mfu": plan.CHIP_HOURS_MFU,
        "per_chip": per_chip,
        "per_host": per_chip * len(topo.devices) / hosts,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["table", "plan"], default="table")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "vitb16.py"))
    parser.add_argument("--topology", default="v4-32")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cores", type=int, default=0, help="with --measure: pin to these")
    parser.add_argument("--measure", action="store_true", help="internal: one figure")
    parser.add_argument("--source", default="folder")
    parser.add_argument("--local_crops", type=int, default=10)
    parser.add_argument("--folder", default="")
    parser.add_argument("--tfds_dir", default="")
    args = parser.parse_args()
    if args.measure:
        os.sched_setaffinity(0, set(range(args.cores)))
        print(json.dumps(measure(args)))
        return

    needs = {}
    if args.mode == "plan":
        needs = {label: plan_need(args.config, args.topology, n) for label, n in REGIMES.items()}
    cores_all = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder, tfds_dir = os.path.join(tmp, "folder"), os.path.join(tmp, "tfds")
        sizes = write_images(folder, args.images)
        prepare_tfds(folder, tfds_dir)
        print(
            f"{args.images} generated JPEGs, {np.mean(sizes) / 1e3:.0f} kB on average; "
            f"batches of {args.batch}, {args.batches} timed after {args.warmup}; "
            f"config {os.path.relpath(args.config, ROOT)}\n"
        )
        print(
            "`pil`: the reference, DINO's per-image work (PIL decode, PIL bicubic resize of "
            "each box) in one Python thread, same files and boxes.\n"
        )
        print("| source | views | cores | images/s | images/s per core |")
        print("|---|---|---:|---:|---:|")
        one_core = {}
        for source in ("folder", "tfds", "pil"):
            for label, local in REGIMES.items():
                for cores in [1] if source == "pil" else sorted({1, cores_all}):
                    rate = run_pinned(
                        cores,
                        source=source,
                        local_crops=local,
                        folder=folder,
                        tfds_dir=tfds_dir,
                        config=args.config,
                        batch=args.batch,
                        batches=args.batches,
                        warmup=args.warmup,
                    )["images_per_second"]
                    if cores == 1:
                        one_core[(source, label)] = rate
                    print(f"| {source} | {label} | {cores} | {rate:.0f} | {rate / cores:.0f} |")
    print("\nThe device's share of the view-making, per image (XLA's cost analysis, CPU):\n")
    print("| views | FLOPs per image | bytes accessed per image |")
    print("|---|---:|---:|")
    for label, flops, moved in device_share(args.config):
        print(f"| {label} | {flops / 1e6:.1f} M | {moved / 1e6:.1f} MB |")
    if needs:
        first = next(iter(needs.values()))
        print(
            f"\n{args.topology}: {first['hosts']} hosts of {first['chips_per_host']} chips; "
            f"what one host must feed at {first['mfu']:.0%} MFU (plan.analytic_flops and the "
            "chip's peak), and the host cores that takes at the one-core rate above:\n"
        )
        print("| source | views | images/s per chip | images/s per host | per core | host cores |")
        print("|---|---|---:|---:|---:|---:|")
        for (source, label), rate in one_core.items():
            if source == "pil":
                continue
            need = needs[label]
            print(
                f"| {source} | {label} | {need['per_chip']:.0f} | {need['per_host']:.0f} | "
                f"{rate:.0f} | {need['per_host'] / rate:.1f} |"
            )


if __name__ == "__main__":
    main()
