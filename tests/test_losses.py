"""Tests of matching_gap.losses against independent references.

References: exact assignment (scipy), central finite differences in float64, OTT's own
implicit differentiation, hand-computed values, and second formulas for the same quantity.
"""

import doctest
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ott.geometry import costs, geometry, pointcloud
from ott.problems.linear import linear_problem
from ott.solvers import linear
from ott.solvers.linear import implicit_differentiation, sinkhorn
from scipy.optimize import linear_sum_assignment

from matching_gap import losses

TIGHT = {"threshold": 1e-10, "max_iterations": 20000}


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _views(seed, n=12, d=6, k=2, noise=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d))
    # Scaled so that squared distances are O(1), the regime of normalised embeddings.
    views = np.stack([base + noise * rng.normal(size=(n, d)) for _ in range(k)]) / np.sqrt(d)
    return views.astype(dtype)


def _central_differences(f, x, h=1e-5):
    f = jax.jit(f)
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        grad[idx] = (float(f(x + e)) - float(f(x - e))) / (2 * h)
    return grad


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("group_size", [None, 4])
def test_matching_gap_is_non_negative(cost, group_size):
    # One compilation per normalisation: epsilon is traced.
    @functools.partial(jax.jit, static_argnames="normalize")
    def gap(x, y, epsilon, normalize):
        kw = dict(cost=cost, group_size=group_size, normalize=normalize)
        return losses.matching_gap(x, y, epsilon=epsilon, **kw)

    for epsilon in (0.05, 0.5, 5.0):
        for seed in range(3):
            x, y = _views(seed)
            value, aux = gap(x, y, epsilon, normalize=seed == 1)
            assert np.isfinite(value)
            assert value >= -1e-5, (epsilon, seed, value, aux)


def test_matching_gap_of_identical_separated_views_is_zero():
    # Points 3 apart on the axes: the identity is by far the best matching.
    x = 3.0 * np.eye(8, dtype=np.float32)
    value, aux = losses.matching_gap(x, x, epsilon=0.05)
    assert abs(float(value)) < 1e-5
    assert float(aux["paired_cost"]) == 0.0
    # Permuting y breaks the pairs: the gap is then the paired cost (18 for each mismatch).
    value_shuffled, _ = losses.matching_gap(x, np.roll(x, 1, axis=0), epsilon=0.05)
    assert float(value_shuffled) > 17.0


def test_ot_cost_tends_to_exact_assignment_as_epsilon_goes_to_zero(x64):
    x, y = _views(0, n=10, noise=0.5, dtype=np.float64)
    c = np.asarray(losses.cost_matrix(jnp.asarray(x), jnp.asarray(y)), np.float64)
    rows, cols = linear_sum_assignment(c)
    exact = c[rows, cols].mean()
    n = c.shape[0]
    errors = []
    for eps in [1.0, 0.3, 0.1, 0.03]:
        value, aux = losses.matching_gap(
            x, y, epsilon=eps, sinkhorn_options={"threshold": 1e-5, "max_iterations": 50000}
        )
        assert bool(aux["converged"])
        err = abs(float(aux["ot_cost"]) - exact)
        # Entropic OT lies within [exact - 2 eps log n, exact - eps log n].
        assert err <= 2 * eps * math.log(n) + 1e-3
        errors.append(err)
        np.testing.assert_allclose(
            float(value),
            float(aux["paired_cost"]) - eps * math.log(n) - float(aux["ot_cost"]),
            rtol=1e-6,
        )
    assert errors == sorted(errors, reverse=True)
    # And the gap itself tends to mean paired cost minus mean optimal assignment cost.
    assert abs(float(value) - (np.trace(c) / n - exact)) < 3 * 0.03 * math.log(n)


