"""Labelled image sources for training and evaluation, handed out as numpy batches.

Three sources are supported, chosen by ``DataConfig.source``:

* ``"fashion_mnist_idx"``: the original Fashion-MNIST IDX files (Debian package
  ``dataset-fashion-mnist``), read with numpy.
* ``"tfds"``: any TFDS image-classification dataset prepared in a local ``data_dir``.
  Small ones are loaded into memory with :func:`load_split`; ImageNet-size ones are
  streamed with :func:`iterate_tfds`.
* ``"image_folder"``: a directory with one sub-folder of .jpg/.jpeg/.png files per class.
  Unreadable files are skipped with one warning that names them.

The settings are the ``data`` section of a config (``schema.DataConfig``).

Every image is brought to ``image_size x image_size x channels`` uint8 at load time by one
TensorFlow function for all sources (:func:`_tf_prepare_image`): colour to grey with the
weights ``matching_gap.augment.LUMA``, shorter side resized to ``image_size`` (bilinear,
antialiased), then the centre square. The augmentation code (``matching_gap.augment``)
thus sees fixed-size arrays.

``max_examples`` keeps a class-balanced subset of an IDX or image-folder split (round robin
over the classes, a fixed random order within each class), and the first records of a
TFDS split (TFDS shuffles the records when it prepares a dataset).

The in-memory batch iterator :func:`train_batches` is a pure function of ``(seed, step)``:
a run restarted from a checkpoint at step ``s`` sees exactly the batches it would have
seen without the interruption.

TensorFlow is imported only through :func:`import_tensorflow`, inside the functions that
need it, so the rest of the package (and machines without TensorFlow) can import this
module; IDX files already at the configured size and channels load without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from matching_gap.augment import LUMA
from matching_gap.errors import ConfigError, DataError, DataNotFoundError
from matching_gap.schema import DataConfig

__all__ = [
    "DataConfig",
    "DataNotFoundError",
    "Dataset",
    "EvalSplit",
    "eval_split",
    "import_tensorflow",
    "iterate_tfds",
    "load_split",
    "read_idx_images",
    "read_idx_labels",
    "train_batches",
    "train_iterator",
    "training_split",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = 10
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

# How many unreadable image-folder files the warning names one by one.
_SKIPPED_NAMED = 10
_REPORTED_SKIPS: set = set()  # (folder, unreadable files) already reported by this process


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory labelled image set."""

    images: np.ndarray  # uint8 [n, h, w, c]  (all images of one split, same size)
    labels: np.ndarray  # int32 [n]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _class_balanced_subset(labels: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of ``count`` examples taken round robin over the classes.

    Each class is visited in a fixed random order (seed 0), so the subset depends only on
    ``labels`` and ``count``; a class that runs out drops out of the later rounds.
    """
    if count >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(0).permutation(len(labels))
    rank = np.empty(len(labels), np.int64)  # position of each example within its class
    for label in np.unique(labels):
        members = order[labels[order] == label]
        rank[members] = np.arange(len(members))
    return np.sort(np.lexsort((labels, rank))[:count])


# --------------------------------------------------------------------------------------
# TensorFlow: the import, and the one image preparation all sources share.


@functools.cache
def import_tensorflow():
    """Imports TensorFlow for input pipelines with the GPUs hidden from it; returns ``tf``.

    Left visible, TensorFlow would reserve accelerator memory that JAX needs. Hiding fails
    (RuntimeError) once TensorFlow has initialised its devices; that is logged and kept.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        logging.warning("TensorFlow had already initialised its devices: %s", e)
    return tf


def _import_tfds():
    import_tensorflow()  # first, so that TFDS finds TensorFlow with the GPUs hidden
    import tensorflow_datasets as tfds

    return tfds


