"""Labelled image sources for training and evaluation, handed out as numpy batches.

Three sources are supported, chosen by ``data_config.source``:

* ``"fashion_mnist_idx"``: the original Fashion-MNIST IDX files (Debian package
  ``dataset-fashion-mnist``), read without TensorFlow.
* ``"tfds"``: any TFDS image-classification dataset prepared in a local ``data_dir``.
  Small ones are loaded into memory with :func:`load_split`; ImageNet-size ones are
  streamed with :func:`iterate_tfds`.
* ``"image_folder"``: a directory with one sub-folder of .jpg/.jpeg/.png files per class.

Every image is brought to ``image_size x image_size x channels`` uint8 at load time, so
that the augmentation code (``matching_gap.augment``) sees fixed-size arrays.

The in-memory batch iterator :func:`train_batches` is a pure function of ``(seed, step)``:
a run restarted from a checkpoint at step ``s`` sees exactly the batches it would have
seen without the interruption.

TensorFlow and TFDS are imported only inside the functions that need them, so the rest of
the package (and machines without TensorFlow) can import this module.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

SOURCES = ("fashion_mnist_idx", "tfds", "image_folder")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = 10
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

# Encoded ImageNet JPEGs average ~110 kB, so this buffer holds ~1 GB per process.
_DEFAULT_SHUFFLE_BUFFER = 10_000


class DataNotFoundError(FileNotFoundError):
    """The requested data is not on this machine; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory labelled image set."""

    images: np.ndarray  # uint8 [n, h, w, c]  (all images of one split, same size)
    labels: np.ndarray  # int32 [n]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------
# Config access and image geometry shared by the sources.


def _field(cfg: Any, name: str, default: Any = None) -> Any:
    # ConfigDict raises AttributeError for unknown fields; plain namespaces work too.
    value = getattr(cfg, name, default)
    return default if value is None else value


def _common_fields(data_config: Any) -> tuple[int, int, int]:
    image_size = int(_field(data_config, "image_size", 0))
    channels = int(_field(data_config, "channels", 0))
    max_examples = int(_field(data_config, "max_examples", 0))
    if image_size <= 0:
        raise ValueError(f"data.image_size must be a positive int, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {channels}")
    if max_examples < 0:
        raise ValueError(f"data.max_examples must be >= 0 (0 = all), got {max_examples}")
    return image_size, channels, max_examples


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``size`` (never below ``size``)."""
    scale = size / min(h, w)
    return max(size, round(h * scale)), max(size, round(w * scale))


def _convert_channels_np(image: np.ndarray, channels: int) -> np.ndarray:
    """[h, w, c] uint8 -> [h, w, channels] uint8."""
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        # ITU-R 601-2 luma, the same weights PIL's convert("L") and tf.image use.
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    if c == 4:
        return _convert_channels_np(image[..., :3], channels)
    raise ValueError(f"cannot convert an image with {c} channels to {channels}")


