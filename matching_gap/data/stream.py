"""Batches over processes: which process reads which examples, and the streaming that
feeds them.

* Training in memory (:func:`train_batches`) and a streamed image folder share one rule:
  epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e])
  .permutation(n)``, and process ``p`` of ``P`` reads the contiguous share ``[p * b, (p + 1) *
  b)`` of each global batch (``b = batch_size // P``). A streamed TFDS split is cut into
  equal per-process slices (``tfds.split_for_jax_process``) shuffled under
  :func:`epoch_seed`.
* :func:`stream_batches` turns any source's records into this process's batches of views.
* Evaluation splits are read once, in order, each process its contiguous share
  (:func:`even_offsets`, or TFDS's slices): :class:`Shares`, read by ``eval_splits``.

Every training batch iterator is a pure function of ``(seed, process, step)``: a run
restarted from a checkpoint at step ``s`` sees exactly the batches it would have seen
without the interruption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from matching_gap.data.in_memory import Dataset
from matching_gap.data.views import (
    deterministic,
    import_tensorflow,
    plain_tf,
    prepare_fn,
    training_views_fn,
)
from matching_gap.errors import DataError
from matching_gap.schema import AugmentConfig, DataConfig


def check_data_config(data_config: Any) -> None:
    if not isinstance(data_config, DataConfig):
        raise TypeError(
            "expected a schema.DataConfig (the data section of a parsed config, "
            "schema.parse(config).data), "
            f"got {type(data_config).__name__}"
        )


def check_stream_args(batch_size, start_step, process_index, process_count) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")


def check_batch_fits(num_examples: int, batch_size: int, name: str) -> None:
    """A training split must hold at least one global batch."""
    if num_examples < batch_size:
        raise DataError(
            f"dataset {name!r} has {num_examples} examples < batch_size {batch_size}; lower "
            "--config.optim.batch_size or raise data.max_examples"
        )


def epoch_seed(seed: int, process_index: int, epoch: int) -> int:
    # tf.data seeds are int64; a SeedSequence mixes the three numbers without collisions.
    entropy = [seed % 2**32, process_index, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


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


def stream_batches(
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
            yield from deterministic(ds).as_numpy_iterator()
            epoch, step_in_epoch = epoch + 1, 0

    return batches()


def finish_fn(data_config: DataConfig, aug: AugmentConfig | None, base_seed: np.int64):
    """``(position, example)`` -> the training example: the host-cut views with ``aug``,
    else the stored-size image (``data.image_size`` square)."""
    if aug is not None:
        return training_views_fn(
            encoded=False, channels=data_config.channels, aug=aug, base_seed=base_seed
        )
    prepare = prepare_fn(
        encoded=False, image_size=data_config.image_size, channels=data_config.channels
    )

    def finish(position, example):
        del position
        out = prepare({"image": example["image"], "label": example["label"]})
        for key in ("ok", "path"):
            if key in example:
                out[key] = example[key]
        return out

    return plain_tf(finish)


def even_offsets(num_examples: int, process_count: int) -> list[int]:
    """Process ``p`` reads the examples ``offsets[p] <= id < offsets[p + 1]`` of a split."""
    return [q * num_examples // process_count for q in range(process_count + 1)]


class Shares(NamedTuple):
    """A streamed evaluation split as each process reads it (see ``eval_splits.EvalSplit``)."""

    name: str
    num_classes: int
    offsets: list[int]  # process p reads the examples offsets[p] <= id < offsets[p + 1]
    read: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # this process's batches
