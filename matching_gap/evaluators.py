"""Frozen-feature evaluation at any scale: extraction, weighted k-NN, linear probe.

Features live on the devices, sharded over the mesh's data axis, as the
:class:`Features` of a split: ``[num_batches, batch, d]`` with the batch axis split over the
devices (``P(None, "data")``), beside their labels, a mask of real examples and each
example's index in the split. No function here brings a whole split to one device or to
the host:

* :func:`extract` encodes a split batch by batch, each batch sharded over the devices, and
  writes each device's features into its own block (a few batches of images in memory).
* :func:`knn_accuracy` (DINO's weighted k-NN) takes a partial top-k on each device's
  block and merges the candidates: memory per device ``query_chunk x (rows per device)``.
* :func:`linear_probe` (the ``features`` protocol) trains a grid of softmax-regression heads
  at once on the same features, chooses the grid point on a held-out slice of the training
  split and reports its top-1 on the evaluation split. Minibatches are drawn by example
  index, so the result does not depend on the number of devices or processes.

:func:`from_numpy` builds :class:`Features` from host arrays (one process).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from matching_gap import sharding as sharding_lib
from matching_gap.losses import l2_normalize
from matching_gap.schema import EvalConfig

DATA_AXIS = sharding_lib.DATA_AXIS
# Queries scored at once by the k-NN: similarities [QUERY_CHUNK, rows per device] per device.
QUERY_CHUNK = 256


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


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """``[num_batches, batch, ...]`` with the batch axis split over the devices."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


# --------------------------------------------------------------------------- extraction


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
    buffers, count = None, 0
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


# --------------------------------------------------------------------------------- k-NN


def knn_accuracy(
    train: Features,
    test: Features,
    *,
    k: int = 20,
    temperature: float = 0.07,
    query_chunk: int = QUERY_CHUNK,
) -> float:
    """Top-1 accuracy of DINO's weighted cosine k-NN classifier (Wu et al., 2018).

    Each test point votes with its ``k`` most cosine-similar training points, weighted by
    ``exp(similarity / temperature)``. Each device ranks its own training rows; the
    ``k`` best of each device are gathered and merged.
    """
    n_train, n_test = train.num_examples, test.num_examples
    if n_train < k:
        raise TooFewExamplesError(f"k-NN needs at least k = {k} training points, got {n_train}.")
    mesh = train.features.sharding.mesh
    count = _knn_counter(mesh, k, float(temperature), train.num_classes, query_chunk)
    correct = jnp.int32(0)
    for i in range(test.features.shape[0]):
        correct += count(
            train.features,
            train.labels,
            train.mask,
            test.features,
            test.labels,
            test.mask,
            jnp.int32(i),
        )
    return int(correct) / n_test


@functools.lru_cache(maxsize=16)
def _knn_counter(mesh: Mesh, k: int, temperature: float, num_classes: int, query_chunk: int):
    stacked = PartitionSpec(None, DATA_AXIS)

    def local_top_k(feats, labels, mask, queries):
        feats = l2_normalize(feats.reshape(-1, feats.shape[-1]))
        sims = queries @ feats.T  # [q, rows on this device]
        sims = jnp.where(mask.reshape(-1)[None], sims, -jnp.inf)
        vals, idx = jax.lax.top_k(sims, min(k, sims.shape[1]))
        labs = labels.reshape(-1)[idx]
        gather = functools.partial(jax.lax.all_gather, axis_name=DATA_AXIS, axis=1, tiled=True)
        return gather(vals), gather(labs)

    candidates = jax.shard_map(
        local_top_k,
        mesh=mesh,
        in_specs=(stacked, stacked, stacked, PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,  # all_gather's result is the same on every device
    )

    def predict(train_feats, train_labels, train_mask, queries):
        vals, labs = candidates(train_feats, train_labels, train_mask, l2_normalize(queries))
        vals, pos = jax.lax.top_k(vals, k)
        labs = jnp.take_along_axis(labs, pos, axis=1)
        weights = jnp.exp(vals / temperature)  # padding rows: exp(-inf) = 0
        votes = jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(labs, num_classes))
        return jnp.argmax(votes, axis=-1)

    @jax.jit
    def count(train_feats, train_labels, train_mask, test_feats, test_labels, test_mask, i):
        queries = jax.lax.with_sharding_constraint(test_feats[i], sharding_lib.replicated(mesh))
        b, d = queries.shape
        chunk = min(query_chunk, b)
        chunks = math.ceil(b / chunk)
        queries = jnp.pad(queries, ((0, chunks * chunk - b), (0, 0)))
        preds = jax.lax.map(
            lambda q: predict(train_feats, train_labels, train_mask, q),
            queries.reshape(chunks, chunk, d),
        ).reshape(-1)[:b]
        return jnp.sum((preds == test_labels[i]) & test_mask[i])

    return count