def test_value_matches_ott_primal_and_dual_forms(x64):
    x, y = _views(3, n=9, dtype=np.float64)
    eps = 0.7
    value, aux = losses.matching_gap(x, y, epsilon=eps, sinkhorn_options=TIGHT)
    c = losses.cost_matrix(jnp.asarray(x), jnp.asarray(y))
    geom = geometry.Geometry(cost_matrix=c, epsilon=eps)
    out = sinkhorn.Sinkhorn(**TIGHT)(linear_problem.LinearProblem(geom))
    n = x.shape[0]
    paired = np.trace(np.asarray(c)) / n
    # OTT's KL form: <J, C> + eps log n - reg_ot_cost.
    np.testing.assert_allclose(value, paired + eps * math.log(n) - out.reg_ot_cost, rtol=1e-8)
    # Primal form with the materialised plan: <J,C> - eps log n - (<P,C> - eps H(P)).
    plan = np.asarray(out.matrix, np.float64)
    entropy = -np.sum(np.where(plan > 0, plan * np.log(np.where(plan > 0, plan, 1.0)), 0.0))
    primal = np.sum(plan * np.asarray(c)) - eps * entropy
    np.testing.assert_allclose(value, paired - eps * math.log(n) - primal, rtol=1e-7)


def _ott_monge_gap(x, y, eps):
    """The body of OTT's ``ott.neural.methods.monge_gap.monge_gap_from_samples`` (importing
    ``ott.neural`` needs diffrax): the mean paired cost minus Sinkhorn's ``ent_reg_cost``,
    all computed by OTT (its point cloud, its cost function, its solver)."""
    cost_fn = costs.SqEuclidean()
    geom = pointcloud.PointCloud(x, y, cost_fn=cost_fn, epsilon=eps)
    paired = jnp.mean(jax.vmap(cost_fn)(x, y))
    return paired - linear.solve(geom, **TIGHT).ent_reg_cost


def test_value_and_gradient_match_otts_monge_gap_formula(x64):
    # OTT takes the entropy relative to the product of the marginals: its gap is this
    # project's plus epsilon * log n; the gradients are the same.
    x, y = _views(21, n=10, d=5, dtype=np.float64)
    eps, n = 0.3, x.shape[0]
    ours = lambda x, y: losses.matching_gap(x, y, epsilon=eps, sinkhorn_options=TIGHT)[0]
    theirs = lambda x, y: _ott_monge_gap(x, y, eps)
    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(x, y)
    reference, reference_grads = jax.value_and_grad(theirs, argnums=(0, 1))(x, y)
    assert abs(float(reference) - float(value) - eps * math.log(n)) < 1e-9
    for g, r in zip(grads, reference_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-9)


def test_invariant_to_joint_permutation_of_pairs():
    x, y = _views(1, n=16)
    perm = np.random.default_rng(0).permutation(16)
    v1, _ = losses.matching_gap(x, y, epsilon=0.3, sinkhorn_options={"threshold": 1e-6})
    v2, _ = losses.matching_gap(x[perm], y[perm], epsilon=0.3, sinkhorn_options={"threshold": 1e-6})
    np.testing.assert_allclose(v1, v2, rtol=1e-5)


def test_symmetric_in_x_and_y():
    x, y = _views(2)
    v1, _ = losses.matching_gap(x, y, epsilon=0.3, sinkhorn_options={"threshold": 1e-6})
    v2, _ = losses.matching_gap(y, x, epsilon=0.3, sinkhorn_options={"threshold": 1e-6})
    np.testing.assert_allclose(v1, v2, rtol=1e-5)


@pytest.mark.slow
def test_jit_equals_eager():
    x, y = _views(4)
    fn = lambda x, y: losses.matching_gap(x, y, epsilon=0.2, normalize=True, group_size=6)
    (v1, a1), (v2, a2) = fn(x, y), jax.jit(fn)(x, y)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    g1 = jax.grad(lambda x: fn(x, y)[0])(x)
    g2 = jax.jit(jax.grad(lambda x: fn(x, y)[0]))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)
    assert int(a1["sinkhorn_iterations"]) == int(a2["sinkhorn_iterations"])


