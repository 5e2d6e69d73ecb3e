"""The entry points that dispatch on ``data.source``: a split in memory
(:func:`load_split`), the training split's size (:func:`training_split`) and this process's
training batches (:func:`train_iterator`).

Each source is a module of this package with the same functions: ``load(cfg, split) ->
Dataset`` (in memory), and for a streamed source ``num_examples(cfg, split)``, an iterator
of training batches and ``eval_shares(...)`` (``eval_splits.eval_split``'s reader).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from matching_gap.data import idx, image_folder, tfds
from matching_gap.data.in_memory import Dataset
from matching_gap.data.stream import check_data_config, train_batches
from matching_gap.schema import AugmentConfig, DataConfig

# data.source -> its module (the names are schema.SOURCES).
SOURCES = {"fashion_mnist_idx": idx, "tfds": tfds, "image_folder": image_folder}


def load_split(data_config: DataConfig, split: str, max_examples: int | None = None) -> Dataset:
    """Loads one split of the configured source into memory (``in_memory``).

    ``max_examples`` (0 = all), when given, replaces ``data_config.max_examples``: pass
    ``data_config.eval_max_examples`` for an evaluation split.
    """
    check_data_config(data_config)
    if max_examples is not None:
        data_config = dataclasses.replace(data_config, max_examples=max_examples)
    return SOURCES[data_config.source].load(data_config, split)


def training_split(data_config: DataConfig) -> tuple[Dataset | None, int]:
    """``(dataset, num_examples)`` of ``train_split``: in memory, or (streamed,
    ``in_memory=False``) None and its size (TFDS metadata, or the folder's file list).
    Missing data fails here."""
    check_data_config(data_config)
    if data_config.in_memory:
        dataset = load_split(data_config, data_config.train_split)
        return dataset, len(dataset)
    return None, SOURCES[data_config.source].num_examples(data_config, data_config.train_split)


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

    In memory (``dataset`` given): ``{"image", "label"}`` batches
    (:func:`stream.train_batches`); the device cuts the views from the stored images.
    Streamed (``dataset`` None): batches of views cut on the host from each original image
    with ``augment``'s settings (:func:`tfds.iterate_tfds`,
    :func:`image_folder.iterate_folder`). Either goes to ``augment.views_for``.
    """
    import jax

    where = dict(
        start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    if dataset is not None:
        return train_batches(dataset, batch_size=batch_size, seed=seed, **where)
    if data_config.source == "image_folder":
        return image_folder.iterate_folder(
            data_config,
            data_config.train_split,
            batch_size=batch_size,
            seed=seed,
            augment=augment,
            **where,
        )
    local_batch = batch_size // jax.process_count()
    return tfds.iterate_tfds(
        data_config,
        data_config.train_split,
        batch_size=local_batch,
        seed=seed,
        augment=augment,
        **where,
    )
