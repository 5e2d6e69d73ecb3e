"""Frozen features at any scale: a split encoded batch by batch onto the devices.

Features live on the devices, sharded over the mesh's data axis, as the :class:`Features`
of a split: ``[num_batches, batch, d]`` with the batch axis split over the devices
(``P(None, "data")``), beside their labels, a mask of real examples and each example's index
in the split. No function here brings a whole split to one device or to the host:
:func:`extract` encodes a split batch by batch, each batch sharded over the devices, and
writes each device's features into its own block (a few batches of images in memory).

:class:`SplitFeatures` holds the two labelled splits of a config (fitted on, reported on)
and their features, encoded once per parameters however many evaluators read them.
:func:`from_numpy` builds :class:`Features` from host arrays (one process).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from matching_gap import data, errors
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation.encoder import make_encode

DATA_AXIS = sharding_lib.DATA_AXIS


class TooFewExamplesError(ValueError):
    """A split too small for an evaluator's settings."""


class Features(NamedTuple):
    """A split's features, sharded ``P(None, "data")`` over a mesh."""

    features: jax.Array  # float32 [num_batches, batch, d]
    labels: jax.Array  # int32 [num_batches, batch]
    mask: jax.Array  # bool [num_batches, batch]: real examples (False = padding)
    ids: jax.Array  # int32 [num_batches, batch]: index in the split (-1 = padding)
    num_classes: int

    @property
    def num_examples(self) -> int:
        return int(jnp.sum(self.mask))

    @property
    def mesh(self) -> Mesh:
        """The mesh the features are sharded over (that of :func:`stacked_sharding`)."""
        sharding = self.features.sharding
        if not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh, Mesh):
            raise TypeError(
                f"Features must be sharded over a mesh (stacked_sharding), got {sharding}; "
                "build them with extract or from_numpy."
            )
        return sharding.mesh


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """``[num_batches, batch, ...]`` with the batch axis split over the devices."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def extract(
    encode: Callable[[jax.Array], jax.Array],
    batches: Iterable[dict],
    *,
    num_batches: int,
    num_classes: int,
    mesh: Mesh,
) -> Features:
    """Encodes ``num_batches`` batches into :class:`Features`.

    ``batches``: this process's share of each global batch (``image``, ``label``, ``mask``,
    ``id``, as :meth:`matching_gap.data.EvalSplit.batches` yields them). ``encode(images)``
    gets the global batch sharded over the devices and returns ``[batch, d]``; it should be
    jitted with the parameters as an argument (compiled once).
    """
    # features, labels, mask, ids: allocated once the first batch gives the feature size.
    buffers: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None
    count = 0
    for count, batch in enumerate(batches, start=1):
        if count > num_batches:
            raise ValueError(f"more than the announced {num_batches} batches")
        columns = {k: sharding_lib.global_batch(batch[k], mesh) for k in ("label", "mask", "id")}
        out = encode(sharding_lib.global_batch(batch["image"], mesh))
        if buffers is None:
            buffers = _allocate(num_batches, out.shape[0], out.shape[1], mesh)
        buffers = _write(
            buffers, jnp.int32(count - 1), (out, columns["label"], columns["mask"], columns["id"])
        )
    if count != num_batches:
        raise ValueError(f"got {count} batches, expected {num_batches}")
    if buffers is None:
        raise ValueError("no batches to encode (num_batches=0)")
    return Features(*buffers, num_classes)


def _allocate(num_batches: int, batch: int, dim: int, mesh: Mesh):
    def zeros():
        return (
            jnp.zeros((num_batches, batch, dim), jnp.float32),
            jnp.zeros((num_batches, batch), jnp.int32),
            jnp.zeros((num_batches, batch), bool),
            jnp.full((num_batches, batch), -1, jnp.int32),
        )

    return jax.jit(zeros, out_shardings=stacked_sharding(mesh))()


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffers, index, values):
    # Batch `index` of each buffer; the shards line up, so no device sends anything.
    return tuple(
        buf.at[index].set(v.astype(buf.dtype)) for buf, v in zip(buffers, values, strict=True)
    )


def from_numpy(
    features: np.ndarray, labels: np.ndarray, num_classes: int, *, mesh: Mesh, batch_size: int
) -> Features:
    """Host features ``[n, d]`` and labels ``[n]`` as :class:`Features` (one process)."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
    n = len(labels)
    if batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of {mesh.size} devices")
    num_batches = max(1, math.ceil(n / batch_size))
    pad = num_batches * batch_size - n

    def stack(x, fill):
        x = np.concatenate([x, np.full((pad, *x.shape[1:]), fill, x.dtype)])
        return jax.device_put(
            x.reshape(num_batches, batch_size, *x.shape[1:]), stacked_sharding(mesh)
        )

    ids = np.arange(n, dtype=np.int32)
    return Features(
        stack(features, 0),
        stack(labels, 0),
        stack(np.ones(n, bool), False),
        stack(ids, -1),
        num_classes,
    )


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class SplitFeatures:
    """The two labelled splits and their features, shared by the evaluators.

    ``data.eval_train_split`` is fitted on (:meth:`fit`) and ``data.eval_split`` reported on
    (:meth:`report`), each limited to ``data.eval_max_examples`` (the quick monitor) unless
    ``whole_splits``. Each split is encoded once for given parameters and kind of features
    (``kind``, ``schema.FEATURES``; default ``eval.features``), however many evaluators read
    it, and kept until :meth:`clear`. In-memory sources are loaded once; streamed ones are
    read again at each extraction. ``raw_pixels``: the flattened evaluation view instead of
    an encoder (the parameters and the kind are ignored).
    """

    def __init__(
        self, config, graphdef, mesh, *, whole_splits: bool = False, raw_pixels: bool = False
    ):
        self._config = config
        self._mesh = mesh
        self._raw_pixels = raw_pixels
        self._make_encode = lambda kind: make_encode(
            config, graphdef, mesh, raw_pixels=raw_pixels, features=kind
        )
        self._encoders: dict[str, Callable] = {}  # kind of features -> jitted encode
        self._max_examples = 0 if whole_splits else config.data.eval_max_examples
        self._splits: tuple[data.EvalSplit, data.EvalSplit] | None = None
        self._params = None
        self._cache: dict[tuple[int, str], Features] = {}  # (split, kind of features) -> ...

    def splits(self) -> tuple[data.EvalSplit, data.EvalSplit]:
        """The two splits (missing or inconsistent data fails here)."""
        if self._splits is None:
            c = data_config = self._config.data
            fit, report = (
                data.eval_split(
                    data_config,
                    split,
                    batch_size=self._config.eval.batch_size,
                    max_examples=self._max_examples,
                    crop_size=self._config.augment.crop_size,
                )
                for split in (c.eval_train_split, c.eval_split)
            )
            if fit.num_classes != report.num_classes:
                raise errors.DataError(
                    f"The evaluation splits {c.eval_train_split!r} and {c.eval_split!r} have "
                    f"{fit.num_classes} and {report.num_classes} classes; they need the same "
                    "classes (an image folder needs the same class sub-folders in every split)."
                )
            self._splits = fit, report
        return self._splits

    def extract(self, split: data.EvalSplit, params, kind: str | None = None):
        """The features of ``split`` (:class:`Features`), not kept."""
        kind = self._kind(kind)
        if kind not in self._encoders:
            self._encoders[kind] = self._make_encode(kind)
        encode = lambda images: self._encoders[kind](params, images)
        return extract(
            encode,
            split.batches(),
            num_batches=split.num_batches,
            num_classes=split.num_classes,
            mesh=self._mesh,
        )

    def fit(self, params, kind: str | None = None) -> Features:
        return self._get(0, params, kind)

    def report(self, params, kind: str | None = None) -> Features:
        return self._get(1, params, kind)

    def features(self, params, kind: str | None = None) -> tuple[Features, Features]:
        """The features of both splits."""
        return self.fit(params, kind), self.report(params, kind)

    def clear(self, *, fit_only: bool = False) -> None:
        """Frees the kept features (those of the fitted split only: ``fit_only``)."""
        for key in [k for k in self._cache if k[0] == 0]:
            del self._cache[key]
        if not fit_only:
            self._params, self._cache = None, {}

    def _kind(self, kind: str | None) -> str:
        if self._raw_pixels:
            return "raw_pixels"
        return self._config.eval.features if kind is None else kind

    def _get(self, which: int, params, kind: str | None) -> Features:
        if params is not self._params:
            self.clear()
            self._params = params
        key = (which, self._kind(kind))
        if key not in self._cache:
            self._cache[key] = self.extract(self.splits()[which], params, key[1])
        return self._cache[key]
