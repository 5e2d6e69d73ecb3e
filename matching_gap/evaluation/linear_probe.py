"""The ``features`` protocol: linear probes on frozen features, trained on the devices.

:func:`linear_probe` trains a grid of softmax-regression heads at once on the same features,
chooses the grid point on a held-out slice of the training split and reports its top-1 on
the evaluation split. Minibatches are drawn by example index, so the result does not depend
on the number of devices or processes. The heads' functions (:func:`head_logits`,
:func:`head_loss`, :func:`head_correct`) serve the ``augmented`` probe too.
:class:`LinearProbeEvaluator` runs it with the config's ``eval.probe_*`` settings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from matching_gap import metrics
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation.features import (
    DATA_AXIS,
    Features,
    SplitFeatures,
    TooFewExamplesError,
    stacked_sharding,
    to_host,
)
from matching_gap.schema import EvalConfig


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
    mesh = train.mesh
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
    heads = [
        {
            "learning_rate": lr,
            "weight_decay": wd,
            "top1": float(test_top1[h]),
            "holdout_top1": None if held_top1 is None else float(held_top1[h]),
        }
        for h, (lr, wd) in enumerate(grid)
    ]
    return ProbeResult(
        float(test_top1[best]), grid[best][0], grid[best][1], heads[best]["holdout_top1"], heads
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


def probe_settings(config) -> ProbeSettings:
    e = config.eval
    return ProbeSettings(
        e.probe_epochs,
        e.probe_batch_size,
        e.probe_learning_rates,
        e.probe_weight_decays,
        e.probe_holdout,
    )


def configured_probe(fit, report, config) -> ProbeResult | None:
    """The ``features`` probe, or None (said in one line) for a split too small for it."""
    try:
        return linear_probe(fit, report, probe_settings(config), seed=config.seed)
    except TooFewExamplesError as e:
        metrics.log_once(f"Linear probe skipped: {e}.")
        return None


class LinearProbeEvaluator:
    """The ``features`` probe: yields ``linear_probe_top1`` (nothing for a split too small)."""

    def __init__(self, config, features: SplitFeatures):
        self.config, self.features = config, features
        self.summary = None

    def run(self, params):
        result = configured_probe(
            self.features.fit(params), self.features.report(params), self.config
        )
        self.summary = None
        if result is not None:
            s = probe_settings(self.config)
            self.summary = {
                "epochs": s.epochs,
                "batch_size": s.batch_size,
                "holdout": s.holdout,
                **result._asdict(),
            }
            yield "linear_probe_top1", result.top1
