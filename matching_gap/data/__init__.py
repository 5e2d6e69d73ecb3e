"""Labelled image sources for training and evaluation, handed out as numpy batches.

Three sources, chosen by ``data.source`` (``schema.DataConfig``), one module each:

* ``idx``: ``"fashion_mnist_idx"``, the original Fashion-MNIST IDX files (Debian package
  ``dataset-fashion-mnist``), read with numpy.
* ``tfds``: ``"tfds"``, any TFDS image-classification dataset prepared in a local
  ``data_dir``.
* ``image_folder``: ``"image_folder"``, a directory with one sub-folder of .jpg/.jpeg/.png
  files per class (ImageNet as PyTorch's scripts leave it).

A split is held in memory (``data.in_memory``, ``in_memory``: every image brought to one
size once; the device cuts the training views) or streamed (``data.in_memory=False``: each
image decoded when its batch comes and its training views cut on the host from the whole
image, ``matching_gap.crops``; nothing is held whole). The rest of the package:

* ``views``: the tf.data functions every source calls (decoding, the stored square, DINO's
  evaluation view, the host-cut training views), and the one TensorFlow import.
* ``stream``: which process reads which examples, and the streaming that feeds them; every
  training batch is a pure function of ``(seed, process, step)``.
* ``sources``: the entry points that dispatch on ``data.source``; ``eval_splits``: the
  evaluation splits; ``batches``: the form of a training batch.

To add a source: a module with ``load(cfg, split) -> Dataset`` (and, streamed,
``num_examples``, an iterator of training batches and ``eval_shares``), its name in
``sources.SOURCES`` and in ``schema.SOURCES``.
"""

from matching_gap.data.batches import batch_shapes, synthetic_batch
from matching_gap.data.eval_splits import EvalSplit, eval_split
from matching_gap.data.idx import DEFAULT_FASHION_MNIST_DIR, read_idx_images, read_idx_labels
from matching_gap.data.image_folder import iterate_folder
from matching_gap.data.in_memory import Dataset
from matching_gap.data.sources import load_split, train_iterator, training_split
from matching_gap.data.stream import check_batch_fits, train_batches
from matching_gap.data.tfds import iterate_tfds
from matching_gap.data.views import import_tensorflow
from matching_gap.errors import DataNotFoundError
from matching_gap.schema import DataConfig

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "DataConfig",
    "DataNotFoundError",
    "Dataset",
    "EvalSplit",
    "batch_shapes",
    "check_batch_fits",
    "eval_split",
    "import_tensorflow",
    "iterate_folder",
    "iterate_tfds",
    "load_split",
    "read_idx_images",
    "read_idx_labels",
    "synthetic_batch",
    "train_batches",
    "train_iterator",
    "training_split",
]