@pytest.mark.slow
def test_bfloat16_inputs_are_computed_in_float32():
    x, y = _views(5, n=32, d=16)
    x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    v16, aux = losses.matching_gap(x16, y16, epsilon=0.5, normalize=True)
    assert v16.dtype == jnp.float32 and aux["ot_cost"].dtype == jnp.float32
    # Same inputs after rounding to bf16: the only difference is the input rounding.
    v32, _ = losses.matching_gap(
        np.asarray(x16, np.float32), np.asarray(y16, np.float32), epsilon=0.5, normalize=True
    )
    np.testing.assert_allclose(v16, v32, rtol=1e-5)
    vref, _ = losses.matching_gap(x, y, epsilon=0.5, normalize=True)
    np.testing.assert_allclose(v16, vref, rtol=2e-2)
    g = jax.grad(lambda x: losses.matching_gap(x, y16, epsilon=0.5, normalize=True)[0])(x16)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_relative_epsilon_uses_stop_gradient_statistic():
    x, y = _views(6)
    c = np.asarray(losses.cost_matrix(jnp.asarray(x), jnp.asarray(y)))
    _, aux = losses.matching_gap(x, y, epsilon=0.1, relative_epsilon="mean")
    np.testing.assert_allclose(aux["epsilon"], 0.1 * c.mean(), rtol=1e-6)
    v_rel, _ = losses.matching_gap(x, y, epsilon=0.1, relative_epsilon="std")
    v_abs, _ = losses.matching_gap(x, y, epsilon=0.1 * float(c.std()))
    np.testing.assert_allclose(v_rel, v_abs, rtol=1e-5)


# -------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "cost,normalize", [("sqeuclidean", False), ("cosine", False), ("sqeuclidean", True)]
)
def test_gradient_matches_finite_differences_in_float64(x64, cost, normalize):
    x, y = _views(7, n=6, d=3, dtype=np.float64)
    f = lambda x: losses.matching_gap(
        x, y, epsilon=0.4, cost=cost, normalize=normalize, sinkhorn_options=TIGHT
    )[0]
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, _central_differences(f, x), rtol=1e-5, atol=1e-7)


def test_gradient_is_j_minus_plan_pushed_through_the_cost(x64):
    x, y = _views(8, n=7, d=4, dtype=np.float64)
    eps = 0.5
    ours = jax.grad(lambda x: losses.matching_gap(x, y, epsilon=eps, sinkhorn_options=TIGHT)[0])(
        jnp.asarray(x)
    )
    c, cost_vjp = jax.vjp(lambda x: losses.cost_matrix(x, jnp.asarray(y)), jnp.asarray(x))
    out = sinkhorn.Sinkhorn(threshold=1e-12, max_iterations=20000)(
        linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=eps))
    )
    (expected,) = cost_vjp(jnp.eye(7) / 7 - out.matrix)
    np.testing.assert_allclose(ours, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.slow
def test_gradient_matches_ott_implicit_differentiation(x64):
    x, y = _views(9, n=8, d=4, dtype=np.float64)
    eps = 0.5

    def implicit_gap(x):
        c = losses.cost_matrix(x, jnp.asarray(y))
        solver = sinkhorn.Sinkhorn(
            threshold=1e-10,
            max_iterations=20000,
            use_danskin=False,
            implicit_diff=implicit_differentiation.ImplicitDiff(),
        )
        out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=eps)))
        return jnp.trace(c) / 8 + eps * math.log(8) - out.reg_ot_cost

    ours = jax.grad(lambda x: losses.matching_gap(x, y, epsilon=eps, sinkhorn_options=TIGHT)[0])(
        jnp.asarray(x)
    )
    reference = jax.grad(implicit_gap)(jnp.asarray(x))
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- groups


def test_grouped_loss_is_mean_of_per_group_losses():
    x, y = _views(10, n=12)
    value, aux = losses.matching_gap(x, y, epsilon=0.3, group_size=4)
    per_group = [losses.matching_gap(x[i : i + 4], y[i : i + 4], epsilon=0.3) for i in (0, 4, 8)]
    np.testing.assert_allclose(value, np.mean([v for v, _ in per_group]), rtol=1e-5)
    np.testing.assert_allclose(
        aux["paired_cost"], np.mean([a["paired_cost"] for _, a in per_group]), rtol=1e-5
    )
    assert int(aux["sinkhorn_iterations"]) == max(
        int(a["sinkhorn_iterations"]) for _, a in per_group
    )
    grad = jax.grad(lambda x: losses.matching_gap(x, y, epsilon=0.3, group_size=4)[0])(x)
    grad0 = jax.grad(lambda x: losses.matching_gap(x, y[:4], epsilon=0.3)[0])(x[:4])
    np.testing.assert_allclose(grad[:4], grad0 / 3, rtol=1e-4, atol=1e-7)


