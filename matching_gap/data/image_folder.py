"""Source ``"image_folder"``: a directory with one sub-folder of .jpg/.jpeg/.png files per
class (ImageNet as PyTorch's scripts leave it), held in memory (:func:`load`) or streamed
(:func:`iterate_folder`).

The files of a split are listed once (:func:`list_files`); ``max_examples`` keeps a
class-balanced subset. An unreadable file is named in one warning per process: skipped in
memory, replaced by a black image in a stream (its place is kept, so resumes stay exact).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
from absl import logging

from matching_gap import crops
from matching_gap.data.in_memory import Dataset, class_balanced_subset, prepare_in_memory
from matching_gap.data.stream import (
    Shares,
    check_batch_fits,
    check_data_config,
    check_stream_args,
    even_offsets,
    finish_fn,
    stream_batches,
)
from matching_gap.data.views import (
    deterministic,
    eval_view_fn,
    import_tensorflow,
    plain_tf,
    tf_decode,
)
from matching_gap.errors import DataError, DataNotFoundError
from matching_gap.schema import AugmentConfig, DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# How many unreadable image-folder files the warning names one by one.
_SKIPPED_NAMED = 10
_REPORTED_SKIPS: set = set()  # (folder, unreadable files) already reported by this process
_REPORTED_BAD: set = set()  # streamed files already named as unreadable by this process


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
class Listing:
    """The files of one split of an image folder, listed once."""

    paths: list[str]
    labels: np.ndarray  # int32 [n]
    num_classes: int
    name: str
    split_dir: str


def list_files(cfg: DataConfig, split: str, max_examples: int) -> Listing:
    """The image files of ``split``, labelled by their sorted class folder; ``max_examples``
    (0 = all) keeps a class-balanced subset."""
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
        keep = class_balanced_subset(labels, max_examples)
        files, labels = [files[i] for i in keep], labels[keep]
    name = os.path.basename(os.path.normpath(root))
    return Listing([p for p, _ in files], labels, len(classes), name, split_dir)


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


def load(cfg: DataConfig, split: str) -> Dataset:
    """``split`` in memory; unreadable files are skipped and named in one warning."""
    listing = list_files(cfg, split, cfg.max_examples)
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
    images, labels = prepare_in_memory(
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


def num_examples(cfg: DataConfig, split: str) -> int:
    """The size of a streamed training split (its file list)."""
    return len(list_files(cfg, split, cfg.max_examples).paths)


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


def _tf_read_or_flag(paths_and_labels):
    """tf.data of ``(position, {"path", "label"})`` -> ``(position, {"image": uint8
    [h, w, 3], "label", "ok", "path"})``, decoded in parallel and in order. A file that
    cannot be read or decoded becomes a 1 x 1 black image with ``ok`` False: the example
    keeps its place, so a batch stays a function of its step."""
    tf = import_tensorflow()

    def read(position, example):
        def decode(e):
            image = tf_decode(tf.io.read_file(e["path"]))
            return {**e, "image": image, "ok": tf.constant(True)}

        good = tf.data.Dataset.from_tensors(example).map(plain_tf(decode)).ignore_errors()
        bad = tf.data.Dataset.from_tensors(
            {**example, "image": tf.zeros([1, 1, 3], tf.uint8), "ok": tf.constant(False)}
        )
        return good.concatenate(bad).take(1).map(lambda e: (position, e))

    return paths_and_labels.interleave(
        plain_tf(read),
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
    :func:`stream.train_batches` does in memory. tf.data reads and decodes the files in parallel,
    in order. The views of the example at position ``step * b + i`` of process ``p`` are cut
    under the seed ``(seed, p, step * b + i)``: a resumed run sees the same batches.

    A file that cannot be read is replaced by a black image (its place is kept, so resumes
    stay exact) and named in one warning. Yields what :func:`tfds.iterate_tfds` yields.
    """
    check_data_config(data_config)
    check_stream_args(batch_size, start_step, process_index, process_count)
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size {batch_size} must be divisible by process_count {process_count}"
        )
    tf = import_tensorflow()
    listing = list_files(data_config, split, data_config.max_examples)
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
    batches = stream_batches(
        epoch_records,
        steps_per_epoch=steps_per_epoch,
        batch_size=local,
        start_step=start_step,
        load=_tf_read_or_flag,
        finish=finish_fn(data_config, augment, base_seed),
    )
    return _report_bad_rows(batches, listing.split_dir, n)


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
    """``split`` streamed once in order as DINO's evaluation view, each process its
    contiguous share of the file list; ``max_examples`` (0 = all) a class-balanced subset."""
    p, local = process_index, local_batch
    tf = import_tensorflow()
    files = list_files(data_config, split, max_examples)
    n = len(files.paths)
    offsets = even_offsets(n, process_count)
    view = eval_view_fn(
        encoded=False, resize=data_config.image_size, crop=crop, channels=data_config.channels
    )

    def read():
        mine = slice(offsets[p], offsets[p + 1])
        ds = tf.data.Dataset.from_tensor_slices(
            {"path": files.paths[mine], "label": files.labels[mine]}
        )
        ds = _tf_read_or_flag(ds.enumerate()).map(
            plain_tf(lambda i, e: {**view(e), "ok": e["ok"], "path": e["path"]}),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = deterministic(ds.batch(local).prefetch(2)).as_numpy_iterator()
        for batch in _report_bad_rows(ds, files.split_dir, n):
            yield batch["image"], batch["label"]

    return Shares(files.name, files.num_classes, offsets, read)
