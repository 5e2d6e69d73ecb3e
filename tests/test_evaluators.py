"""The evaluators against independent references: a brute-force NumPy k-NN, scikit-learn's
logistic regression, and the same evaluation on 1 device and on 4."""

import jax
import numpy as np
import pytest

from matching_gap import data
from matching_gap import sharding as sharding_lib
from matching_gap.evaluation import features as features_lib
from matching_gap.evaluation import knn as knn_lib
from matching_gap.evaluation import linear_probe as probe_lib

needs_fashion_mnist = pytest.mark.skipif(
    not __import__("os").path.isdir(data.DEFAULT_FASHION_MNIST_DIR),
    reason="needs the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
)


def meshes():
    return {
        "1 device": sharding_lib.make_mesh(jax.devices()[:1]),
        "4 devices": sharding_lib.make_mesh(jax.devices()[:4]),
    }


def features(x, y, num_classes, mesh, batch_size=64):
    return features_lib.from_numpy(x, y, num_classes, mesh=mesh, batch_size=batch_size)


def brute_force_knn(x, y, xt, yt, k, temperature, num_classes):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = unit(xt.astype(np.float64)) @ unit(x.astype(np.float64)).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(xt), num_classes))
    for i, row in enumerate(top):
        np.add.at(votes[i], y[row], np.exp(sims[i, row] / temperature))
    return float(np.mean(votes.argmax(1) == yt))


def noisy_linear_task(n, n_test, dim, classes, seed, noise=1.0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, classes))
    x = rng.normal(size=(n + n_test, dim)).astype(np.float32)
    y = np.argmax(x @ w + noise * rng.normal(size=(n + n_test, classes)), 1).astype(np.int32)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_equals_a_brute_force_numpy_vote_on_any_number_of_devices(k):
    # 1000 training rows in batches of 64: the last batch is padded, and padding must
    # never be a neighbour.
    x, y, xt, yt = noisy_linear_task(1000, 300, 12, 6, seed=k)
    expected = brute_force_knn(x, y, xt, yt, k, 0.07, 6)
    for name, mesh in meshes().items():
        fit = features(x, y, 6, mesh)
        # Padding rows hold what an encoder makes of a blank image: here, a test point.
        padded = jax.numpy.where(fit.mask[..., None], fit.features, xt[0])
        fit = fit._replace(features=jax.device_put(padded, features_lib.stacked_sharding(mesh)))
        got = knn_lib.knn_accuracy(fit, features(xt, yt, 6, mesh), k=k)
        assert got == pytest.approx(expected, abs=1e-9), name
    # Query chunks smaller than the batch give the same answer.
    mesh = meshes()["4 devices"]
    chunked = knn_lib.knn_accuracy(
        features(x, y, 6, mesh), features(xt, yt, 6, mesh), k=k, query_chunk=24
    )
    assert chunked == pytest.approx(expected, abs=1e-9)


def test_knn_weights_overturn_the_majority():
    # k = 3 neighbours of (1, 0): one of class 0 at cosine 1, two of class 1 at cosine 0.6.
    # A plain majority says class 1; exp(cos / 0.07) weights say class 0 (e^14.3 > 2 e^8.6).
    train = np.array([[1, 0], [0.6, 0.8], [0.6, -0.8], [-1, 0]], np.float32)
    labels = np.array([0, 1, 1, 1], np.int32)
    test = np.array([[1, 0]], np.float32)
    mesh = meshes()["4 devices"]
    fit = features(train, labels, 2, mesh, batch_size=4)
    assert knn_lib.knn_accuracy(fit, features(test, [0], 2, mesh, 4), k=3) == 1.0
    assert brute_force_knn(train, labels, test, np.array([0]), 3, 0.07, 2) == 1.0
    # With a very high temperature the weights are nearly equal and the majority wins.
    flat = knn_lib.knn_accuracy(fit, features(test, [1], 2, mesh, 4), k=3, temperature=1e3)
    assert flat == 1.0