def _tf_prepare_image(image, *, encoded: bool, image_size: int, channels: int):
    """TF op: encoded bytes or uint8 [h, w, c] -> uint8 [image_size, image_size, channels].

    Colour becomes grey with the weights ``LUMA``, grey becomes colour by repetition; then
    the shorter side is resized to ``image_size`` (bilinear, antialiased) and the centre
    square is kept. A batch ``[b, h, w, c]`` of same-size decoded images works too.
    """
    tf = import_tensorflow()
    if encoded:
        # Always RGB: decoders asked for one channel use their own grey weights (libpng's
        # differ from libjpeg's), and the conversion below uses LUMA.
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    have = image.shape[-1]
    if have == 4:
        image, have = image[..., :3], 3
    if have not in (1, 3):
        raise DataError(f"images have {have} channels; only 1 (grey) and 3 (RGB) are read")
    if have == 1 and channels == 3:
        image = tf.repeat(image, 3, axis=-1)
    elif have == 3 and channels == 1:
        gray = tf.tensordot(tf.cast(image, tf.float32), tf.constant(LUMA, tf.float32), 1)
        image = tf.cast(tf.clip_by_value(tf.round(gray), 0.0, 255.0), tf.uint8)[..., None]
    size = image_size
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]

    def resize_crop():
        scale = size / tf.cast(tf.minimum(h, w), tf.float32)
        new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        resized = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        cropped = resized[..., top : top + size, left : left + size, :]
        return tf.cast(tf.clip_by_value(tf.round(cropped), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
    image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize_crop)
    return tf.ensure_shape(image, image.shape[:-3].concatenate([size, size, channels]))


def _prepare_fn(*, encoded: bool, image_size: int, channels: int):
    """``{"image", "label"}`` -> ``{"image": uint8 [S, S, channels], "label": int32}``.

    Also maps a batch of same-size decoded images, with a batch of labels, at once.
    """
    tf = import_tensorflow()

    def prepare(example):
        image = _tf_prepare_image(
            example["image"], encoded=encoded, image_size=image_size, channels=channels
        )
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    return prepare


def _deterministic(ds):
    options = import_tensorflow().data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _prepare_in_memory(
    ds, *, encoded: bool, image_size: int, channels: int, batched: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A tf.data set of ``{"image", "label"}`` -> uint8 [n, S, S, channels], int32 [n].

    ``batched``: ``ds`` yields batches of same-size decoded images, prepared a batch at
    a time (several times faster than one by one).
    """
    tf = import_tensorflow()
    prepare = _prepare_fn(encoded=encoded, image_size=image_size, channels=channels)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _deterministic(ds if batched else ds.batch(1024))
    images = [np.zeros((0, image_size, image_size, channels), np.uint8)]
    labels = [np.zeros(0, np.int32)]
    for batch in ds.as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------------------
# Source: Fashion-MNIST IDX files.


def _open_idx(directory: str, stem: str):
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    raise DataNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory!r}. Fixes: install the "
        "Debian package (`apt-get update && apt-get install -y dataset-fashion-mnist`, "
        f"files land in {DEFAULT_FASHION_MNIST_DIR}), or point --config.data.data_dir at "
        "a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
    )


def _idx_error(directory: str, stem: str, problem: str) -> DataError:
    return DataError(
        f"{os.path.join(directory, stem)}[.gz] is not a valid IDX file: {problem}. Replace "
        "it with the original (`apt-get install --reinstall dataset-fashion-mnist`), or "
        "point --config.data.data_dir at a folder with intact files."
    )


def read_idx_images(directory: str, stem: str) -> np.ndarray:
    """Reads an IDX3 image file (magic 2051) as uint8 [n, rows, cols, 1]."""
    with _open_idx(directory, stem) as f:
        header = f.read(16)
        if len(header) != 16:
            raise _idx_error(directory, stem, "truncated header")
        magic, n, rows, cols = struct.unpack(">IIII", header)
        if magic != _IDX_IMAGES_MAGIC:
            raise _idx_error(directory, stem, f"magic {magic}, want {_IDX_IMAGES_MAGIC}")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != n * rows * cols:
        raise _idx_error(directory, stem, f"{data.size} pixels, header says {n}x{rows}x{cols}")
    return data.reshape(n, rows, cols, 1)


def read_idx_labels(directory: str, stem: str) -> np.ndarray:
    """Reads an IDX1 label file (magic 2049) as int32 [n]."""
    with _open_idx(directory, stem) as f:
        header = f.read(8)
        if len(header) != 8:
            raise _idx_error(directory, stem, "truncated header")
        magic, n = struct.unpack(">II", header)
        if magic != _IDX_LABELS_MAGIC:
            raise _idx_error(directory, stem, f"magic {magic}, want {_IDX_LABELS_MAGIC}")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != n:
        raise _idx_error(directory, stem, f"{data.size} labels, header says {n}")
    return data.astype(np.int32)


def _load_fashion_mnist_idx(cfg: DataConfig, split: str) -> Dataset:
    if split not in _IDX_FILES:
        raise DataError(
            f"fashion_mnist_idx has splits {sorted(_IDX_FILES)}, got {split!r}; set "
            "--config.data.train_split / eval_train_split / eval_split to one of them"
        )
    directory = cfg.data_dir or DEFAULT_FASHION_MNIST_DIR
    image_stem, label_stem = _IDX_FILES[split]
    images = read_idx_images(directory, image_stem)
    labels = read_idx_labels(directory, label_stem)
    if len(images) != len(labels):
        raise DataError(
            f"{directory}: {image_stem} has {len(images)} images but {label_stem} has "
            f"{len(labels)} labels; the two files come from different datasets"
        )
    if cfg.max_examples:
        keep = _class_balanced_subset(labels, cfg.max_examples)
        images, labels = images[keep], labels[keep]
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
        tf = import_tensorflow()
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        images, labels = _prepare_in_memory(
            ds.batch(1024),
            encoded=False,
            image_size=cfg.image_size,
            channels=cfg.channels,
            batched=True,
        )
    return Dataset(images, labels, FASHION_MNIST_CLASSES, "fashion_mnist")


# --------------------------------------------------------------------------------------
# Source: a folder of class sub-folders.


def _image_folder_error(root: str, problem: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"image_folder: {problem}. Expected layout: --config.data.data_dir=ROOT with "
        "ROOT/<split>/<class_name>/*.{jpg,jpeg,png} (or ROOT/<class_name>/*.png for the "
        "'train' split); class indices follow the sorted class folder names. "
        f"ROOT was {root!r}."
    )


def _read_image_files(files: list[tuple[str, int]], skipped: list[str]) -> Iterator[dict]:
    """Yields ``{"image": uint8 [h, w, 3], "label"}``; unreadable files go to ``skipped``."""
    from PIL import Image

    for path, label in files:
        try:
            with Image.open(path) as pil:
                # RGB even for grey files, so that every image has 3 channels here and
                # the one grey conversion (LUMA) happens in _tf_prepare_image.
                image = np.asarray(pil.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append(f"{path} ({type(e).__name__}: {e})")
            continue
        yield {"image": image, "label": label}


def _load_image_folder(cfg: DataConfig, split: str) -> Dataset:
    root = cfg.data_dir
    if not os.path.isdir(root):
        raise _image_folder_error(root, "data_dir is not a directory")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        if split != "train":
            raise _image_folder_error(root, f"no sub-directory {split!r}")
        split_dir = root
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise _image_folder_error(root, f"no class folders in {split_dir!r}")
    files: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        cls_dir = os.path.join(split_dir, cls)
        names = sorted(
            e.name
            for e in os.scandir(cls_dir)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files.extend((os.path.join(cls_dir, name), label) for name in names)
    if not files:
        raise _image_folder_error(root, f"no .jpg/.jpeg/.png files under {split_dir!r}")
    if cfg.max_examples:
        keep = _class_balanced_subset(np.array([label for _, label in files]), cfg.max_examples)
        files = [files[i] for i in keep]

    tf = import_tensorflow()
    skipped: list[str] = []
    signature = {
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "label": tf.TensorSpec([], tf.int32),
    }
    ds = tf.data.Dataset.from_generator(
        lambda: _read_image_files(files, skipped), output_signature=signature
    )
    images, labels = _prepare_in_memory(
        ds, encoded=False, image_size=cfg.image_size, channels=cfg.channels
    )
    # The same files are often loaded twice (pretraining, then the k-NN / probe split).
    if skipped and (split_dir, tuple(skipped)) not in _REPORTED_SKIPS:
        _REPORTED_SKIPS.add((split_dir, tuple(skipped)))
        extra = len(skipped) - _SKIPPED_NAMED
        logging.warning(
            "image_folder: skipped %d of %d image files that cannot be read (delete or "
            "re-encode them): %s%s",
            len(skipped),
            len(files),
            "; ".join(skipped[:_SKIPPED_NAMED]),
            f"; and {extra} more" if extra > 0 else "",
        )
    if not len(labels):
        raise DataError(
            f"image_folder: none of the {len(files)} image files under {split_dir!r} can be "
            f"read (first: {skipped[0]}). Re-encode them as JPEG or PNG."
        )
    name = os.path.basename(os.path.normpath(root))
    return Dataset(images, labels, len(classes), name)


# --------------------------------------------------------------------------------------
# Source: TensorFlow Datasets.


def _tfds_missing(name: str, data_dir: str | None, cause: Exception) -> DataNotFoundError:
    where = data_dir or "the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    hint = (
        " For Fashion-MNIST without TFDS data use --config.data.source=fashion_mnist_idx "
        "(files from `apt-get install dataset-fashion-mnist`)."
        if name == "fashion_mnist"
        else ""
    )
    return DataNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {where} and this code never downloads "
        f"(download=False). Fixes: prepare the data_dir (`tfds build {name} "
        "--data_dir=DIR`, or download_and_prepare on a machine with network and copy DIR "
        f"here; ImageNet needs its tar files in DIR/downloads/manual), then pass "
        f"--config.data.data_dir=DIR.{hint} ({type(cause).__name__}: {cause})"
    )


def _tfds_builder(cfg: DataConfig):
    """Returns (builder, image_feature_is_encoded), failing at once when data is missing."""
    tfds = _import_tfds()

    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"unknown TFDS dataset name {cfg.name!r} (fix --config.data.name): {str(e)[:200]}"
        ) from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(
            f"TFDS dataset {cfg.name!r} has no 'image'/'label' features; choose an image "
            "classification dataset"
        )
    return builder, isinstance(features["image"], tfds.features.Image)


def _tfds_dataset(builder, encoded: bool, split, *, shuffle_seed: int | None):
    """builder.as_dataset with missing data and bad splits turned into user errors."""
    tfds = _import_tfds()

    kwargs: dict[str, Any] = {}
    if encoded:
        # Decoding after shuffle/skip means a resumed run skips raw bytes, not pixels.
        kwargs["decoders"] = {"image": tfds.decode.SkipDecoding()}
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    try:
        return builder.as_dataset(
            split=split,
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
            **kwargs,
        )
    except AssertionError as e:
        # tfds signals "not prepared" with an AssertionError ("could not find data in").
        raise _tfds_missing(builder.name, builder.data_dir, e) from e
    except ValueError as e:  # an unknown split or a malformed slice
        raise DataError(
            f"TFDS dataset {builder.name!r} cannot read split {split!r} ({e}); its splits "
            f"are {sorted(builder.info.splits)}, sliced like 'train[:10%]'"
        ) from e


def _load_tfds(cfg: DataConfig, split: str) -> Dataset:
    builder, encoded = _tfds_builder(cfg)
    ds = _tfds_dataset(builder, encoded, split, shuffle_seed=None)
    if cfg.max_examples:
        ds = ds.take(cfg.max_examples)
    images, labels = _prepare_in_memory(
        ds, encoded=encoded, image_size=cfg.image_size, channels=cfg.channels
    )
    if not len(labels):
        raise DataError(
            f"TFDS dataset {builder.name!r} split {split!r} is empty; choose another split "
            f"(it has {sorted(builder.info.splits)})"
        )
    num_classes = builder.info.features["label"].num_classes
    return Dataset(images, labels, num_classes, builder.name)


def _epoch_seed(seed: int, process_index: int, epoch: int) -> int:
    # tf.data seeds are int64; a SeedSequence mixes the three numbers without collisions.
    entropy = [seed % 2**32, process_index, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def iterate_tfds(
    data_config: DataConfig,
    split: str,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
) -> Iterator[dict]:
    """Streams shuffled, repeated batches of a TFDS split without holding it in memory.

    ``batch_size`` is per process. Each process reads its own equal-sized slice of
    ``split`` (``tfds.split_for_jax_process`` with ``drop_remainder=True``). Epoch ``e``
    of process ``p`` is shuffled (file order and a shuffle buffer) with a seed derived
    from ``(seed, p, e)``, and its incomplete last batch is dropped, so the batch at step
    ``s`` is a function of ``(seed, p, s)``: ``start_step=s`` resumes exactly, skipping
    the undecoded records of the first ``s % steps_per_epoch`` batches of its epoch.

    ``data_config.max_examples`` (0 = all) keeps the first ``max_examples //
    process_count`` records of this process's slice, and turns file shuffling off.
    ``data_config.shuffle_buffer`` sizes the shuffle buffer.

    Yields dicts ``{"image": uint8 [batch_size, S, S, c], "label": int32 [batch_size]}``.
    """
    _check_data_config(data_config)
    if data_config.source != "tfds":
        raise ConfigError(f"iterate_tfds streams TFDS data, not source {data_config.source!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    tf, tfds = import_tensorflow(), _import_tfds()
    max_examples = data_config.max_examples
    builder, encoded = _tfds_builder(data_config)
    process_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    local_max = max_examples // process_count if max_examples else 0
    if max_examples and local_max == 0:
        raise DataError(
            f"data.max_examples={max_examples} leaves no example to some of the "
            f"{process_count} processes; raise it to at least {process_count}"
        )

    def raw_epoch(epoch: int):
        epoch_seed = _epoch_seed(seed, process_index, epoch)
        ds = _tfds_dataset(
            builder, encoded, process_split, shuffle_seed=None if local_max else epoch_seed
        )
        if local_max:
            ds = ds.take(local_max)
        return ds, epoch_seed

    ds0, _ = raw_epoch(0)
    num_examples = int(ds0.cardinality())
    if num_examples < 0:  # unknown cardinality: trust the metadata
        num_examples = builder.info.splits[process_split].num_examples
        if local_max:
            num_examples = min(num_examples, local_max)
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{builder.name} {split!r}: process {process_index} has {num_examples} examples, "
            f"fewer than the per-process batch size {batch_size}; lower "
            "--config.optim.batch_size or raise data.max_examples"
        )
    prepare = _prepare_fn(
        encoded=encoded, image_size=data_config.image_size, channels=data_config.channels
    )

    def batches() -> Iterator[dict]:
        epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
        while True:
            ds, epoch_seed = raw_epoch(epoch)
            ds = ds.shuffle(
                min(data_config.shuffle_buffer, num_examples),
                seed=epoch_seed,
                reshuffle_each_iteration=False,
            )
            ds = ds.take(steps_per_epoch * batch_size).skip(step_in_epoch * batch_size)
            ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from _deterministic(ds).as_numpy_iterator()
            epoch, step_in_epoch = epoch + 1, 0

    # Not a generator itself, so that missing data and bad arguments raise at the call.
    return batches()


# --------------------------------------------------------------------------------------
# Public entry point and in-memory batch iterators.


def _check_data_config(data_config: Any) -> None:
    if not isinstance(data_config, DataConfig):
        raise TypeError(
            "expected a schema.DataConfig (the data section of a parsed config, "
            "schema.parse(config).data), "
            f"got {type(data_config).__name__}"
        )


def load_split(data_config: DataConfig, split: str, max_examples: int | None = None) -> Dataset:
    """Loads one split of the configured source into memory (see the module docstring).

    ``max_examples`` (0 = all), when given, replaces ``data_config.max_examples``: pass
    ``data_config.eval_max_examples`` for an evaluation split.
    """
    _check_data_config(data_config)
    if max_examples is not None:
        data_config = dataclasses.replace(data_config, max_examples=max_examples)
    loaders = {
        "fashion_mnist_idx": _load_fashion_mnist_idx,
        "tfds": _load_tfds,
        "image_folder": _load_image_folder,
    }
    return loaders[data_config.source](data_config, split)


def training_split(data_config: DataConfig) -> tuple[Dataset | None, int]:
    """``(dataset, num_examples)`` of ``train_split``: in memory, or (streamed,
    ``in_memory=False``) None and its size from the TFDS metadata. Missing data fails here."""
    _check_data_config(data_config)
    if data_config.in_memory:
        dataset = load_split(data_config, data_config.train_split)
        return dataset, len(dataset)
    builder, encoded = _tfds_builder(data_config)
    _tfds_dataset(builder, encoded, data_config.train_split, shuffle_seed=None)  # prepared?
    n = builder.info.splits[data_config.train_split].num_examples
    return None, min(n, data_config.max_examples) if data_config.max_examples else n


def train_iterator(
    data_config: DataConfig,
    dataset: Dataset | None,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
) -> Iterator[dict]:
    """This process's share of the global training batches from ``start_step`` on: over the
    in-memory ``dataset`` (:func:`train_batches`) or streamed (:func:`iterate_tfds`)."""
    import jax

    where = dict(
        start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    if dataset is not None:
        return train_batches(dataset, batch_size=batch_size, seed=seed, **where)
    local_batch = batch_size // jax.process_count()
    return iterate_tfds(
        data_config, data_config.train_split, batch_size=local_batch, seed=seed, **where
    )


def check_batch_fits(num_examples: int, batch_size: int, name: str) -> None:
    """A training split must hold at least one global batch."""
    if num_examples < batch_size:
        raise DataError(
            f"dataset {name!r} has {num_examples} examples < batch_size {batch_size}; lower "
            "--config.optim.batch_size or raise data.max_examples"
        )


def train_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Infinite shuffled batches whose content at step ``s`` depends only on ``(seed, s)``.

    ``batch_size`` is the global batch. Epoch ``e`` visits the examples in the order
    ``np.random.default_rng([seed, e]).permutation(n)`` and drops its last
    ``n % batch_size`` of them; global step ``s`` is batch ``s % (n // batch_size)`` of
    epoch ``s // (n // batch_size)``. This process yields the contiguous share
    ``[process_index * b, (process_index + 1) * b)`` of each global batch,
    ``b = batch_size // process_count``.

    Yields dicts ``{"image": uint8 [b, h, w, c], "label": int32 [b]}``.
    """
    n = len(dataset)
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"global batch_size {batch_size} must be positive and divisible by "
            f"process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    check_batch_fits(n, batch_size, dataset.name)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    local = batch_size // process_count
    steps_per_epoch = n // batch_size

    def batches() -> Iterator[dict]:
        epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
        while True:
            perm = np.random.default_rng([seed, epoch]).permutation(n)
            for step in range(step_in_epoch, steps_per_epoch):
                start = step * batch_size + process_index * local
                idx = perm[start : start + local]
                yield {"image": dataset.images[idx], "label": dataset.labels[idx]}
            epoch, step_in_epoch = epoch + 1, 0

    # Not a generator itself, so that bad arguments raise at the call.
    return batches()


# --------------------------------------------------------------------------------------
# Evaluation splits: every example once, in order, cut into global batches over processes.


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """A labelled split read once in order, as ``num_batches`` global batches of
    ``batch_size`` images; :meth:`batches` yields this process's share of each.

    Each process reads its own contiguous share of the split (process ``p`` of ``P``: the
    examples ``offsets[p] <= id < offsets[p + 1]``), never another's. Every process yields
    the same number of batches: the last real one is zero-padded, and processes with fewer
    examples add fully padded batches. ``"mask"`` marks real examples and ``"id"`` holds
    each one's index in the split (-1 for padding).
    """

    name: str
    num_examples: int
    num_classes: int
    batch_size: int  # global
    num_batches: int
    image_shape: tuple[int, int, int]
    _read: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
    _offset: int
    _local_batch: int

    def batches(self) -> Iterator[dict]:
        """``{"image": uint8 [b, S, S, c], "label": int32 [b], "mask": bool [b],
        "id": int32 [b]}`` per global batch, ``b = batch_size // process_count``."""
        b, produced, next_id = self._local_batch, 0, self._offset
        for images, labels in self._read():
            real = len(labels)
            ids = np.full(b, -1, np.int32)
            ids[:real] = np.arange(next_id, next_id + real)
            next_id += real
            if real < b:
                images = np.concatenate([images, np.zeros((b - real, *images.shape[1:]), np.uint8)])
                labels = np.concatenate([labels, np.zeros(b - real, np.int32)])
            yield {"image": images, "label": labels.astype(np.int32), "mask": ids >= 0, "id": ids}
            produced += 1
        while produced < self.num_batches:
            yield {
                "image": np.zeros((b, *self.image_shape), np.uint8),
                "label": np.zeros(b, np.int32),
                "mask": np.zeros(b, bool),
                "id": np.full(b, -1, np.int32),
            }
            produced += 1


def eval_split(
    data_config: DataConfig,
    split: str,
    *,
    batch_size: int,
    max_examples: int = 0,
    dataset: Dataset | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalSplit:
    """``split`` of the configured source as an :class:`EvalSplit` of global ``batch_size``.

    Streamed with tf.data when the source is TFDS with ``in_memory=False`` (only a few
    batches in memory at a time: ImageNet's 1.28M images are never held), else loaded with
    :func:`load_split` (or given as ``dataset``, already loaded). ``max_examples`` (0 = all)
    limits the split as :func:`load_split` does. The processes default to JAX's.
    """
    import jax

    _check_data_config(data_config)
    p = jax.process_index() if process_index is None else process_index
    num_p = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % num_p:
        raise ConfigError(
            f"the evaluation batch ({batch_size}) must be a positive multiple "
            f"of the number of processes ({num_p}); set eval.batch_size"
        )
    local = batch_size // num_p
    streamed = dataset is None and data_config.source == "tfds" and not data_config.in_memory
    if not streamed:
        if dataset is None:
            dataset = load_split(data_config, split, max_examples)
        n = len(dataset)
        offsets = [q * n // num_p for q in range(num_p + 1)]
        mine = slice(offsets[p], offsets[p + 1])
        images, labels = dataset.images[mine], dataset.labels[mine]

        def read():
            for start in range(0, len(labels), local):
                yield images[start : start + local], labels[start : start + local]

        name, num_classes = dataset.name, dataset.num_classes
    else:
        tf, tfds = import_tensorflow(), _import_tfds()
        builder, encoded = _tfds_builder(data_config)
        base = f"{split}[:{max_examples}]" if max_examples else split
        shares = [
            tfds.split_for_jax_process(
                base, process_index=q, process_count=num_p, drop_remainder=False
            )
            for q in range(num_p)
        ]
        sizes = [
            int(_tfds_dataset(builder, encoded, s, shuffle_seed=None).cardinality()) for s in shares
        ]
        if min(sizes) < 0:
            sizes = [builder.info.splits[s].num_examples for s in shares]
        offsets = list(np.cumsum([0, *sizes]))
        prepare = _prepare_fn(
            encoded=encoded, image_size=data_config.image_size, channels=data_config.channels
        )

        def read():
            ds = _tfds_dataset(builder, encoded, shares[p], shuffle_seed=None)
            ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
            ds = _deterministic(ds.batch(local).prefetch(2))
            for batch in ds.as_numpy_iterator():
                yield batch["image"], batch["label"]

        name, num_classes = builder.name, builder.info.features["label"].num_classes
        n = int(offsets[-1])
        if not n:
            raise DataError(
                f"TFDS dataset {name!r} split {base!r} is empty; choose another "
                f"split (it has {sorted(builder.info.splits)})"
            )
    sizes = np.diff(offsets)
    num_batches = int(max(-(-int(size) // local) for size in sizes))
    shape = (data_config.image_size, data_config.image_size, data_config.channels)
    return EvalSplit(
        name, int(n), int(num_classes), batch_size, num_batches, shape, read, int(offsets[p]), local
    )