def test_group_size_n_equals_global():
    x, y = _views(11, n=12)
    v1, _ = losses.matching_gap(x, y, epsilon=0.3)
    v2, _ = losses.matching_gap(x, y, epsilon=0.3, group_size=12)
    assert float(v1) == float(v2)


# ------------------------------------------------------------------------------- M3G


def test_m3g_with_two_views_equals_matching_gap_with_quarter_cost():
    x, y = _views(12, n=10)
    opts = {"threshold": 1e-6}
    m3g, aux_m = losses.multi_marginal_matching_gap(
        np.stack([x, y]), epsilon=0.2, normalize=True, sinkhorn_options=opts
    )
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    # ||x/2 - y/2||^2 = ||x - y||^2 / 4.
    mg, aux = losses.matching_gap(xn / 2, yn / 2, epsilon=0.2, sinkhorn_options=opts)
    np.testing.assert_allclose(m3g, mg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux_m["paired_cost"], aux["paired_cost"], rtol=1e-5)


def test_m3g_cost_is_circular_variance():
    views = _views(13, n=4, k=3)
    vn = views / np.linalg.norm(views, axis=-1, keepdims=True)
    _, aux = losses.multi_marginal_matching_gap(views, epsilon=0.2)
    circular_variance = 1.0 - np.sum(vn.mean(axis=0) ** 2, axis=-1)
    np.testing.assert_allclose(aux["paired_cost"], circular_variance.mean(), rtol=1e-5)


@pytest.mark.parametrize("k", [3, 4])
def test_m3g_is_non_negative_and_zero_for_identical_separated_views(k):
    views = _views(14, n=6, k=k, noise=1.0)
    value, _ = losses.multi_marginal_matching_gap(views, epsilon=0.2)
    assert value >= -1e-6
    same = np.stack([np.eye(6, dtype=np.float32)] * k)
    value, _ = losses.multi_marginal_matching_gap(same, epsilon=0.02)
    assert abs(float(value)) < 1e-5


@pytest.mark.slow
def test_m3g_gradient_matches_finite_differences_in_float64(x64):
    views = _views(15, n=4, d=3, k=3, dtype=np.float64)
    opts = {"threshold": 1e-11, "max_iterations": 20000}
    f = lambda v: losses.multi_marginal_matching_gap(v, epsilon=0.1, sinkhorn_options=opts)[0]
    grad = np.asarray(jax.grad(f)(jnp.asarray(views)))
    np.testing.assert_allclose(grad, _central_differences(f, views), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_m3g_grouped_is_mean_of_groups():
    views = _views(16, n=8, k=3)
    value, _ = losses.multi_marginal_matching_gap(views, epsilon=0.2, group_size=4)
    parts = [
        losses.multi_marginal_matching_gap(views[:, i : i + 4], epsilon=0.2)[0] for i in (0, 4)
    ]
    np.testing.assert_allclose(value, np.mean(parts), rtol=1e-5)


# ------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("epsilon", [0.05, 0.2, 0.8, 2.0])
@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_matching_gap_scale_is_the_loss_at_collapse_and_at_perfect_pairs(epsilon, cost):
    # A second computation of the same two values: the loss itself, solved by Sinkhorn,
    # on n one-hot vectors paired with themselves (the floor) and on one point (collapse).
    n = 16
    scale = losses.matching_gap_scale(epsilon, n, cost=cost)
    perfect = jnp.eye(n)
    floor, _ = losses.matching_gap(
        perfect, perfect, epsilon=epsilon, cost=cost, sinkhorn_options=TIGHT
    )
    same = jnp.ones((n, 3))
    collapse, _ = losses.matching_gap(same, same, epsilon=epsilon, cost=cost, normalize=True)
    np.testing.assert_allclose(scale["floor"], float(floor), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scale["collapse"], float(collapse), rtol=1e-5)
    plan = losses.transport_plan(
        perfect, perfect, epsilon=epsilon, cost=cost, sinkhorn_options=TIGHT
    )
    np.testing.assert_allclose(scale["diagonal_mass"], float(jnp.trace(plan)), rtol=1e-4)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_m3g_scale_is_the_loss_at_collapse_and_at_perfect_tuples(k):
    n, epsilon = 6, 0.3
    scale = losses.matching_gap_scale(epsilon, n, num_views=k, cost="variance")
    perfect = jnp.stack([jnp.eye(n)] * k)
    floor, _ = losses.multi_marginal_matching_gap(perfect, epsilon=epsilon, sinkhorn_options=TIGHT)
    collapse, _ = losses.multi_marginal_matching_gap(jnp.ones((k, n, 3)), epsilon=epsilon)
    np.testing.assert_allclose(scale["floor"], float(floor), rtol=1e-4)
    np.testing.assert_allclose(scale["collapse"], float(collapse), rtol=1e-5)


def test_matching_gap_scale_at_the_recipes_epsilon_is_far_above_zero():
    # The recipe: unit vectors, epsilon 0.8, OT groups of 64 pairs.
    scale = losses.matching_gap_scale(0.8, 64)
    assert scale["collapse"] == pytest.approx(0.8 * math.log(64))
    assert scale["floor"] == pytest.approx(0.8 * math.log(1 + 63 * math.exp(-2 / 0.8)))
    assert scale["floor"] == pytest.approx(1.456, abs=1e-3)
    assert scale["diagonal_mass"] == pytest.approx(0.162, abs=1e-3)
    assert losses.matching_gap_scale(0.05, 64)["floor"] < 1e-12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0, "n": 8}, "epsilon"),
        ({"epsilon": 0.1, "n": 1}, "n and num_views"),
        ({"epsilon": 0.1, "n": 8, "cost": "l1"}, "Unknown cost"),
        ({"epsilon": 0.1, "n": 8, "num_views": 3}, "variance"),
    ],
)
def test_matching_gap_scale_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.matching_gap_scale(**kwargs)