def test_knn_needs_k_points():
    mesh = meshes()["1 device"]
    with pytest.raises(ValueError, match="at least k"):
        knn_lib.knn_accuracy(
            features(np.ones((3, 2)), np.zeros(3), 2, mesh),
            features(np.ones((1, 2)), np.zeros(1), 2, mesh),
            k=5,
        )


def test_linear_probe_learns_a_linear_rule_and_fails_on_noise():
    x, y, xt, yt = noisy_linear_task(2000, 500, 6, 3, seed=0, noise=0.0)
    mesh = meshes()["4 devices"]
    settings = probe_lib.ProbeSettings(epochs=30, batch_size=256)
    result = probe_lib.linear_probe(features(x, y, 3, mesh), features(xt, yt, 3, mesh), settings)
    assert result.top1 > 0.95
    assert len(result.grid) == len(settings.learning_rates) * len(settings.weight_decays)
    best = max(result.grid, key=lambda row: row["holdout_top1"])
    assert (result.learning_rate, result.weight_decay) == (
        best["learning_rate"],
        best["weight_decay"],
    )
    shuffled = np.random.default_rng(0).permutation(yt)
    noise = probe_lib.linear_probe(
        features(x, y, 3, mesh),
        features(xt, shuffled, 3, mesh),
        probe_lib.ProbeSettings(epochs=5, batch_size=256),
    )
    assert noise.top1 < 0.5


def test_linear_probe_gives_the_same_result_on_1_and_4_devices():
    x, y, xt, yt = noisy_linear_task(1500, 400, 10, 5, seed=1)
    settings = probe_lib.ProbeSettings(epochs=10, batch_size=128)
    results = [
        probe_lib.linear_probe(features(x, y, 5, m, 96), features(xt, yt, 5, m, 96), settings)
        for m in meshes().values()
    ]
    (lr1, wd1, top1), (lr4, wd4, top4) = [
        (r.learning_rate, r.weight_decay, r.top1) for r in results
    ]
    assert (lr1, wd1) == (lr4, wd4)
    assert top1 == pytest.approx(top4, abs=1 / 400)
    for a, b in zip(results[0].grid, results[1].grid, strict=True):
        assert a["holdout_top1"] == pytest.approx(b["holdout_top1"], abs=2 / 75)


def test_the_held_out_slice_is_a_fixed_fraction_of_the_split():
    ids = np.arange(100_000, dtype=np.int32)
    held = probe_lib.holdout_mask(ids, 0.05)
    assert 0.045 < held.mean() < 0.055
    # Pseudo-random, not a block: both halves of the split contribute.
    assert 0.04 < held[:50_000].mean() < 0.06 and 0.04 < held[50_000:].mean() < 0.06
    # The same rule on the devices and on the host; padding is never held out.
    on_device = probe_lib.holdout_mask(jax.numpy.asarray(np.append(ids, -1)), 0.05)
    np.testing.assert_array_equal(np.asarray(on_device), np.append(held, False))


