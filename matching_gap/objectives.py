"""The training objective: which views meet which, where gradients stop, which loss applies.

``make_objective(config, mesh)`` returns ``objective(student [V, n, d], targets [K, n, d])
-> (value, aux)``: the student's embeddings of all V views (the K global views first, then
the local crops) against the targets of the K global views. The targets are the EMA
teacher's projections (gradient stopped here) or, with shared weights, the student's own.

The pairing follows DINO: targets are global views only, a view is never paired with
itself, and with shared weights (no teacher) each unordered pair of global views counts
once (the symmetric losses already score both directions). :func:`view_pairs` is the table.

DINO (``loss.name="dino"``) carries state from step to step, the centre of the teacher's
outputs, and its teacher temperature follows a schedule: its objective takes them as
keywords, ``objective(student, targets, center=..., teacher_temperature=...)``, and returns
the new centre in ``aux["center"]`` (:func:`losses.dino_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from matching_gap import losses
from matching_gap import sharding as sharding_lib

Objective = Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]


def view_pairs(num_student: int, num_global: int, *, directed: bool) -> list[tuple[int, int]]:
    """``(student view, target view)`` pairs.

    ``directed``: each ordered pair of distinct global views counts (an EMA teacher, or
    BYOL's one-directional regression); otherwise each unordered global pair counts once.
    Local crops (indices ``>= num_global``) are paired with every global view either way.
    """
    return [
        (a, b)
        for a in range(num_student)
        for b in range(num_global)
        if a != b and (directed or a > b or a >= num_global)
    ]


def _vmapped_mean(loss_fn, *stacked: jax.Array) -> tuple[jax.Array, dict]:
    """Mean of ``loss_fn`` over the leading axis of its inputs, as one vmapped computation.

    For the OT losses this runs a single Sinkhorn loop for all view pairs instead of one
    loop per pair (many small sequential loops would dominate an accelerator step).
    """
    values, aux = jax.vmap(loss_fn)(*stacked)
    return jnp.mean(values), losses.reduce_aux(aux)


def ssl_loss(
    loss_config,
    student: jax.Array,
    targets: jax.Array,
    *,
    ema: bool,
    center: jax.Array | None = None,
    teacher_temperature: jax.Array | float | None = None,
):
    """The configured loss on embeddings, averaged over view pairs.

    Args:
      loss_config: the ``loss`` section of the config.
      student: [V, n, d] student embeddings (predictions), the K global views first.
      targets: [K, n, d] target embeddings of the K global views.
      ema: whether targets come from a teacher (their gradient is stopped here).
      center, teacher_temperature: DINO's centre [d] and this step's teacher temperature
        (``loss.name="dino"`` only; the new centre comes back in ``aux["center"]``).

    Returns:
      ``(value, aux)``.
    """
    lc = loss_config
    num_views, num_global = student.shape[0], targets.shape[0]
    if ema:
        targets = jax.lax.stop_gradient(targets)
    if lc.name == "dino":  # DINOLoss: every student view against the teacher's other views
        if center is None or teacher_temperature is None:
            raise ValueError("loss.name='dino' needs the centre and the teacher temperature.")
        return losses.dino_loss(
            student,
            targets,
            center,
            student_temperature=lc.student_temperature,
            teacher_temperature=teacher_temperature,
            center_momentum=lc.center_momentum,
            centering=lc.centering,
        )
    pairs = view_pairs(num_views, num_global, directed=ema or lc.name == "byol")
    a_idx = np.array([a for a, _ in pairs])
    b_idx = np.array([b for _, b in pairs])
    ot_kwargs = dict(
        epsilon=lc.epsilon,
        normalize=lc.normalize,
        relative_epsilon=lc.relative_epsilon or None,
        group_size=lc.group_size or None,
        sinkhorn_options={
            "threshold": lc.sinkhorn_threshold,
            "max_iterations": lc.sinkhorn_max_iterations,
        },
    )
    if lc.name == "matching_gap":
        fn = lambda x, y: losses.matching_gap(x, y, cost=lc.cost, **ot_kwargs)
        return _vmapped_mean(fn, student[a_idx], targets[b_idx])
    if lc.name == "m3g":
        if not ema:  # one k-marginal problem over the k global views
            return losses.multi_marginal_matching_gap(student, **ot_kwargs)
        # Each student view with the teacher's other views: [K, K, n, d].
        others = np.array([[m for m in range(num_global) if m != a] for a in range(num_global)])
        tuples = jnp.concatenate([student[:, None], targets[others]], axis=1)
        one_tuple = lambda views: losses.multi_marginal_matching_gap(views, **ot_kwargs)
        return _vmapped_mean(one_tuple, tuples)
    if lc.name == "info_nce":
        if not ema and num_views == num_global and lc.multiview_mode == "one_vs_rest":
            return losses.multiview_info_nce(
                student, temperature=lc.temperature, mode="one_vs_rest"
            )
        fn = lambda x, y: losses.info_nce(x, y, temperature=lc.temperature)
        return _vmapped_mean(fn, student[a_idx], targets[b_idx])
    if lc.name == "byol":
        # Without a teacher the targets are the student's own projections (SimSiam); the
        # loss stops their gradient either way.
        if num_views == num_global and lc.multiview_mode == "one_vs_rest":
            return losses.multiview_byol(student, targets, mode="one_vs_rest")
        return _vmapped_mean(losses.byol_loss, student[a_idx], targets[b_idx])
    raise ValueError(f"Unknown loss.name {lc.name!r}.")  # schema.LossConfig lists them


def uses_per_device_groups(config, num_devices: int) -> bool:
    """Whether each device solves its own OT groups (see :func:`make_objective`)."""
    local_batch, rest = divmod(config.optim.batch_size, num_devices)
    return (
        num_devices > 1
        and config.loss.name in ("matching_gap", "m3g")
        and bool(config.loss.group_size)
        and not rest
        and local_batch % config.loss.group_size == 0
    )


def make_objective(config, mesh=None) -> Objective:
    """``objective(student [V, b, d], targets [K, b, d]) -> (value, aux)`` for the config.

    With a mesh of several devices and OT groups that divide the per-device batch, each
    device solves its own groups (:func:`sharding.per_device_groups`); otherwise the OT
    problems are solved on the gathered embeddings (``schema.check_devices`` warns).
    """
    objective = functools.partial(ssl_loss, config.loss, ema=bool(config.teacher.ema))
    if mesh is not None and uses_per_device_groups(config, mesh.size):
        return sharding_lib.per_device_groups(objective, mesh)
    return objective
