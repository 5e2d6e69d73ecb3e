"""Labelled image sources for training and evaluation, handed out as numpy batches.

Three sources are supported, chosen by ``DataConfig.source``:

* ``"fashion_mnist_idx"``: the original Fashion-MNIST IDX files (Debian package
  ``dataset-fashion-mnist``), read with numpy.
* ``"tfds"``: any TFDS image-classification dataset prepared in a local ``data_dir``.
* ``"image_folder"``: a directory with one sub-folder of .jpg/.jpeg/.png files per class
  (ImageNet as PyTorch's scripts leave it).

The settings are the ``data`` section of a config (``schema.DataConfig``). A split is

* held in memory (``data.in_memory``, :func:`load_split`): every image brought to
  ``image_size x image_size x channels`` uint8 once (:func:`_prepare_fn`: colour to
  grey with the weights ``augment.LUMA``, shorter side resized to ``image_size``, bicubic,
  antialiased, then the centre square); the device cuts the training views from these
  (``augment.make_views``). For sets whose images have one size (Fashion-MNIST, CIFAR).
  Unreadable image-folder files are skipped with one warning that names them.
* or streamed (``data.in_memory=False``, :func:`iterate_tfds`, :func:`iterate_folder`):
  each image is decoded when its batch comes and its training views are cut on the host
  from the whole image (``matching_gap.crops``); nothing is held whole (ImageNet).
  Evaluation splits are streamed as DINO's evaluation view (:func:`eval_split`).

``max_examples`` keeps a class-balanced subset of an IDX or image-folder split (round robin
over the classes, a fixed random order within each class), and the first records of a
TFDS split (TFDS shuffles the records when it prepares a dataset).

Every training batch iterator is a pure function of ``(seed, process, step)``: a run
restarted from a checkpoint at step ``s`` sees exactly the batches it would have seen
without the interruption.

TensorFlow is imported only through :func:`import_tensorflow`, inside the functions that
need it, so the rest of the package (and machines without TensorFlow) can import this
module; IDX files already at the configured size and channels load without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from matching_gap import crops
from matching_gap.errors import ConfigError, DataError, DataNotFoundError
from matching_gap.schema import AugmentConfig, DataConfig

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
_REPORTED_BAD: set = set()  # streamed files already named as unreadable by this process


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


import_tensorflow = crops.import_tensorflow


def _import_tfds():
    import_tensorflow()  # first, so that TFDS finds TensorFlow with the GPUs hidden
    import tensorflow_datasets as tfds

    return tfds


def _plain_tf(fn):
    """``fn`` for tf.data as it is written: its TF ops already are graph ops (``tf.cond``,
    ``tf.where``), and AutoGraph's attempt to rewrite it only adds a warning."""
    return import_tensorflow().autograph.experimental.do_not_convert(fn)


def _tf_decode(contents):
    """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 [h, w, 3], whatever the file's
    extension says (ImageNet has a PNG named .JPEG) and its colour model (CMYK and grey
    JPEGs become RGB). Always RGB: decoders asked for one channel use their own grey
    weights (libpng's differ from libjpeg's); the grey conversion uses LUMA."""
    tf = import_tensorflow()
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def _prepare_fn(*, encoded: bool, image_size: int, channels: int):
    """``{"image", "label"}`` -> ``{"image": uint8 [S, S, channels], "label": int32}``: the
    images held in memory, the evaluation view of their whole square (``S = image_size``)."""
    return _eval_view_fn(encoded=encoded, resize=image_size, crop=image_size, channels=channels)


def _eval_view_fn(*, encoded: bool, resize: int, crop: int, channels: int):
    """``{"image", "label"}`` -> DINO's evaluation view ``{"image": uint8 [crop, crop, c],
    "label"}``: the shorter side resized to ``resize``, the centre ``crop`` square."""
    tf = import_tensorflow()

    def prepare(example):
        image = _tf_decode(example["image"]) if encoded else example["image"]
        image = crops.tf_eval_view(crops.tf_to_channels(image, channels), resize, crop)
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    return _plain_tf(prepare)


