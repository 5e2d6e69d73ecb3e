"""Source ``"fashion_mnist_idx"``: the original Fashion-MNIST IDX files (Debian package
``dataset-fashion-mnist``), read with numpy into memory.

Files already at the configured size and channels load without TensorFlow; a class-balanced
subset of ``max_examples`` is kept (round robin over the classes).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from matching_gap.data.in_memory import Dataset, class_balanced_subset, prepare_in_memory
from matching_gap.data.views import import_tensorflow
from matching_gap.errors import DataError, DataNotFoundError
from matching_gap.schema import DataConfig

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = 10

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


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


def load(cfg: DataConfig, split: str) -> Dataset:
    """``split`` (``train`` or ``test``) in memory, at the configured size and channels."""
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
        keep = class_balanced_subset(labels, cfg.max_examples)
        images, labels = images[keep], labels[keep]
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
        tf = import_tensorflow()
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        images, labels = prepare_in_memory(
            ds, encoded=False, image_size=cfg.image_size, channels=cfg.channels
        )
    return Dataset(images, labels, FASHION_MNIST_CLASSES, "fashion_mnist")