# ------------------------------------------------------------------------- linear probe


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """The ``features`` protocol: softmax-regression heads on standardised features, AdamW
    with a cosine schedule on shuffled minibatches, one head per (learning rate, weight
    decay) of the grid, the grid point chosen on a held-out ``holdout`` fraction of the
    training split (0 = no held-out slice, for a single grid point)."""

    # The defaults are the config's (``eval.probe_*``), written once in the schema.
    epochs: int = EvalConfig.probe_epochs
    batch_size: int = EvalConfig.probe_batch_size
    learning_rates: tuple[float, ...] = EvalConfig.probe_learning_rates
    weight_decays: tuple[float, ...] = EvalConfig.probe_weight_decays
    holdout: float = EvalConfig.probe_holdout

    def grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.learning_rates for wd in self.weight_decays]


class ProbeResult(NamedTuple):
    top1: float  # the chosen head, on the evaluation split
    learning_rate: float
    weight_decay: float
    holdout_top1: float | None  # the chosen head on the held-out slice (None without one)
    grid: list[dict]  # every head: learning_rate, weight_decay, holdout_top1, top1


def holdout_mask(ids, fraction: float):
    """Whether each example index (numpy or jax, int32; -1 = padding) is held out: a fixed
    pseudo-random ``fraction`` of the split (Knuth's multiplicative hash of the index)."""
    xp = jnp if isinstance(ids, jax.Array) else np
    hashed = (ids.astype(xp.uint32) * xp.uint32(2654435761)) >> xp.uint32(8)
    return (ids >= 0) & (hashed.astype(xp.float32) < fraction * 2.0**24)


def linear_probe(
    train: Features, test: Features, settings: ProbeSettings = ProbeSettings(), *, seed: int = 0
) -> ProbeResult:
    """The ``features`` protocol (see :class:`ProbeSettings`) on extracted features."""
    grid = settings.grid()
    if settings.holdout <= 0 and len(grid) > 1:
        raise ValueError("a grid of several heads needs a held-out slice (holdout > 0)")
    mesh = train.features.sharding.mesh
    ids, mask = to_host(train.ids), to_host(train.mask)
    held = holdout_mask(ids, settings.holdout) & mask
    fit = mask & ~held
    flat_rows = np.flatnonzero(fit)
    fit_rows = flat_rows[np.argsort(ids.reshape(-1)[flat_rows])]  # by example index
    if not len(fit_rows) or (settings.holdout > 0 and not held.any()):
        raise TooFewExamplesError(
            f"{mask.sum()} labelled examples are too few for a linear probe with "
            f"a held-out fraction of {settings.holdout}"
        )
    batch = min(settings.batch_size, len(fit_rows))
    steps_per_epoch = len(fit_rows) // batch
    total = settings.epochs * steps_per_epoch
    put = lambda x: jax.make_array_from_callback(
        x.shape, stacked_sharding(mesh), lambda index: x[index]
    )
    fit_w, held_w = put(fit.astype(np.float32)), put(held.astype(np.float32))
    mean, std = _moments(train.features, fit_w)

    lrs = jnp.array([lr for lr, _ in grid], jnp.float32)
    wds = jnp.array([wd for _, wd in grid], jnp.float32)
    d, c = train.features.shape[-1], train.num_classes
    params = {"w": jnp.zeros((len(grid), d, c)), "b": jnp.zeros((len(grid), c))}
    opt_state = _ADAM.init(params)
    epoch_fn = _probe_epoch(mesh, total)
    num_rows = train.features.shape[1]
    for epoch in range(settings.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(fit_rows))
        rows = fit_rows[order[: steps_per_epoch * batch]].reshape(steps_per_epoch, batch)
        params, opt_state = epoch_fn(
            params,
            opt_state,
            train.features,
            train.labels,
            mean,
            std,
            jnp.asarray(rows // num_rows, jnp.int32),
            jnp.asarray(rows % num_rows, jnp.int32),
            lrs,
            wds,
            jnp.int32(epoch * steps_per_epoch),
        )
    test_top1 = (
        head_correct(params, test.features, test.labels, test.mask.astype(jnp.float32), mean, std)
        / test.num_examples
    )
    test_top1 = np.asarray(test_top1)
    if settings.holdout > 0:
        held_top1 = (
            np.asarray(head_correct(params, train.features, train.labels, held_w, mean, std))
            / held.sum()
        )
        best = int(np.argmax(held_top1))
    else:
        held_top1, best = None, 0
    rows = [
        {
            "learning_rate": lr,
            "weight_decay": wd,
            "top1": float(test_top1[h]),
            "holdout_top1": None if held_top1 is None else float(held_top1[h]),
        }
        for h, (lr, wd) in enumerate(grid)
    ]
    return ProbeResult(
        float(test_top1[best]), grid[best][0], grid[best][1], rows[best]["holdout_top1"], rows
    )


@jax.jit
def _moments(features, weights):
    """Weighted mean and standard deviation of the rows, ``[d]`` each."""
    total = jnp.sum(weights)
    mean = jnp.einsum("nb,nbd->d", weights, features) / total
    var = jnp.einsum("nb,nbd->d", weights, jnp.square(features - mean)) / total
    return mean, jnp.sqrt(var) + 1e-6


def gather_rows(mesh: Mesh, values: jax.Array, batch_idx: jax.Array, pos: jax.Array):
    """``values[batch_idx, pos]`` from a ``P(None, "data")`` array, replicated: each device
    reads the rows it holds, one all-reduce sums them (the others contribute zeros)."""

    def local(vals, b_idx, p_idx):
        per_device = vals.shape[1]
        start = jax.lax.axis_index(DATA_AXIS) * per_device
        here = (p_idx >= start) & (p_idx < start + per_device)
        picked = vals[b_idx, jnp.clip(p_idx - start, 0, per_device - 1)]
        here = here.reshape(here.shape + (1,) * (picked.ndim - here.ndim))
        return jax.lax.psum(jnp.where(here, picked, jnp.zeros_like(picked)), DATA_AXIS)

    spec = PartitionSpec(None, DATA_AXIS)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
    )(values, batch_idx, pos)


