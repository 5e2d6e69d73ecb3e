"""The ``knn`` protocol: DINO's weighted k-NN on frozen features (Wu et al., 2018).

:func:`knn_accuracy` takes a partial top-k on each device's block of training features and
merges the candidates: memory per device ``query_chunk x (rows per device)``.
:class:`KnnEvaluator` runs it with the config's ``eval.knn_*`` settings.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from matching_gap import metrics
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation.features import DATA_AXIS, Features, SplitFeatures, TooFewExamplesError
from matching_gap.losses import l2_normalize

# Queries scored at once by the k-NN: similarities [QUERY_CHUNK, rows per device] per device.
QUERY_CHUNK = 256


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
    mesh = train.mesh
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


def configured_knn(fit, report, config) -> tuple[float, int]:
    """``(top-1, k)``: the weighted k-NN with ``eval.knn_k`` neighbours, or every training
    example when there are fewer (said in one line)."""
    e = config.eval
    k = min(e.knn_k, fit.num_examples)
    if k < e.knn_k:
        metrics.log_once(
            f"k-NN: {fit.num_examples} training examples, fewer than eval.knn_k = "
            f"{e.knn_k}; voting with all {k}."
        )
    return knn_accuracy(fit, report, k=k, temperature=e.knn_temperature), k


class KnnEvaluator:
    """The weighted k-NN of ``eval.knn_k`` neighbours on ``eval.knn_features`` (by default
    the probes' ``eval.features``): yields ``knn_top1``."""

    def __init__(self, config, features: SplitFeatures):
        self.config, self.features = config, features
        self.summary = None  # the last run's settings and figures (evaluation.json)

    def run(self, params):
        kind = self.config.eval.knn_feature_name()
        fit, report = self.features.features(params, kind)
        top1, k = configured_knn(fit, report, self.config)
        self.summary = {
            "features": kind,
            "k": k,
            "temperature": self.config.eval.knn_temperature,
            "top1": top1,
        }
        yield "knn_top1", top1
