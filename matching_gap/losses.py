"""Self-supervised losses: the matching gap (two views), M3G (k views) and baselines.

Every loss is a pure, jittable function returning ``(value, aux)`` so that it drops into
``jax.value_and_grad(loss_fn, has_aux=True)``. Inputs of any floating dtype are computed in
float32 (or float64 when x64 is enabled); ``value`` is a scalar.

The optimal-transport losses follow Danskin's theorem: Sinkhorn runs on stop-gradient
inputs, its potentials are frozen, and the entropic OT term is the dual objective evaluated
at those potentials and the *live* cost. Its gradient with respect to the cost is the frozen
plan, so ``d(matching gap)/dC = J - P*``; no gradient flows through the Sinkhorn iterations
and no implicit-differentiation linear system is solved.

References:
  * "Self-Supervised Learning with the Matching Gap", ICLR 2024 submission (OpenReview
    P50qJuu4IY).
  * Piran et al., "Contrasting Multiple Representations with the Multi-Marginal Matching
    Gap" (M3G), ICML 2024, arXiv:2405.19532.
  * Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
    (SimCLR / NT-Xent), 2020; Grill et al., "Bootstrap Your Own Latent" (BYOL), 2020.
  * Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), 2021,
    and its code (github.com/facebookresearch/dino, ``main_dino.py``: ``DINOLoss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from ott.experimental import mmsinkhorn
from ott.geometry import costs, geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from matching_gap.schema import COSTS, MULTIVIEW_MODES

__all__ = [
    "COSTS",
    "DEFAULT_SINKHORN_OPTIONS",
    "byol_loss",
    "cost_matrix",
    "dino_loss",
    "dino_teacher_temperature",
    "info_nce",
    "l2_normalize",
    "matching_gap",
    "matching_gap_scale",
    "multi_marginal_matching_gap",
    "multiview_byol",
    "multiview_info_nce",
    "reduce_aux",
    "transport_plan",
]

RELATIVE_EPSILON = (None, "mean", "std")

# Options forwarded to `ott.solvers.linear.sinkhorn.Sinkhorn` (or, for M3G, to
# `ott.experimental.mmsinkhorn.MMSinkhorn`). The threshold is the L1 marginal error.
DEFAULT_SINKHORN_OPTIONS: Mapping[str, Any] = {
    "threshold": 1e-3,
    "max_iterations": 2000,
    "inner_iterations": 10,
}
_MM_SINKHORN_KEYS = ("threshold", "max_iterations", "inner_iterations", "min_iterations")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float32, or float64 if an input already is (only possible with x64 enabled)."""
    return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` along the last axis (the package's one L2 normalisation).

    The floor keeps the gradient finite at x = 0 without changing any unit-scale input."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _check_pair(x: jax.Array, y: jax.Array, name: str) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"{name}: expected x and y of shape [n, d], got {x.shape} and {y.shape}.")
    if x.shape != y.shape:
        raise ValueError(
            f"{name}: x and y must have the same shape [n, d] (y[i] is the positive of "
            f"x[i]), got {x.shape} and {y.shape}."
        )
    if x.shape[0] < 2:
        raise ValueError(f"{name}: needs at least n = 2 pairs, got n = {x.shape[0]}.")


def _check_epsilon(epsilon: float, relative_epsilon: str | None) -> None:
    if isinstance(epsilon, int | float) and not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}.")
    if relative_epsilon not in RELATIVE_EPSILON:
        raise ValueError(
            f"relative_epsilon must be one of {RELATIVE_EPSILON}, got {relative_epsilon!r}."
        )


def _sinkhorn_options(options: Mapping[str, Any] | None, allowed: tuple[str, ...] | None):
    merged = dict(DEFAULT_SINKHORN_OPTIONS)
    merged.update(options or {})
    if allowed is not None:
        unknown = sorted(set(merged) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown multi-marginal Sinkhorn option(s) {unknown}; valid: {list(allowed)}."
            )
    return merged


def _resolve_epsilon(epsilon, relative_epsilon, cost: jax.Array) -> jax.Array:
    """Absolute epsilon, or epsilon times a stop-gradient statistic of the cost."""
    eps = jnp.asarray(epsilon, cost.dtype)
    if relative_epsilon == "mean":
        eps = eps * jax.lax.stop_gradient(jnp.mean(cost))
    elif relative_epsilon == "std":
        eps = eps * jax.lax.stop_gradient(jnp.std(cost))
    return eps


def _grouped(
    fn: Callable[..., tuple[jax.Array, dict]], views: jax.Array, group_size: int | None
) -> tuple[jax.Array, dict]:
    """Applies ``fn(views[:, group])`` to each group of ``group_size`` consecutive pairs.

    ``views``: [k, n, d]. Groups are vmapped (one batched problem, not a Python loop).
    The value is the mean over groups; aux entries are summarised by :func:`reduce_aux`.
    """
    n = views.shape[1]
    if group_size is None or group_size == n:
        return fn(views)
    if group_size < 2 or n % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the batch size n = {n}, got {group_size}."
        )
    num_groups = n // group_size
    grouped = views.reshape(views.shape[0], num_groups, group_size, views.shape[2])
    values, aux = jax.vmap(fn, in_axes=1)(grouped)
    return jnp.mean(values), reduce_aux(aux)


# How an aux entry summarises many problems (``reduce_aux``, and across devices in
# ``sharding.per_device_groups``): the worst case for the solver's health, else the mean.
AUX_REDUCTIONS: Mapping[str, str] = {
    "converged": "all",
    "sinkhorn_iterations": "max",
    "marginal_error": "max",
}


def reduce_aux(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Summarises the ``aux`` of a batch of problems (a leading axis on every entry).

    ``converged`` is the AND, ``sinkhorn_iterations`` and ``marginal_error`` the maxima,
    everything else the mean (:data:`AUX_REDUCTIONS`).
    """
    reduce: dict[str, Callable[[jax.Array], jax.Array]] = {
        "all": jnp.all,
        "max": jnp.max,
        "mean": jnp.mean,
    }
    return {k: reduce[AUX_REDUCTIONS.get(k, "mean")](v) for k, v in aux.items()}


def cost_matrix(x: jax.Array, y: jax.Array, cost: str = "sqeuclidean") -> jax.Array:
    """Pairwise cost ``C[i, j] = c(x[i], y[j])``.

    Args:
      x: [n, d]; y: [m, d].
      cost: ``"sqeuclidean"`` (``||x - y||^2``) or ``"cosine"`` (``1 - cos(x, y)``).

    Returns:
      [n, m] cost matrix.
    """
    if cost == "sqeuclidean":
        # The expanded form is one matmul (the direct form materialises [n, m, d]); its
        # rounding can make near-zero distances slightly negative, hence the clamp.
        sq_x = jnp.sum(x * x, axis=-1)[:, None]
        sq_y = jnp.sum(y * y, axis=-1)[None, :]
        return jnp.maximum(sq_x + sq_y - 2.0 * x @ y.T, 0.0)
    if cost == "cosine":
        return 1.0 - l2_normalize(x) @ l2_normalize(y).T
    raise ValueError(f"Unknown cost {cost!r}; valid costs: {list(COSTS)}.")


def _entropic_dual(f: jax.Array, g: jax.Array, cost: jax.Array, epsilon: jax.Array):
    """Dual of min_P <P, C> - eps H(P) over couplings of uniform marginals (OTT convention).

    With OTT's potentials (which absorb eps * log of the marginals) the plan is
    ``P = exp((f_i + g_j - C_ij) / eps)``, and the dual objective reads
    ``<a, f> + <b, g> - eps * (sum(P) - 1)``. By weak duality it is a lower bound of the
    primal for any (f, g), so the gap built on it is >= 0 even before convergence; its
    gradient in C (f, g frozen) is ``-(-P) = P`` i.e. Danskin's plan.
    """
    plan = jnp.exp((f[:, None] + g[None, :] - cost) / epsilon)
    return jnp.mean(f) + jnp.mean(g) - epsilon * (jnp.sum(plan) - 1.0)


def matching_gap(
    x: ArrayLike,
    y: ArrayLike,
    *,
    epsilon: float,
    cost: str = "sqeuclidean",
    normalize: bool = False,
    relative_epsilon: str | None = None,
    group_size: int | None = None,
    sinkhorn_options: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The matching gap between two views of a batch.

    For a cost matrix :math:`C_{ij} = c(x_i, y_j)` and the ground-truth matching
    :math:`J = I / n`,

    .. math::

        \mathrm{MG}(x, y) = \langle J, C\rangle - \varepsilon \log n
          - \min_{P \in U(1/n, 1/n)} \big(\langle P, C\rangle - \varepsilon H(P)\big),

    with :math:`H(P) = -\sum_{ij} P_{ij} \log P_{ij}`. Since :math:`J` is itself a coupling
    with entropy :math:`\log n`, MG is a Fenchel-Young gap: MG >= 0, with equality iff the
    entropic plan is :math:`J`. As :math:`\varepsilon \to 0` it tends to the mean paired cost
    minus the optimal assignment cost.

    The minimum is solved with OTT's Sinkhorn on ``stop_gradient(C)`` and evaluated through
    its dual at the frozen potentials and the live ``C`` (a lower bound of the minimum, so
    the returned value is >= 0 up to float rounding even for an unconverged solver).
    Gradient (Danskin's theorem): :math:`\partial \mathrm{MG} / \partial C = J - P^\star`,
    pushed through :math:`\partial C / \partial (x, y)`; Sinkhorn is never differentiated.

    Args:
      x: [n, d] embeddings of the first view (any float dtype; computed in float32).
      y: [n, d] embeddings of the second view; ``y[i]`` is the positive of ``x[i]``.
      epsilon: entropic regularisation (> 0), absolute unless ``relative_epsilon`` is set.
      cost: ``"sqeuclidean"`` or ``"cosine"``.
      normalize: L2-normalise ``x`` and ``y`` before computing the cost. Default ``False``,
        unlike :func:`multi_marginal_matching_gap`'s ``True``: pass it explicitly (every
        epsilon in the docs and configs is for unit vectors).
      relative_epsilon: ``None`` (absolute), ``"mean"`` or ``"std"``: multiply ``epsilon``
        by the stop-gradient mean / standard deviation of the cost matrix (per group).
      group_size: split the n pairs into ``n // group_size`` independent OT problems of
        ``group_size`` consecutive pairs (vmapped); the value is the mean over groups.
        ``None`` or ``n`` solves one global problem.
      sinkhorn_options: keyword arguments of ``ott.solvers.linear.sinkhorn.Sinkhorn``
        overriding :data:`DEFAULT_SINKHORN_OPTIONS` (e.g. ``{"threshold": 1e-4}``).

    Returns:
      ``(value, aux)``: ``value`` is the scalar matching gap; ``aux`` holds
      ``paired_cost`` (<J, C>), ``ot_cost`` (the entropic OT cost <P, C> - eps H(P)),
      ``epsilon``, ``converged``, ``sinkhorn_iterations`` and ``marginal_error`` (last L1
      marginal error). Non-finite inputs give a non-finite value.

    Example:
      >>> import jax
      >>> from matching_gap import losses
      >>> x, y = jax.random.normal(jax.random.key(0), (2, 8, 4))
      >>> value, aux = losses.matching_gap(x, y, epsilon=0.1, normalize=True)
      >>> bool(value >= 0)
      True
    """
    x, y = _prepare_pair(x, y, "matching_gap", epsilon, relative_epsilon, cost, normalize)
    options = _sinkhorn_options(sinkhorn_options, allowed=None)

    def one_problem(views: jax.Array) -> tuple[jax.Array, dict]:
        c = cost_matrix(views[0], views[1], cost)
        n = c.shape[0]
        eps = _resolve_epsilon(epsilon, relative_epsilon, c)
        out = _sinkhorn(c, eps, options)
        f, g = jax.lax.stop_gradient(out.f), jax.lax.stop_gradient(out.g)
        ot_cost = _entropic_dual(f, g, c, eps)
        return _gap(jnp.mean(jnp.diagonal(c)), ot_cost, eps, n, out)

    return _grouped(one_problem, jnp.stack([x, y]), group_size)


def matching_gap_scale(
    epsilon: float, n: int, *, num_views: int = 2, cost: str = "sqeuclidean"
) -> dict[str, float]:
    r"""The two reference values of the matching gap (or M3G) at a given epsilon and n.

    For an entropic loss "the loss falls" says little: its value lies between

    - ``collapse``: every embedding the same point, so every coupling costs the same and
      the entropic plan is uniform: :math:`\varepsilon (k - 1) \log n` (k views);
    - ``floor``: the best case the loss can see, each item's views identical and every
      other item orthogonal (unit vectors: ``normalize=True``). The entropic plan still
      spreads mass off the diagonal, so the floor is above zero:
      :math:`\varepsilon \log(S / n)` with :math:`S = \sum_{\text{tuples}}
      e^{-c/\varepsilon}`; for two views,
      :math:`\varepsilon \log\big(1 + (n - 1) e^{-d/\varepsilon}\big)` with ``d`` the
      cost of two orthogonal unit vectors (2 for ``"sqeuclidean"``, 1 for ``"cosine"``,
      1/2 for M3G's variance). It tends to 0 as epsilon goes to 0 (exact assignment).

    ``(collapse - value) / (collapse - floor)`` reads a logged value as the fraction of the
    way from collapse (0) to perfect pairs (1). ``diagonal_mass`` is the share of the
    entropic plan on the true pairs (tuples) at the floor: 1 only as epsilon goes to 0.

    Args:
      epsilon: the absolute entropic regularisation (> 0); with ``relative_epsilon`` pass
        the resolved value (``aux["epsilon"]``).
      n: the number of items of one OT problem (``group_size``, or the batch).
      num_views: k, the number of marginals (2 for :func:`matching_gap`).
      cost: ``"sqeuclidean"`` or ``"cosine"`` (:func:`matching_gap`, two views), or
        ``"variance"`` (:func:`multi_marginal_matching_gap`, any k >= 2).

    Returns:
      ``{"collapse": float, "floor": float, "diagonal_mass": float}``.

    Example:
      >>> from matching_gap import losses
      >>> s = losses.matching_gap_scale(0.8, 64)
      >>> round(s["collapse"], 3), round(s["floor"], 3)
      (3.327, 1.456)
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}.")
    if n < 2 or num_views < 2:
        raise ValueError(f"n and num_views must be >= 2, got n = {n}, num_views = {num_views}.")
    if cost not in COSTS + ("variance",):
        raise ValueError(f"Unknown cost {cost!r}; valid costs: {[*COSTS, 'variance']}.")
    k = int(num_views)
    if k != 2 and cost != "variance":
        raise ValueError(f"num_views = {k} needs cost='variance' (M3G's cost), got {cost!r}.")
    orthogonal = {"sqeuclidean": 2.0, "cosine": 1.0}
    # log(S), summed over the tuples grouped by how often each distinct item occurs in
    # them (a partition of k): a tuple's cost depends only on that partition.
    terms = []
    for parts in _partitions(k):
        distinct = len(parts)
        if distinct > n:
            continue
        if cost == "variance":  # of k unit vectors: 1 - ||mean||^2
            tuple_cost = 1.0 - sum(p * p for p in parts) / (k * k)
        else:
            tuple_cost = 0.0 if distinct == 1 else orthogonal[cost]
        # ordered tuples with this partition: n! / (n - r)! / prod(mult!) * k! / prod(p!)
        log_count = math.lgamma(n + 1) - math.lgamma(n - distinct + 1) + math.lgamma(k + 1)
        log_count -= sum(math.lgamma(p + 1) for p in parts)
        log_count -= sum(math.lgamma(parts.count(p) + 1) for p in set(parts))
        terms.append(log_count - tuple_cost / epsilon)
    top = max(terms)
    log_s = top + math.log(sum(math.exp(t - top) for t in terms))
    return {
        "collapse": float(epsilon * (k - 1) * math.log(n)),
        "floor": float(epsilon * (log_s - math.log(n))),
        "diagonal_mass": float(math.exp(math.log(n) - log_s)),
    }


def _partitions(k: int, largest: int | None = None) -> list[tuple[int, ...]]:
    """The partitions of ``k`` as non-increasing tuples (k = 3: (3,), (2, 1), (1, 1, 1))."""
    largest = k if largest is None else largest
    if k == 0:
        return [()]
    return [
        (first,) + rest
        for first in range(min(k, largest), 0, -1)
        for rest in _partitions(k - first, first)
    ]


def _prepare_pair(
    x, y, name: str, epsilon, relative_epsilon, cost: str, normalize: bool
) -> tuple[jax.Array, jax.Array]:
    """The checks and input handling shared by :func:`matching_gap` and
    :func:`transport_plan`: both views in the compute dtype, L2-normalised if asked."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_pair(x, y, name)
    _check_epsilon(epsilon, relative_epsilon)
    if cost not in COSTS:
        raise ValueError(f"Unknown cost {cost!r}; valid costs: {list(COSTS)}.")
    dtype = _compute_dtype(x, y)
    x, y = x.astype(dtype), y.astype(dtype)
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    return x, y


def _sinkhorn(c: jax.Array, eps: jax.Array, options: Mapping[str, Any]):
    """OTT's Sinkhorn on ``stop_gradient(c)`` with uniform marginals (never differentiated)."""
    # OTT annotates epsilon as a float; it holds an array (a traced one under jit, and its
    # own relative epsilons are arrays: Geometry.epsilon_scheduler).
    geom = geometry.Geometry(cost_matrix=jax.lax.stop_gradient(c), epsilon=eps)  # type: ignore[arg-type]
    solver = sinkhorn.Sinkhorn(implicit_diff=None, **options)
    return solver(linear_problem.LinearProblem(geom))


def transport_plan(
    x: ArrayLike,
    y: ArrayLike,
    *,
    epsilon: float,
    cost: str = "sqeuclidean",
    normalize: bool = False,
    relative_epsilon: str | None = None,
    sinkhorn_options: Mapping[str, Any] | None = None,
) -> jax.Array:
    """The entropic optimal plan :math:`P^*` of :func:`matching_gap` (one problem).

    Same arguments as :func:`matching_gap` (without groups). Returns ``[n, n]`` with rows
    and columns summing to ``1 / n`` (up to Sinkhorn's tolerance): the coupling whose
    distance from the true pairs ``I / n`` the matching gap measures, and whose
    off-diagonal mass shows which images the embedding still confuses.
    """
    x, y = _prepare_pair(x, y, "transport_plan", epsilon, relative_epsilon, cost, normalize)
    c = cost_matrix(x, y, cost)
    eps = _resolve_epsilon(epsilon, relative_epsilon, c)
    out = _sinkhorn(c, eps, _sinkhorn_options(sinkhorn_options, allowed=None))
    return jnp.exp((out.f[:, None] + out.g[None, :] - c) / eps)


def _gap(paired: jax.Array, ot_cost: jax.Array, eps: jax.Array, n: int, out) -> tuple:
    """``<J, C> - eps log n - OT`` and the aux of one problem solved by ``out`` (a solver
    output with ``converged``, ``n_iters`` and ``errors``)."""
    return paired - eps * math.log(n) - ot_cost, {
        "paired_cost": paired,
        "ot_cost": ot_cost,
        "epsilon": eps,
        "converged": out.converged,
        "sinkhorn_iterations": out.n_iters,
        "marginal_error": _last_error(out.errors),
    }


def _last_error(errors: jax.Array) -> jax.Array:
    """Last recorded Sinkhorn error (``-1`` marks iterations never run, ``inf`` unmeasured)."""
    errors = errors.reshape(-1)
    recorded = jnp.where(errors >= 0, errors, jnp.nan)
    idx = jnp.sum(errors != -1) - 1
    return recorded[jnp.clip(idx, 0, errors.shape[0] - 1)]


def multi_marginal_matching_gap(
    views: ArrayLike,
    *,
    epsilon: float,
    normalize: bool = True,
    relative_epsilon: str | None = None,
    group_size: int | None = None,
    sinkhorn_options: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The multi-marginal matching gap (M3G) of k >= 2 views.

    The cost of a k-tuple is the variance of its points,
    :math:`c(z_1, \dots, z_k) = \frac1k\sum_l \|z_l\|^2 - \|\bar z\|^2
    = \frac{1}{k^2}\sum_{l<m}\|z_l - z_m\|^2`, which for unit vectors is the circular
    variance :math:`1 - \|\bar z\|^2` (k = 2: :math:`\|x - y\|^2 / 4`). With the diagonal
    tensor :math:`J` (mass 1/n on :math:`i_1 = \dots = i_k`),

    .. math::

        \mathrm{M3G} = \langle J, C\rangle - \varepsilon \log n
          - \min_{P \in U(1/n, \dots, 1/n)} \big(\langle P, C\rangle - \varepsilon H(P)\big)
          \ \ge 0.

    The n^k cost tensor is built explicitly (memory n^k: keep n per problem small, e.g.
    ``group_size=64``). The minimum is solved by OTT's multi-marginal Sinkhorn on
    stop-gradient inputs and evaluated through its dual at frozen potentials and the live
    cost, so the gradient is :math:`J - P^\star` through :math:`\partial C/\partial z`
    (Danskin's theorem, no differentiation of the iterations).

    Args:
      views: [k, n, d]; ``views[l, i]`` is the l-th view of item i.
      epsilon: entropic regularisation (> 0) on the variance cost (M3G used 0.2). Always
        explicit: OTT's default is not stop-gradient.
      normalize: L2-normalise every view first (the M3G setting; the circular variance is
        defined for unit vectors). Default ``True``, unlike :func:`matching_gap`'s ``False``.
      relative_epsilon: ``None``, ``"mean"`` or ``"std"`` of the stop-gradient cost tensor.
      group_size: independent problems over groups of consecutive items (vmapped).
      sinkhorn_options: subset of ``threshold``, ``max_iterations``, ``inner_iterations``,
        ``min_iterations`` for ``ott.experimental.mmsinkhorn.MMSinkhorn``.

    Returns:
      ``(value, aux)`` with the same keys as :func:`matching_gap`.
    """
    views = jnp.asarray(views)
    if views.ndim != 3:
        raise ValueError(f"views must have shape [k, n, d], got {views.shape}.")
    k, n, _ = views.shape
    if k < 2:
        raise ValueError(f"multi_marginal_matching_gap needs k >= 2 views, got k = {k}.")
    if n < 2:
        raise ValueError(f"multi_marginal_matching_gap needs n >= 2 items, got n = {n}.")
    _check_epsilon(epsilon, relative_epsilon)
    options = _sinkhorn_options(sinkhorn_options, allowed=_MM_SINKHORN_KEYS)
    views = views.astype(_compute_dtype(views))
    if normalize:
        views = l2_normalize(views)

    def one_problem(views: jax.Array) -> tuple[jax.Array, dict]:
        k, n, _ = views.shape
        # Pairwise squared distances of z / k, summed over pairs: the variance cost.
        points = tuple(views / k)
        c = mmsinkhorn.cost_tensor(points, costs.SqEuclidean())
        eps = _resolve_epsilon(epsilon, relative_epsilon, c)
        solver = mmsinkhorn.MMSinkhorn(**options)
        # OTT annotates epsilon as a float (its own default is an array, jnp.std of the cost)
        # and coupling_tensor's potentials as a 1-tuple (it takes one per marginal).
        out = solver(tuple(jax.lax.stop_gradient(p) for p in points), epsilon=eps)  # type: ignore[arg-type]
        pots = [jax.lax.stop_gradient(p) for p in out.potentials]
        plan = mmsinkhorn.coupling_tensor(pots, c, eps)  # type: ignore[arg-type]
        ot_cost = sum(jnp.mean(p) for p in pots) + eps * (1.0 - jnp.sum(plan))
        return _gap(jnp.mean(c[(jnp.arange(n),) * k]), ot_cost, eps, n, out)

    return _grouped(one_problem, views, group_size)


def info_nce(
    x: ArrayLike, y: ArrayLike, *, temperature: float = 0.1
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""NT-Xent / InfoNCE of SimCLR for two views.

    The 2n L2-normalised embeddings :math:`z = [x; y]` are compared by cosine similarity
    :math:`s_{ab}`; each anchor's positive is its other view, its negatives the 2n - 2
    remaining embeddings:

    .. math::

        \mathcal L = \frac{1}{2n}\sum_a -\log \frac{\exp(s_{a,p(a)}/\tau)}
          {\sum_{b \ne a} \exp(s_{ab}/\tau)}.

    Args:
      x, y: [n, d] embeddings; ``y[i]`` is the positive of ``x[i]``.
      temperature: :math:`\tau > 0`.

    Returns:
      ``(value, aux)``; aux holds ``accuracy`` (fraction of anchors whose positive has the
      highest similarity) and ``positive_similarity``.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_pair(x, y, "info_nce")
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    dtype = _compute_dtype(x, y)
    n = x.shape[0]
    z = l2_normalize(jnp.concatenate([x, y]).astype(dtype))
    sim = z @ z.T
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim / temperature)
    positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    value = -jnp.mean(log_probs[jnp.arange(2 * n), positives])
    return value, {
        "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == positives),
        "positive_similarity": jnp.mean(sim[jnp.arange(2 * n), positives]),
    }


def byol_loss(predictions: ArrayLike, targets: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""BYOL regression loss :math:`\frac1n\sum_i \|\bar p_i - \mathrm{sg}(\bar t_i)\|^2`.

    With unit vectors this is :math:`2 - 2\cos(p_i, t_i)`. The targets (the EMA teacher's
    projections) receive no gradient.

    Args:
      predictions: [n, d] online predictions; targets: [n, d] target projections.
    """
    p, t = jnp.asarray(predictions), jnp.asarray(targets)
    _check_pair(p, t, "byol_loss")
    dtype = _compute_dtype(p, t)
    p = l2_normalize(p.astype(dtype))
    t = jax.lax.stop_gradient(l2_normalize(t.astype(dtype)))
    cos = jnp.sum(p * t, axis=-1)
    return jnp.mean(2.0 - 2.0 * cos), {"cosine": jnp.mean(cos)}


def _check_views(views: jax.Array, name: str, mode: str) -> None:
    if views.ndim != 3 or views.shape[0] < 2:
        raise ValueError(f"{name}: expected views of shape [k >= 2, n, d], got {views.shape}.")
    if mode not in MULTIVIEW_MODES:
        raise ValueError(f"{name}: unknown mode {mode!r}; valid modes: {list(MULTIVIEW_MODES)}.")


def _rest_mean(views: jax.Array, index: int) -> jax.Array:
    """Mean of the normalised views other than ``index``: [n, d]."""
    k = views.shape[0]
    normed = l2_normalize(views)
    return (jnp.sum(normed, axis=0) - normed[index]) / (k - 1)


def _mean_of_terms(terms: list[tuple[jax.Array, dict]]) -> tuple[jax.Array, dict]:
    """``(value, aux)`` of several losses -> their mean value and :func:`reduce_aux`."""
    values, aux = jax.tree.map(lambda *leaves: jnp.stack(leaves), *terms)
    return jnp.mean(values), reduce_aux(aux)


def multiview_info_nce(
    views: ArrayLike, *, temperature: float = 0.1, mode: str = "pairwise"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """InfoNCE extended to k >= 2 views, as the M3G paper's baselines.

    ``mode="pairwise"``: mean of :func:`info_nce` over the k(k-1)/2 pairs of views.
    ``mode="one_vs_rest"``: mean over l of :func:`info_nce` between view l and the mean of
    the other (normalised) views. For k = 2 both equal :func:`info_nce`.

    Args:
      views: [k, n, d].
    """
    views = jnp.asarray(views)
    _check_views(views, "multiview_info_nce", mode)
    k = views.shape[0]
    if mode == "pairwise":
        terms = [
            info_nce(views[a], views[b], temperature=temperature)
            for a in range(k)
            for b in range(a + 1, k)
        ]
    else:
        terms = [
            info_nce(views[a], _rest_mean(views, a), temperature=temperature) for a in range(k)
        ]
    return _mean_of_terms(terms)


def multiview_byol(
    predictions: ArrayLike, targets: ArrayLike, *, mode: str = "pairwise"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BYOL extended to k >= 2 views.

    ``mode="pairwise"``: mean of :func:`byol_loss` (prediction of view a, target of view b)
    over the k(k-1) ordered pairs a != b (the symmetrised BYOL loss for k = 2).
    ``mode="one_vs_rest"``: mean over a of :func:`byol_loss` between the prediction of view a
    and the mean of the other views' (normalised) targets.

    Args:
      predictions, targets: [k, n, d].
    """
    p, t = jnp.asarray(predictions), jnp.asarray(targets)
    _check_views(p, "multiview_byol", mode)
    if p.shape != t.shape:
        raise ValueError(
            f"multiview_byol: predictions and targets must have the same shape [k, n, d], "
            f"got {p.shape} and {t.shape}."
        )
    k = p.shape[0]
    if mode == "pairwise":
        terms = [byol_loss(p[a], t[b]) for a in range(k) for b in range(k) if a != b]
    else:
        terms = [byol_loss(p[a], _rest_mean(t, a)) for a in range(k)]
    return _mean_of_terms(terms)


def dino_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    center: ArrayLike,
    *,
    student_temperature: float = 0.1,
    teacher_temperature: float | jax.Array = 0.04,
    center_momentum: float = 0.9,
    centering: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""DINO's self-distillation loss (``DINOLoss.forward`` and ``update_center``).

    The teacher's outputs of the G global views are centred and sharpened,
    :math:`q_b = \mathrm{softmax}((t_b - c) / \tau_t)` (no gradient); every student view
    :math:`a` is scored against every teacher view :math:`b \ne a` by cross-entropy,

    .. math::

        \mathcal L = \frac{1}{|P|} \sum_{(a, b) \in P} \frac1n \sum_i
          -\sum_k q_{b,ik} \log \mathrm{softmax}(s_{a,i} / \tau_s)_k,
        \quad P = \{(a, b): a < V, b < G, a \ne b\}.

    The global views are the first G student views (DINO: ``images[:2]`` to the teacher,
    the same two first in the student's list). The new centre is the EMA of the teacher's
    batch mean over its G views and n images, ``c' = m c + (1 - m) mean(t)`` (under ``jit``
    on a mesh the mean is over the global batch, DINO's ``all_reduce``). The gradient flows
    into the student only: :math:`\partial \mathcal L / \partial s_a = (p_a - \bar q_a) /
    \tau_s / (n |P|)` with :math:`\bar q_a` the sum of the targets paired with view a.

    Args:
      student: [V, n, K] student head outputs of all views, the G global views first.
      teacher: [G, n, K] teacher head outputs of the global views.
      center: [K] the centre before this step.
      student_temperature, teacher_temperature: :math:`\tau_s`, :math:`\tau_t` (> 0);
        the teacher's may be a traced scalar (:func:`dino_teacher_temperature`).
      center_momentum: the centre's momentum m in [0, 1].
      centering: False subtracts no centre (and keeps it at its value): the ablation that
        collapses.

    Returns:
      ``(value, aux)``; ``aux["center"]`` is the updated centre [K] (state to carry to the
      next step), ``teacher_entropy`` the mean entropy of the targets :math:`q` and
      ``target_entropy`` the entropy of their batch mean (both fall to 0 when the teacher
      collapses to one dimension; a uniform collapse keeps ``teacher_entropy`` at log K).
    """
    s, t, c = jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center)
    if s.ndim != 3 or t.ndim != 3 or s.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"dino_loss: expected student [V, n, K] and teacher [G, n, K] with the same n and "
            f"K, got {s.shape} and {t.shape}."
        )
    num_views, num_global = s.shape[0], t.shape[0]
    if num_global > num_views or num_views < 2:
        raise ValueError(
            f"dino_loss: needs G <= V global views and V >= 2 views, got V = {num_views}, "
            f"G = {num_global}."
        )
    if c.shape != (s.shape[-1],):
        raise ValueError(f"dino_loss: center must have shape [{s.shape[-1]}], got {c.shape}.")
    dtype = _compute_dtype(s, t, c)
    # DINO detaches the targets and keeps the centre a buffer: no gradient reaches either.
    t, c = jax.lax.stop_gradient(t.astype(dtype)), jax.lax.stop_gradient(c.astype(dtype))
    s = s.astype(dtype)
    shift = c if centering else jnp.zeros_like(c)
    targets = jax.nn.softmax((t - shift) / teacher_temperature, axis=-1)  # [G, n, K]
    log_probs = jax.nn.log_softmax(s / student_temperature, axis=-1)  # [V, n, K]
    # cross[a, b] = mean_i -<q_b,i, log p_a,i>, then the pairs a != b.
    cross = -jnp.einsum("bik,aik->ab", targets, log_probs) / s.shape[1]
    pairs = ~jnp.eye(num_views, num_global, dtype=bool)
    value = jnp.sum(jnp.where(pairs, cross, 0.0)) / jnp.sum(pairs)
    new_center = c
    if centering:
        batch_center = jnp.mean(t.reshape(-1, t.shape[-1]), axis=0)
        new_center = c * center_momentum + batch_center * (1.0 - center_momentum)
    mean_target = jnp.mean(targets.reshape(-1, t.shape[-1]), axis=0)
    return value, {
        "center": jax.lax.stop_gradient(new_center),
        "teacher_entropy": -jnp.mean(jnp.sum(targets * jnp.log(targets + 1e-30), axis=-1)),
        "target_entropy": -jnp.sum(mean_target * jnp.log(mean_target + 1e-30)),
    }


def dino_teacher_temperature(
    step: ArrayLike, epoch_steps: int, *, warmup: float, final: float, warmup_epochs: int
) -> jax.Array:
    """DINO's ``teacher_temp_schedule[epoch]``: ``np.linspace(warmup, final, warmup_epochs)``
    for the first ``warmup_epochs`` epochs, then ``final``; constant within an epoch
    (``epoch = step // epoch_steps``). The linspace ends on ``final``, so the last warm-up
    epoch already uses it."""
    epoch = jnp.asarray(step) // max(int(epoch_steps), 1)
    if warmup_epochs <= 0:
        return jnp.asarray(final, jnp.float32)
    if warmup_epochs == 1:
        return jnp.where(epoch < 1, warmup, final).astype(jnp.float32)
    frac = jnp.minimum(epoch / (warmup_epochs - 1), 1.0)
    return (warmup + (final - warmup) * frac).astype(jnp.float32)