def head_logits(params, x):
    """Logits of every head ``[H, b, classes]`` for features ``x [b, d]``."""
    return jnp.einsum("bd,hdc->hbc", x, params["w"]) + params["b"][:, None]


def head_loss(params, x, labels):
    """The sum over heads of each head's mean cross-entropy: each head gets its own gradient."""
    logits = head_logits(params, x)
    labels = jnp.broadcast_to(labels, logits.shape[:2])
    return jnp.sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), 1))


_ADAM = optax.scale_by_adam()


@functools.lru_cache(maxsize=8)
def _probe_epoch(mesh: Mesh, total_steps: int):
    with_batch_split = functools.partial(
        jax.lax.with_sharding_constraint, shardings=sharding_lib.batch_sharding(mesh)
    )

    @jax.jit
    def epoch(params, opt_state, features, labels, mean, std, batch_idx, pos, lrs, wds, step0):
        def step(carry, inputs):
            params, opt_state, t = carry
            b_idx, p_idx = inputs
            # The minibatch arrives on every device; each device takes its share of the
            # rows (a slice, no traffic), so the heads' gradients cost 1/N per device and
            # one all-reduce sums them.
            x = with_batch_split((gather_rows(mesh, features, b_idx, p_idx) - mean) / std)
            y = with_batch_split(gather_rows(mesh, labels, b_idx, p_idx))
            grads = jax.grad(head_loss)(params, x, y)
            direction, opt_state = _ADAM.update(grads, opt_state)
            scale = 0.5 * (1 + jnp.cos(jnp.pi * t / total_steps))  # cosine to 0
            # AdamW, one learning rate and weight decay per head (decay on the weights only).
            params = {
                "w": params["w"]
                - (lrs * scale)[:, None, None]
                * (direction["w"] + wds[:, None, None] * params["w"]),
                "b": params["b"] - (lrs * scale)[:, None] * direction["b"],
            }
            return (params, opt_state, t + 1), None

        (params, opt_state, _), _ = jax.lax.scan(step, (params, opt_state, step0), (batch_idx, pos))
        return params, opt_state

    return epoch


@jax.jit
def head_correct(params, features, labels, weights, mean, std):
    """Per head, the weighted count of rows whose argmax is the label: ``[H]``."""

    def body(total, inputs):
        x, y, w = inputs
        pred = jnp.argmax(head_logits(params, (x - mean) / std), axis=-1)
        return total + jnp.sum((pred == y[None]) * w[None], axis=1), None

    total, _ = jax.lax.scan(body, jnp.zeros(params["b"].shape[0]), (features, labels, weights))
    return total
