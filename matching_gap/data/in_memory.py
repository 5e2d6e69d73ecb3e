"""Splits held in memory: :class:`Dataset`, the class-balanced subset of ``max_examples``,
and the preparation of a tf.data set into uint8 arrays of one size.

Every image is brought to ``image_size x image_size x channels`` uint8 once
(:func:`views.prepare_fn`: colour to grey with the weights ``augment.LUMA``, shorter side
resized to ``image_size``, bicubic, antialiased, then the centre square); the device cuts the
training views from these (``augment.make_views``). For sets whose images have one size
(Fashion-MNIST, CIFAR).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from matching_gap.data.views import deterministic, import_tensorflow, prepare_fn


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory labelled image set."""

    images: np.ndarray  # uint8 [n, h, w, c]  (all images of one split, same size)
    labels: np.ndarray  # int32 [n]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def class_balanced_subset(labels: np.ndarray, count: int) -> np.ndarray:
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


def prepare_in_memory(
    ds, *, encoded: bool, image_size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """A tf.data set of ``{"image", "label"}`` -> uint8 [n, S, S, channels], int32 [n]."""
    tf = import_tensorflow()
    prepare = prepare_fn(encoded=encoded, image_size=image_size, channels=channels)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = deterministic(ds.batch(1024))
    images = [np.zeros((0, image_size, image_size, channels), np.uint8)]
    labels = [np.zeros(0, np.int32)]
    for batch in ds.as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)