def test_info_nce_hand_computed():
    # z = {e1, e2, e1, e2} with tau = 1: each anchor sees its positive at similarity 1 and
    # two negatives at 0, so the loss is -log(e / (e + 2)) = log(1 + 2/e).
    x = np.eye(2, dtype=np.float32)
    value, aux = losses.info_nce(x, x, temperature=1.0)
    np.testing.assert_allclose(value, math.log(1 + 2 / math.e), rtol=1e-6)
    assert float(aux["accuracy"]) == 1.0


def test_info_nce_matches_explicit_loops():
    x, y = _views(17, n=5, d=3)
    tau = 0.3
    z = np.concatenate([x, y]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for a in range(10):
        pos = (a + 5) % 10
        denom = sum(math.exp(z[a] @ z[b] / tau) for b in range(10) if b != a)
        total += -math.log(math.exp(z[a] @ z[pos] / tau) / denom)
    value, _ = losses.info_nce(x, y, temperature=tau)
    np.testing.assert_allclose(value, total / 10, rtol=1e-5)


def test_multiview_info_nce_modes():
    views = _views(18, n=6, k=3)
    pair, _ = losses.multiview_info_nce(views, temperature=0.2)
    expected = np.mean(
        [
            losses.info_nce(views[a], views[b], temperature=0.2)[0]
            for a, b in [(0, 1), (0, 2), (1, 2)]
        ]
    )
    np.testing.assert_allclose(pair, expected, rtol=1e-6)
    rest, _ = losses.multiview_info_nce(views, temperature=0.2, mode="one_vs_rest")
    vn = views / np.linalg.norm(views, axis=-1, keepdims=True)
    expected = np.mean(
        [losses.info_nce(views[a], (vn.sum(0) - vn[a]) / 2, temperature=0.2)[0] for a in range(3)]
    )
    np.testing.assert_allclose(rest, expected, rtol=1e-6)
    two = views[:2]
    for mode in losses.MULTIVIEW_MODES:
        np.testing.assert_allclose(
            losses.multiview_info_nce(two, mode=mode)[0],
            losses.info_nce(two[0], two[1])[0],
            rtol=1e-6,
        )


def test_byol_loss_hand_computed_and_stop_gradient():
    p = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    t = np.array([[0.0, 3.0], [0.0, 1.0]], np.float32)
    value, aux = losses.byol_loss(p, t)
    # cosines 0 and 1: (2 - 0 + 2 - 2) / 2 = 1.
    np.testing.assert_allclose(value, 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["cosine"], 0.5, rtol=1e-6)
    grad_t = jax.grad(lambda t: losses.byol_loss(p, t)[0])(t)
    assert np.all(np.asarray(grad_t) == 0)


def test_multiview_byol_modes():
    p, t = _views(19, n=4, k=3), _views(20, n=4, k=3)
    pair, _ = losses.multiview_byol(p, t)
    expected = np.mean(
        [losses.byol_loss(p[a], t[b])[0] for a in range(3) for b in range(3) if a != b]
    )
    np.testing.assert_allclose(pair, expected, rtol=1e-6)
    rest, _ = losses.multiview_byol(p, t, mode="one_vs_rest")
    tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
    expected = np.mean([losses.byol_loss(p[a], (tn.sum(0) - tn[a]) / 2)[0] for a in range(3)])
    np.testing.assert_allclose(rest, expected, rtol=1e-6)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: losses.matching_gap(np.ones((4, 3)), np.ones((5, 3)), epsilon=0.1), "same shape"),
        (lambda: losses.matching_gap(np.ones((4,)), np.ones((4,)), epsilon=0.1), r"\[n, d\]"),
        (lambda: losses.matching_gap(np.ones((1, 3)), np.ones((1, 3)), epsilon=0.1), "n = 2"),
        (
            lambda: losses.matching_gap(np.ones((4, 3)), np.ones((4, 3)), epsilon=0.0),
            "epsilon must be > 0",
        ),
        (
            lambda: losses.matching_gap(np.ones((4, 3)), np.ones((4, 3)), epsilon=-1.0),
            "epsilon must be > 0",
        ),
        (
            lambda: losses.matching_gap(np.ones((4, 3)), np.ones((4, 3)), epsilon=0.1, cost="l1"),
            "Unknown cost",
        ),
        (
            lambda: losses.matching_gap(
                np.ones((4, 3)), np.ones((4, 3)), epsilon=0.1, relative_epsilon="max"
            ),
            "relative_epsilon",
        ),
        (
            lambda: losses.matching_gap(
                np.ones((6, 3)), np.ones((6, 3)), epsilon=0.1, group_size=4
            ),
            "group_size",
        ),
        (lambda: losses.multi_marginal_matching_gap(np.ones((1, 4, 3)), epsilon=0.1), "k >= 2"),
        (lambda: losses.multi_marginal_matching_gap(np.ones((3, 1, 3)), epsilon=0.1), "n >= 2"),
        (lambda: losses.multi_marginal_matching_gap(np.ones((4, 3)), epsilon=0.1), r"\[k, n, d\]"),
        (
            lambda: losses.multi_marginal_matching_gap(np.ones((2, 4, 3)), epsilon=0.0),
            "epsilon must be > 0",
        ),
        (
            lambda: losses.multi_marginal_matching_gap(
                np.ones((2, 4, 3)), epsilon=0.1, sinkhorn_options={"lse_mode": True}
            ),
            "Unknown multi-marginal",
        ),
        (lambda: losses.info_nce(np.ones((4, 3)), np.ones((4, 2))), "same shape"),
        (lambda: losses.info_nce(np.ones((4, 3)), np.ones((4, 3)), temperature=0.0), "temperature"),
        (lambda: losses.multiview_info_nce(np.ones((2, 4, 3)), mode="all"), "unknown mode"),
        (lambda: losses.multiview_byol(np.ones((1, 4, 3)), np.ones((1, 4, 3))), "k >= 2"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("group_size", [None, 4])
def test_non_finite_inputs_give_non_finite_value(bad, group_size):
    x, y = _views(21, n=8)
    x[3, 1] = bad
    value, _ = losses.matching_gap(x, y, epsilon=0.3, group_size=group_size)
    assert not np.isfinite(value)
    value, _ = jax.jit(lambda x: losses.matching_gap(x, y, epsilon=0.3, normalize=True))(x)
    assert not np.isfinite(value)
    views = np.stack([x, y, y])
    value, _ = losses.multi_marginal_matching_gap(views, epsilon=0.3, group_size=group_size)
    assert not np.isfinite(value)
    assert not np.isfinite(losses.info_nce(x, y)[0])


def test_docstring_examples():
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
