"""Evaluation splits: every example once, in order, cut into global batches over processes.

:func:`eval_split` holds a split in memory (``sources.load_split``) or streams it as DINO's
evaluation view (each streamed source's ``eval_shares``); :class:`EvalSplit` hands each
process its share of every global batch, padded so that all processes yield as many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from matching_gap.data.in_memory import Dataset
from matching_gap.data.sources import SOURCES, load_split
from matching_gap.data.stream import Shares, check_data_config, even_offsets
from matching_gap.errors import ConfigError, DataError
from matching_gap.schema import DataConfig


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


def _in_memory_shares(dataset: Dataset, p: int, num_p: int, local: int) -> Shares:
    """A split held in memory, process ``p`` of ``num_p`` its contiguous share."""
    offsets = even_offsets(len(dataset), num_p)
    mine = slice(offsets[p], offsets[p + 1])
    images, labels = dataset.images[mine], dataset.labels[mine]

    def read():
        for start in range(0, len(labels), local):
            yield images[start : start + local], labels[start : start + local]

    return Shares(dataset.name, dataset.num_classes, offsets, read)


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
    a time: ImageNet's 1.28M images are never held), else loaded with :func:`sources.load_split`
    (or given as ``dataset``, already loaded). ``max_examples`` (0 = all) limits the split
    as :func:`sources.load_split` does. The processes default to JAX's.

    Streamed images are DINO's evaluation view of each original image when ``crop_size`` is
    given: the shorter side resized to ``data.image_size`` (bicubic, antialiased), then the
    centre ``crop_size`` square (``crops.tf_eval_view``); else the ``data.image_size``
    square. Images held in memory are stored at ``data.image_size``.
    """
    import jax

    check_data_config(data_config)
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
    if streamed:
        shares = SOURCES[data_config.source].eval_shares(
            data_config,
            split,
            max_examples=max_examples,
            process_index=p,
            process_count=num_p,
            local_batch=local,
            crop=size,
        )
    else:
        if dataset is None:
            dataset = load_split(data_config, split, max_examples)
        shares = _in_memory_shares(dataset, p, num_p, local)
    name, num_classes, offsets, read = shares
    n = int(offsets[-1])
    if not n:
        raise DataError(f"{name!r} split {split!r} is empty; choose another split")
    sizes = np.diff(offsets)
    num_batches = int(max(-(-int(size) // local) for size in sizes))
    return EvalSplit(
        name, int(n), int(num_classes), batch_size, num_batches, shape, read, int(offsets[p]), local
    )
