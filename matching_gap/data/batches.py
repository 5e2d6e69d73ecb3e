"""The form of a training batch, without data: the uint8 arrays
``sources.train_iterator`` yields for a config (:func:`batch_shapes`), and random pixels in
that form (:func:`synthetic_batch`) for benchmarks, plans and tests.
"""

from __future__ import annotations

import numpy as np


def batch_shapes(config, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The uint8 arrays of a training batch of ``batch_size`` images (the labels aside), as
    :func:`sources.train_iterator` yields them for ``config`` (a ``schema.Config``): the stored
    images (in memory) or each image's host-cut views (streamed)."""
    c, aug, d = config.data.channels, config.augment, config.data
    if d.in_memory:
        return {"image": (batch_size, d.image_size, d.image_size, c)}
    out: dict[str, tuple[int, ...]] = {
        "views": (batch_size, aug.num_views, aug.crop_size, aug.crop_size, c)
    }
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