def _resize_crop_np(image: np.ndarray, size: int) -> np.ndarray:
    """[h, w, c] uint8 -> [size, size, c]: shorter side to ``size``, then centre crop."""
    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    from PIL import Image

    new_h, new_w = _resized_hw(h, w, size)
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    # Pillow's BILINEAR widens its kernel when shrinking, i.e. it is antialiased.
    resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    if c == 1:
        resized = resized[..., None]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def _standardise_np(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 [n, h, w, c] -> uint8 [n, image_size, image_size, channels]."""
    if images.shape[1:3] != (image_size, image_size):
        out = np.empty((images.shape[0], image_size, image_size, images.shape[3]), np.uint8)
        for i, image in enumerate(images):
            out[i] = _resize_crop_np(image, image_size)
        images = out
    if images.shape[3] != channels:
        images = np.stack([_convert_channels_np(image, channels) for image in images])
    return images


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


def read_idx_images(directory: str, stem: str) -> np.ndarray:
    """Reads an IDX3 image file (magic 2051) as uint8 [n, rows, cols, 1]."""
    with _open_idx(directory, stem) as f:
        header = f.read(16)
        if len(header) != 16:
            raise ValueError(f"{stem}: truncated IDX header")
        magic, n, rows, cols = struct.unpack(">IIII", header)
        if magic != _IDX_IMAGES_MAGIC:
            raise ValueError(f"{stem}: bad IDX image magic {magic}, want {_IDX_IMAGES_MAGIC}")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != n * rows * cols:
        raise ValueError(f"{stem}: {data.size} pixels, header says {n}x{rows}x{cols}")
    return data.reshape(n, rows, cols, 1)


def read_idx_labels(directory: str, stem: str) -> np.ndarray:
    """Reads an IDX1 label file (magic 2049) as int32 [n]."""
    with _open_idx(directory, stem) as f:
        header = f.read(8)
        if len(header) != 8:
            raise ValueError(f"{stem}: truncated IDX header")
        magic, n = struct.unpack(">II", header)
        if magic != _IDX_LABELS_MAGIC:
            raise ValueError(f"{stem}: bad IDX label magic {magic}, want {_IDX_LABELS_MAGIC}")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != n:
        raise ValueError(f"{stem}: {data.size} labels, header says {n}")
    return data.astype(np.int32)


def _load_fashion_mnist_idx(data_config: Any, split: str) -> Dataset:
    image_size, channels, max_examples = _common_fields(data_config)
    if split not in _IDX_FILES:
        raise ValueError(f"fashion_mnist_idx has splits {sorted(_IDX_FILES)}, got {split!r}")
    directory = _field(data_config, "data_dir", "") or DEFAULT_FASHION_MNIST_DIR
    image_stem, label_stem = _IDX_FILES[split]
    images = read_idx_images(directory, image_stem)
    labels = read_idx_labels(directory, label_stem)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels")
    if max_examples:
        images, labels = images[:max_examples], labels[:max_examples]
    images = _standardise_np(images, image_size, channels)
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


def _load_image_folder(data_config: Any, split: str) -> Dataset:
    image_size, channels, max_examples = _common_fields(data_config)
    root = _field(data_config, "data_dir", "")
    if not root or not os.path.isdir(root):
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
    if max_examples:
        files = files[:max_examples]

    from PIL import Image

    images = np.empty((len(files), image_size, image_size, channels), np.uint8)
    for i, (path, _) in enumerate(files):
        with Image.open(path) as pil:
            pil = pil.convert("L" if channels == 1 else "RGB")
            array = np.asarray(pil)
        if channels == 1:
            array = array[..., None]
        images[i] = _resize_crop_np(array, image_size)
    labels = np.array([label for _, label in files], np.int32)
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


def _tfds_builder(data_config: Any):
    """Returns (builder, image_feature_is_encoded), failing at once when data is missing."""
    import tensorflow_datasets as tfds

    name = _field(data_config, "name", "")
    if not name:
        raise ValueError("data.name must name a TFDS dataset when data.source='tfds'")
    data_dir = _field(data_config, "data_dir", "") or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown TFDS dataset name {name!r}: {str(e)[:200]}") from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"TFDS dataset {name!r} has no 'image'/'label' features")
    return builder, isinstance(features["image"], tfds.features.Image)


def _tfds_dataset(builder, encoded: bool, split, *, shuffle_seed: int | None):
    """builder.as_dataset with download errors turned into DataNotFoundError."""
    import tensorflow_datasets as tfds

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


def _tf_prepare_image(image, *, encoded: bool, image_size: int, channels: int):
    """TF op: encoded bytes or uint8 [h, w, c] -> uint8 [image_size, image_size, channels]."""
    import tensorflow as tf

    if encoded:
        image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    else:
        if image.shape[-1] == 1 and channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        elif image.shape[-1] == 3 and channels == 1:
            image = tf.image.rgb_to_grayscale(image)
    size = image_size
    shape = tf.shape(image)
    h, w = shape[0], shape[1]

    def resize_crop():
        scale = size / tf.cast(tf.minimum(h, w), tf.float32)
        new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        resized = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        cropped = resized[top : top + size, left : left + size]
        return tf.cast(tf.clip_by_value(tf.round(cropped), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
    image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize_crop)
    return tf.ensure_shape(image, [size, size, channels])


def _load_tfds(data_config: Any, split: str) -> Dataset:
    import tensorflow as tf

    image_size, channels, max_examples = _common_fields(data_config)
    builder, encoded = _tfds_builder(data_config)
    ds = _tfds_dataset(builder, encoded, split, shuffle_seed=None)
    if max_examples:
        ds = ds.take(max_examples)

    def prepare(example):
        image = _tf_prepare_image(
            example["image"], encoded=encoded, image_size=image_size, channels=channels
        )
        return image, tf.cast(example["label"], tf.int32)

    options = tf.data.Options()
    options.deterministic = True
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(1024).with_options(options)
    images, labels = [], []
    for image_batch, label_batch in ds.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        raise DataNotFoundError(f"TFDS dataset {builder.name!r} split {split!r} is empty")
    num_classes = builder.info.features["label"].num_classes
    return Dataset(np.concatenate(images), np.concatenate(labels), num_classes, builder.name)


def _epoch_seed(seed: int, process_index: int, epoch: int) -> int:
    # tf.data seeds are int64; a SeedSequence mixes the three numbers without collisions.
    entropy = [seed % 2**32, process_index, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def iterate_tfds(
    data_config: Any,
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
    Optional ``data_config.shuffle_buffer`` (default 10000) sizes the shuffle buffer.

    Yields dicts ``{"image": uint8 [batch_size, S, S, c], "label": int32 [batch_size]}``.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    image_size, channels, max_examples = _common_fields(data_config)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    buffer = int(_field(data_config, "shuffle_buffer", _DEFAULT_SHUFFLE_BUFFER))
    builder, encoded = _tfds_builder(data_config)
    process_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    local_max = max_examples // process_count if max_examples else 0
    if max_examples and local_max == 0:
        raise ValueError(f"max_examples={max_examples} < process_count={process_count}")

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
        raise ValueError(
            f"{builder.name} {split!r}: process {process_index} has {num_examples} examples, "
            f"fewer than the per-process batch size {batch_size}"
        )

    def prepare(example):
        image = _tf_prepare_image(
            example["image"], encoded=encoded, image_size=image_size, channels=channels
        )
        return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    options = tf.data.Options()
    options.deterministic = True

    def batches() -> Iterator[dict]:
        epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
        while True:
            ds, epoch_seed = raw_epoch(epoch)
            ds = ds.shuffle(
                min(buffer, num_examples), seed=epoch_seed, reshuffle_each_iteration=False
            )
            ds = ds.take(steps_per_epoch * batch_size).skip(step_in_epoch * batch_size)
            ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from ds.with_options(options).as_numpy_iterator()
            epoch, step_in_epoch = epoch + 1, 0

    # Not a generator itself, so that missing data and bad arguments raise at the call.
    return batches()


# --------------------------------------------------------------------------------------
# Public entry point and in-memory batch iterators.


def load_split(data_config: Any, split: str) -> Dataset:
    """Loads one split of the configured source into memory (see the module docstring)."""
    source = _field(data_config, "source", "")
    if source == "fashion_mnist_idx":
        return _load_fashion_mnist_idx(data_config, split)
    if source == "tfds":
        return _load_tfds(data_config, split)
    if source == "image_folder":
        return _load_image_folder(data_config, split)
    raise ValueError(f"unknown data.source {source!r}; valid sources: {', '.join(SOURCES)}")


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
    if n < batch_size:
        raise ValueError(f"dataset {dataset.name!r} has {n} examples < batch_size {batch_size}")
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


def eval_batches(dataset: Dataset, *, batch_size: int) -> Iterator[dict]:
    """One ordered pass; the last batch is zero-padded, ``"mask"`` marks real examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)
    for start in range(0, n, batch_size):
        images = dataset.images[start : start + batch_size]
        labels = dataset.labels[start : start + batch_size]
        real = len(labels)
        mask = np.zeros(batch_size, bool)
        mask[:real] = True
        if real < batch_size:
            pad = batch_size - real
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        yield {"image": images, "label": labels, "mask": mask}