def _training_views_fn(*, encoded: bool, channels: int, aug: AugmentConfig, base_seed):
    """``(position, {"image", "label"})`` -> the example's host-cut training views
    (``crops.tf_training_views``) under the stateless seed ``(base_seed, position)``."""
    tf = import_tensorflow()

    def cut(position, example):
        image = _tf_decode(example["image"]) if encoded else example["image"]
        image = crops.tf_to_channels(image, channels)
        seed = tf.stack([tf.constant(base_seed, tf.int64), position])
        out = crops.tf_training_views(image, seed, aug)
        out = {k: v for k, v in out.items() if not k.endswith("boxes")}
        out["label"] = tf.cast(example["label"], tf.int32)
        for key in ("ok", "path"):
            if key in example:
                out[key] = example[key]
        return out

    return _plain_tf(cut)


def _deterministic(ds):
    options = import_tensorflow().data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _prepare_in_memory(
    ds, *, encoded: bool, image_size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """A tf.data set of ``{"image", "label"}`` -> uint8 [n, S, S, channels], int32 [n]."""
    tf = import_tensorflow()
    prepare = _prepare_fn(encoded=encoded, image_size=image_size, channels=channels)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _deterministic(ds.batch(1024))
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
            ds, encoded=False, image_size=cfg.image_size, channels=cfg.channels
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
                # the one grey conversion (LUMA) happens in crops.tf_to_channels.
                image = np.asarray(pil.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append(f"{path} ({type(e).__name__}: {e})")
            continue
        yield {"image": image, "label": label}


@dataclasses.dataclass(frozen=True)
class _FolderListing:
    """The files of one split of an image folder, listed once."""

    paths: list[str]
    labels: np.ndarray  # int32 [n]
    num_classes: int
    name: str
    split_dir: str


def _list_image_folder(cfg: DataConfig, split: str, max_examples: int) -> _FolderListing:
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
    labels = np.array([label for _, label in files], np.int32)
    if max_examples:
        keep = _class_balanced_subset(labels, max_examples)
        files, labels = [files[i] for i in keep], labels[keep]
    name = os.path.basename(os.path.normpath(root))
    return _FolderListing([p for p, _ in files], labels, len(classes), name, split_dir)


def _report_skipped(split_dir: str, skipped: list[str], total: int, what: str) -> None:
    """One warning per process that names the unreadable files (the first few)."""
    if not skipped or (split_dir, tuple(skipped)) in _REPORTED_SKIPS:
        return
    _REPORTED_SKIPS.add((split_dir, tuple(skipped)))
    extra = len(skipped) - _SKIPPED_NAMED
    logging.warning(
        "image_folder: %s %d of %d image files that cannot be read (delete or re-encode "
        "them): %s%s",
        what,
        len(skipped),
        total,
        "; ".join(skipped[:_SKIPPED_NAMED]),
        f"; and {extra} more" if extra > 0 else "",
    )


def _load_image_folder(cfg: DataConfig, split: str) -> Dataset:
    listing = _list_image_folder(cfg, split, cfg.max_examples)
    files = list(zip(listing.paths, listing.labels.tolist(), strict=True))
    split_dir, classes = listing.split_dir, range(listing.num_classes)
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
    _report_skipped(split_dir, skipped, len(files), "skipped")
    if not len(labels):
        raise DataError(
            f"image_folder: none of the {len(files)} image files under {split_dir!r} can be "
            f"read (first: {skipped[0]}). Re-encode them as JPEG or PNG."
        )
    return Dataset(images, labels, len(classes), listing.name)


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


def _check_stream_args(batch_size, start_step, process_index, process_count) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")


def _stream(
    epoch_records: Callable[[int], Any],
    *,
    steps_per_epoch: int,
    batch_size: int,
    start_step: int,
    load: Callable[[Any], Any],
    finish: Callable,
) -> Iterator[dict]:
    """The batches of a stream from ``start_step`` on, shared by every streamed source.

    ``epoch_records(e)``: this process's records of epoch ``e`` in their order (at least
    ``steps_per_epoch * batch_size``). ``load(ds)``: records -> ``{"image": uint8 [h, w, c],
    "label", ...}`` with the position kept (parallel, in order). ``finish(position, example)``:
    the example as trained on; the example at ``position = step * batch_size + i`` of this
    process is cut under the stateless seed ``(base_seed, position)``. A resumed run skips the raw
    records of the first ``start_step % steps_per_epoch`` batches of its epoch and cuts the
    same views as an uninterrupted one.
    """
    tf = import_tensorflow()

    def batches() -> Iterator[dict]:
        epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
        while True:
            ds = epoch_records(epoch).take(steps_per_epoch * batch_size)
            ds = ds.skip(step_in_epoch * batch_size)
            ds = ds.enumerate((epoch * steps_per_epoch + step_in_epoch) * batch_size)
            ds = load(ds).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from _deterministic(ds).as_numpy_iterator()
            epoch, step_in_epoch = epoch + 1, 0

    return batches()


def _finish_fn(data_config: DataConfig, aug: AugmentConfig | None, base_seed: int):
    """``(position, example)`` -> the training example: the host-cut views with ``aug``,
    else the stored-size image (``data.image_size`` square)."""
    if aug is not None:
        return _training_views_fn(
            encoded=False, channels=data_config.channels, aug=aug, base_seed=base_seed
        )
    prepare = _prepare_fn(
        encoded=False, image_size=data_config.image_size, channels=data_config.channels
    )

    def finish(position, example):
        del position
        out = prepare({"image": example["image"], "label": example["label"]})
        for key in ("ok", "path"):
            if key in example:
                out[key] = example[key]
        return out

    return _plain_tf(finish)


def _report_bad_rows(batches: Iterator[dict], split_dir: str, total: int) -> Iterator[dict]:
    """Drops the ``ok`` / ``path`` bookkeeping of folder batches; names each unreadable file
    once per process (however many times its split is read), the first ``_SKIPPED_NAMED``."""
    for batch in batches:
        ok, paths = batch.pop("ok"), batch.pop("path")
        for path in paths[~ok]:
            name = path.decode()
            if name in _REPORTED_BAD:
                continue
            _REPORTED_BAD.add(name)
            if len(_REPORTED_BAD) <= _SKIPPED_NAMED:
                logging.warning(
                    "image_folder: %s cannot be read and is replaced by a black image "
                    "(delete or re-encode it)%s",
                    name,
                    f"; further unreadable files under {split_dir} (of {total}) are not named"
                    if len(_REPORTED_BAD) == _SKIPPED_NAMED
                    else "",
                )
        yield batch


def iterate_tfds(
    data_config: DataConfig,
    split: str,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
    augment: AugmentConfig | None = None,
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

    Yields dicts ``{"views": uint8 [batch_size, V, S, S, c], "local_views": uint8
    [batch_size, L, s, s, c] (with local crops), "label": int32 [batch_size]}``: each
    image's views cut from the whole decoded image (``crops.tf_training_views``) with
    ``augment``'s sizes. Without ``augment``: ``{"image": uint8 [batch_size, S, S, c],
    "label"}``, the images at ``data.image_size``.
    """
    _check_data_config(data_config)
    if data_config.source != "tfds":
        raise ConfigError(f"iterate_tfds streams TFDS data, not source {data_config.source!r}")
    _check_stream_args(batch_size, start_step, process_index, process_count)
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

    def epoch_records(epoch: int):
        ds, epoch_seed = raw_epoch(epoch)
        return ds.shuffle(
            min(data_config.shuffle_buffer, num_examples),
            seed=epoch_seed,
            reshuffle_each_iteration=False,
        )

    def load(ds):
        if not encoded:
            return ds
        decode = _plain_tf(lambda i, e: (i, {"image": _tf_decode(e["image"]), "label": e["label"]}))
        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    base_seed = crops.seed_pair(seed, process_index)
    # Not a generator itself, so that missing data and bad arguments raise at the call.
    return _stream(
        epoch_records,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        start_step=start_step,
        load=load,
        finish=_finish_fn(data_config, augment, base_seed),
    )


def _tf_read_or_flag(paths_and_labels):
    """tf.data of ``(position, {"path", "label"})`` -> ``(position, {"image": uint8
    [h, w, 3], "label", "ok", "path"})``, decoded in parallel and in order. A file that
    cannot be read or decoded becomes a 1 x 1 black image with ``ok`` False: the example
    keeps its place, so a batch stays a function of its step."""
    tf = import_tensorflow()

    def read(position, example):
        def decode(e):
            image = _tf_decode(tf.io.read_file(e["path"]))
            return {**e, "image": image, "ok": tf.constant(True)}

        good = tf.data.Dataset.from_tensors(example).map(_plain_tf(decode)).ignore_errors()
        bad = tf.data.Dataset.from_tensors(
            {**example, "image": tf.zeros([1, 1, 3], tf.uint8), "ok": tf.constant(False)}
        )
        return good.concatenate(bad).take(1).map(lambda e: (position, e))

    return paths_and_labels.interleave(
        _plain_tf(read),
        cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def iterate_folder(
    data_config: DataConfig,
    split: str,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
    augment: AugmentConfig | None = None,
) -> Iterator[dict]:
    """Streams shuffled, repeated batches of an image folder's split, decoding each file
    when its batch comes (ImageNet as PyTorch's scripts leave it: ``train/<class>/*.JPEG``).

    The file names are listed once. ``batch_size`` is the global batch: epoch ``e`` visits
    the files in the order ``np.random.default_rng([seed, e]).permutation(n)`` and drops its
    last ``n % batch_size``, and process ``p`` reads the contiguous share ``[p * b, (p + 1)
    * b)`` of each global batch (``b = batch_size // process_count``), as
    :func:`train_batches` does in memory. tf.data reads and decodes the files in parallel,
    in order. The views of the example at position ``step * b + i`` of process ``p`` are cut
    under the seed ``(seed, p, step * b + i)``: a resumed run sees the same batches.

    A file that cannot be read is replaced by a black image (its place is kept, so resumes
    stay exact) and named in one warning. Yields what :func:`iterate_tfds` yields.
    """
    _check_data_config(data_config)
    _check_stream_args(batch_size, start_step, process_index, process_count)
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size {batch_size} must be divisible by process_count {process_count}"
        )
    tf = import_tensorflow()
    listing = _list_image_folder(data_config, split, data_config.max_examples)
    n = len(listing.paths)
    check_batch_fits(n, batch_size, listing.name)
    steps_per_epoch, local = n // batch_size, batch_size // process_count
    paths = np.asarray(listing.paths)

    def epoch_records(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(n)[: steps_per_epoch * batch_size]
        mine = order.reshape(steps_per_epoch, process_count, local)[:, process_index].reshape(-1)
        return tf.data.Dataset.from_tensor_slices(
            {"path": paths[mine], "label": listing.labels[mine]}
        )

    base_seed = crops.seed_pair(seed, process_index)
    batches = _stream(
        epoch_records,
        steps_per_epoch=steps_per_epoch,
        batch_size=local,
        start_step=start_step,
        load=_tf_read_or_flag,
        finish=_finish_fn(data_config, augment, base_seed),
    )
    return _report_bad_rows(batches, listing.split_dir, n)


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
    ``in_memory=False``) None and its size (TFDS metadata, or the folder's file list).
    Missing data fails here."""
    _check_data_config(data_config)
    if data_config.in_memory:
        dataset = load_split(data_config, data_config.train_split)
        return dataset, len(dataset)
    if data_config.source == "image_folder":
        split = data_config.train_split
        return None, len(_list_image_folder(data_config, split, data_config.max_examples).paths)
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
    augment: AugmentConfig | None = None,
) -> Iterator[dict]:
    """This process's share of the global training batches from ``start_step`` on.

    In memory (``dataset`` given): ``{"image", "label"}`` batches (:func:`train_batches`);
    the device cuts the views from the stored images. Streamed (``dataset`` None): batches
    of views cut on the host from each original image with ``augment``'s settings
    (:func:`iterate_tfds`, :func:`iterate_folder`). Either goes to ``augment.views_for``.
    """
    import jax

    where = dict(
        start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    if dataset is not None:
        return train_batches(dataset, batch_size=batch_size, seed=seed, **where)
    if data_config.source == "image_folder":
        return iterate_folder(
            data_config,
            data_config.train_split,
            batch_size=batch_size,
            seed=seed,
            augment=augment,
            **where,
        )
    local_batch = batch_size // jax.process_count()
    return iterate_tfds(
        data_config,
        data_config.train_split,
        batch_size=local_batch,
        seed=seed,
        augment=augment,
        **where,
    )


def batch_shapes(config, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The uint8 arrays of a training batch of ``batch_size`` images (the labels aside), as
    :func:`train_iterator` yields them for ``config`` (a ``schema.Config``): the stored
    images (in memory) or each image's host-cut views (streamed)."""
    c, aug, d = config.data.channels, config.augment, config.data
    if d.in_memory:
        return {"image": (batch_size, d.image_size, d.image_size, c)}
    out = {"views": (batch_size, aug.num_views, aug.crop_size, aug.crop_size, c)}
    if aug.num_local_crops:
        size = aug.local_crop_size
        out["local_views"] = (batch_size, aug.num_local_crops, size, size, c)
    return out


def synthetic_batch(config, batch_size: int, *, seed: int = 0) -> dict:
    """Random pixels in the form of a training batch (benchmarks, tests without data)."""
    rng = np.random.default_rng(seed)
    out = {
        k: rng.integers(0, 256, shape, np.uint8)
        for k, shape in batch_shapes(config, batch_size).items()
    }
    out["label"] = np.zeros(batch_size, np.int32)
    return out


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
    crop_size: int = 0,
) -> EvalSplit:
    """``split`` of the configured source as an :class:`EvalSplit` of global ``batch_size``.

    Streamed with tf.data when ``data.in_memory`` is False (only a few batches in memory at
    a time: ImageNet's 1.28M images are never held), else loaded with :func:`load_split`
    (or given as ``dataset``, already loaded). ``max_examples`` (0 = all) limits the split
    as :func:`load_split` does. The processes default to JAX's.

    Streamed images are DINO's evaluation view of each original image when ``crop_size`` is
    given: the shorter side resized to ``data.image_size`` (bicubic, antialiased), then the
    centre ``crop_size`` square (``crops.tf_eval_view``); else the ``data.image_size``
    square. Images held in memory are stored at ``data.image_size``.
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
    streamed = dataset is None and not data_config.in_memory
    size = crop_size if streamed and crop_size else data_config.image_size
    shape = (size, size, data_config.channels)
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
    elif data_config.source == "image_folder":
        tf = import_tensorflow()
        listing = _list_image_folder(data_config, split, max_examples)
        n = len(listing.paths)
        offsets = [q * n // num_p for q in range(num_p + 1)]
        view = _eval_view_fn(
            encoded=False, resize=data_config.image_size, crop=size, channels=shape[-1]
        )

        def read():
            mine = slice(offsets[p], offsets[p + 1])
            ds = tf.data.Dataset.from_tensor_slices(
                {"path": listing.paths[mine], "label": listing.labels[mine]}
            )
            ds = _tf_read_or_flag(ds.enumerate()).map(
                _plain_tf(lambda i, e: {**view(e), "ok": e["ok"], "path": e["path"]}),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            ds = _deterministic(ds.batch(local).prefetch(2)).as_numpy_iterator()
            for batch in _report_bad_rows(ds, listing.split_dir, n):
                yield batch["image"], batch["label"]

        name, num_classes = listing.name, listing.num_classes
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
        view = _eval_view_fn(
            encoded=encoded, resize=data_config.image_size, crop=size, channels=shape[-1]
        )

        def read():
            ds = _tfds_dataset(builder, encoded, shares[p], shuffle_seed=None)
            ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE)
            ds = _deterministic(ds.batch(local).prefetch(2))
            for batch in ds.as_numpy_iterator():
                yield batch["image"], batch["label"]

        name, num_classes = builder.name, builder.info.features["label"].num_classes
        n = int(offsets[-1])
    if not n:
        raise DataError(f"{name!r} split {split!r} is empty; choose another split")
    sizes = np.diff(offsets)
    num_batches = int(max(-(-int(size) // local) for size in sizes))
    return EvalSplit(
        name, int(n), int(num_classes), batch_size, num_batches, shape, read, int(offsets[p]), local
    )