@needs_fashion_mnist
def test_linear_probe_is_within_half_a_point_of_scikit_learn():
    """On real images (Fashion-MNIST pixels, 14 x 14, 6000 / 2000), the probe's top-1 is
    within 0.5 points of scikit-learn's L2-regularised logistic regression (lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cfg = data.DataConfig(source="fashion_mnist_idx", image_size=28, channels=1)

    def pixels(split, n):
        ds = data.load_split(cfg, split, n)
        small = ds.images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
        return small.reshape(len(ds), -1).astype(np.float32) / 255.0, ds.labels

    x, y = pixels("train", 6000)
    xt, yt = pixels("test", 2000)
    scaler = StandardScaler().fit(x)
    reference = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y)
    expected = reference.score(scaler.transform(xt), yt)
    mesh = meshes()["4 devices"]
    got = probe_lib.linear_probe(
        features(x, y, 10, mesh, 512),
        features(xt, yt, 10, mesh, 512),
        probe_lib.ProbeSettings(epochs=100, batch_size=512),
    )
    assert abs(got.top1 - expected) <= 0.005, (got.top1, expected)


def test_extraction_writes_each_batch_in_order_and_masks_padding():
    mesh = meshes()["4 devices"]
    rng = np.random.default_rng(0)
    dataset = data.Dataset(
        rng.integers(0, 255, (70, 4, 4, 1), dtype=np.uint8),
        rng.integers(0, 3, 70).astype(np.int32),
        3,
        "toy",
    )
    cfg = data.DataConfig(source="fashion_mnist_idx", image_size=4, channels=1)
    split = data.eval_split(cfg, "test", batch_size=32, dataset=dataset)
    encode = jax.jit(
        lambda images: images.reshape(images.shape[0], -1).astype(np.float32),
        out_shardings=sharding_lib.batch_sharding(mesh),
    )
    got = features_lib.extract(
        encode, split.batches(), num_batches=split.num_batches, num_classes=3, mesh=mesh
    )
    assert got.features.shape == (3, 32, 16) and got.num_examples == 70
    assert got.features.sharding.spec == features_lib.stacked_sharding(mesh).spec
    mask = np.asarray(got.mask).reshape(-1)
    np.testing.assert_array_equal(
        np.asarray(got.features).reshape(-1, 16)[mask], dataset.images.reshape(70, -1)
    )
    np.testing.assert_array_equal(np.asarray(got.labels).reshape(-1)[mask], dataset.labels)
    np.testing.assert_array_equal(np.asarray(got.ids).reshape(-1)[mask], np.arange(70))
    assert np.all(np.asarray(got.ids).reshape(-1)[~mask] == -1)


def test_extraction_of_no_batches_is_refused():
    mesh = meshes()["1 device"]
    with pytest.raises(ValueError, match=r"no batches to encode \(num_batches=0\)"):
        features_lib.extract(lambda x: x, iter([]), num_batches=0, num_classes=2, mesh=mesh)


def test_features_not_sharded_over_a_mesh_are_refused_by_each_evaluator():
    """Features built by hand on one device (not with extract or from_numpy) have no mesh."""
    rows = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    jnp = jax.numpy
    single = features_lib.Features(
        jnp.asarray(rows),
        jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), bool),
        jnp.arange(4)[None],
        2,
    )
    with pytest.raises(TypeError, match="must be sharded over a mesh"):
        knn_lib.knn_accuracy(single, single, k=1)
    with pytest.raises(TypeError, match="must be sharded over a mesh"):
        probe_lib.linear_probe(single, single)


@pytest.mark.parametrize("n,processes", [(70, 3), (5, 4), (64, 2)])
def test_eval_split_shares_cover_the_split_once_with_equal_batch_counts(n, processes):
    rng = np.random.default_rng(n)
    dataset = data.Dataset(
        rng.integers(0, 255, (n, 4, 4, 1), dtype=np.uint8),
        rng.integers(0, 3, n).astype(np.int32),
        3,
        "toy",
    )
    cfg = data.DataConfig(source="fashion_mnist_idx", image_size=4, channels=1)
    seen, counts = [], set()
    for p in range(processes):
        split = data.eval_split(
            cfg,
            "test",
            batch_size=8 * processes,
            dataset=dataset,
            process_index=p,
            process_count=processes,
        )
        batches = list(split.batches())
        counts.add(len(batches))
        assert len(batches) == split.num_batches
        for b in batches:
            assert b["image"].shape == (8, 4, 4, 1)
            seen.extend(b["id"][b["mask"]])
            np.testing.assert_array_equal(b["label"][b["mask"]], dataset.labels[b["id"][b["mask"]]])
    assert len(counts) == 1
    assert sorted(seen) == list(range(n))
