"""Source ``"tfds"``: any TFDS image-classification dataset prepared in a local
``data_dir``, held in memory (:func:`load`) or streamed (:func:`iterate_tfds`).

Nothing is ever downloaded (``download=False``): missing data is one message with the fix.
``max_examples`` keeps the first records of a split (TFDS shuffles the records when it
prepares a dataset).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from matching_gap import crops
from matching_gap.data import stream
from matching_gap.data.in_memory import Dataset, prepare_in_memory
from matching_gap.data.stream import Shares, check_data_config, check_stream_args
from matching_gap.data.views import (
    deterministic,
    eval_view_fn,
    import_tensorflow,
    import_tfds,
    plain_tf,
    tf_decode,
)
from matching_gap.errors import ConfigError, DataError, DataNotFoundError
from matching_gap.schema import AugmentConfig, DataConfig


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
        "(download=False). Fixes: prepare the data_dir on a machine with network, "
        f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        "data_dir='DIR').download_and_prepare()\"` (the `tfds build` command needs "
        "apache-beam), and copy DIR here; ImageNet needs its tar files in "
        f"DIR/downloads/manual. Then pass --config.data.data_dir=DIR.{hint} "
        f"({type(cause).__name__}: {cause})"
    )


def builder_of(cfg: DataConfig):
    """Returns (builder, image_feature_is_encoded), failing at once when data is missing."""
    tfds = import_tfds()

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


def as_dataset(builder, encoded: bool, split, *, shuffle_seed: int | None):
    """builder.as_dataset with missing data and bad splits turned into user errors."""
    tfds = import_tfds()

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


def load(cfg: DataConfig, split: str) -> Dataset:
    """``split`` in memory (its first ``max_examples`` records; 0 = all)."""
    builder, encoded = builder_of(cfg)
    ds = as_dataset(builder, encoded, split, shuffle_seed=None)
    if cfg.max_examples:
        ds = ds.take(cfg.max_examples)
    images, labels = prepare_in_memory(
        ds, encoded=encoded, image_size=cfg.image_size, channels=cfg.channels
    )
    if not len(labels):
        raise DataError(
            f"TFDS dataset {builder.name!r} split {split!r} is empty; choose another split "
            f"(it has {sorted(builder.info.splits)})"
        )
    num_classes = builder.info.features["label"].num_classes
    return Dataset(images, labels, num_classes, builder.name)


def num_examples(cfg: DataConfig, split: str) -> int:
    """The size of a streamed training split (TFDS metadata); missing data fails here."""
    builder, encoded = builder_of(cfg)
    as_dataset(builder, encoded, split, shuffle_seed=None)  # prepared?
    n = builder.info.splits[split].num_examples
    return min(n, cfg.max_examples) if cfg.max_examples else n


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
    check_data_config(data_config)
    if data_config.source != "tfds":
        raise ConfigError(f"iterate_tfds streams TFDS data, not source {data_config.source!r}")
    check_stream_args(batch_size, start_step, process_index, process_count)
    tf, tfds = import_tensorflow(), import_tfds()
    max_examples = data_config.max_examples
    builder, encoded = builder_of(data_config)
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
        epoch_seed = stream.epoch_seed(seed, process_index, epoch)
        ds = as_dataset(
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
        decode = plain_tf(lambda i, e: (i, {"image": tf_decode(e["image"]), "label": e["label"]}))
        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    base_seed = crops.seed_pair(seed, process_index)
    # Not a generator itself, so that missing data and bad arguments raise at the call.
    return stream.stream_batches(
        epoch_records,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        start_step=start_step,
        load=load,
        finish=stream.finish_fn(data_config, augment, base_seed),
    )


def eval_shares(
    data_config: DataConfig,
    split: str,
    *,
    max_examples: int,
    process_index: int,
    process_count: int,
    local_batch: int,
    crop: int,
) -> Shares:
    """``split`` streamed once in order as DINO's evaluation view, each process its slice
    (``tfds.split_for_jax_process``); ``max_examples`` (0 = all) keeps the first records."""
    p, num_p, local = process_index, process_count, local_batch
    tf, tfds = import_tensorflow(), import_tfds()
    builder, encoded = builder_of(data_config)
    base = f"{split}[:{max_examples}]" if max_examples else split
    shares = [
        tfds.split_for_jax_process(base, process_index=q, process_count=num_p, drop_remainder=False)
        for q in range(num_p)
    ]
    sizes = [int(as_dataset(builder, encoded, s, shuffle_seed=None).cardinality()) for s in shares]
    if min(sizes) < 0:
        sizes = [builder.info.splits[s].num_examples for s in shares]
    offsets = list(np.cumsum([0, *sizes]))
    view = eval_view_fn(
        encoded=encoded, resize=data_config.image_size, crop=crop, channels=data_config.channels
    )

    def read():
        ds = as_dataset(builder, encoded, shares[p], shuffle_seed=None)
        ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE)
        ds = deterministic(ds.batch(local).prefetch(2))
        for batch in ds.as_numpy_iterator():
            yield batch["image"], batch["label"]

    return Shares(builder.name, builder.info.features["label"].num_classes, offsets, read)
