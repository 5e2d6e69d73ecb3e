"""Is the run learning? Label-free signals of a training run's health, and the collapse line.

- :func:`effective_rank` (RankMe, Garrido et al., "RankMe: Assessing the Downstream
  Performance of Pretrained Self-Supervised Representations by Their Rank", ICML 2023): the
  exponential of the entropy of the normalised singular values of a batch of embeddings.
  It is 1 when every embedding lies on one line (collapse) and at most ``min(n, d)``. The
  train step logs it for the encoder's features of the first global view
  (``health/effective_rank``).
- :func:`loss_scale`: where the loss would read at collapse and at its floor for the run's
  loss, epsilon and OT problem size (``losses.matching_gap_scale``), so that a progress row
  can say how far from collapse the loss is (``health/loss_progress``, 0 at collapse, 1 at
  perfect pairs).
- :class:`CollapseWatch`: one line, once, when a collapse signature holds over a window of
  progress rows, naming what usually causes it.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from matching_gap import losses, schema


def effective_rank(embeddings: jax.Array, *, eps: float = 1e-7) -> jax.Array:
    """RankMe of ``embeddings [n, d]``: ``exp(-sum p_k log p_k)``, ``p = s / ||s||_1 + eps``
    with ``s`` the singular values (the paper's eps). Computed in float32 from the
    eigenvalues of the ``d x d`` (or ``n x n``, whichever is smaller) Gram matrix, a sum
    over the batch that XLA reduces across devices; singular values below 1e-3 of the
    largest (float32's rounding) count as 0. Returns a scalar."""
    x = embeddings.astype(jnp.float32)
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    eigenvalues = jnp.linalg.eigvalsh(gram)
    # float32 rounding leaves eigenvalues of ~1e-7 of the largest where the exact ones are
    # 0, and the square root would make them singular values of ~3e-4: cut them.
    eigenvalues = jnp.where(eigenvalues > 1e-6 * jnp.max(eigenvalues), eigenvalues, 0.0)
    singular = jnp.sqrt(eigenvalues)
    p = singular / jnp.maximum(jnp.sum(singular), 1e-30) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def ot_problem_size(config: schema.Config) -> int:
    """n of one OT problem of the matching gap or M3G: the group size, else the batch."""
    return int(config.loss.group_size or config.optim.batch_size)


def loss_scale(config: schema.Config, epsilon: float) -> dict[str, float] | None:
    """``losses.matching_gap_scale`` for the run's OT loss at the resolved ``epsilon`` (the
    logged ``sinkhorn/epsilon``); None for the other losses or unnormalised embeddings (the
    floor assumes unit vectors)."""
    loss = config.loss
    if loss.name not in schema.OT_LOSSES or not loss.normalize or not epsilon > 0:
        return None
    if loss.name == "m3g":
        k, cost = config.augment.num_views, "variance"
    else:
        k, cost = 2, loss.cost
    return losses.matching_gap_scale(epsilon, ot_problem_size(config), num_views=k, cost=cost)


# What usually makes each loss collapse, said in the collapse line.
_CAUSES = {
    "matching_gap": (
        "usually a learning rate too high for the batch, an epsilon so large that the plan "
        "is nearly uniform (loss.epsilon), or a teacher that moves too fast "
        "(teacher.momentum)"
    ),
    "m3g": "usually a learning rate too high, or an epsilon so large that the plan is uniform",
    "info_nce": "usually a temperature too high or a learning rate too high",
    "byol": (
        "usually a missing predictor or stop-gradient (model.use_predictor, teacher.ema), "
        "or a teacher that moves too fast"
    ),
    "dino": (
        "usually the centre's momentum or the teacher temperature (loss.teacher_temperature, "
        "its warm-up) letting one prototype win, or a learning rate too high"
    ),
}


class CollapseWatch:
    """Watches progress rows for a collapse signature held over ``window`` rows in a row:
    the effective rank of the features at or below ``rank_threshold`` (near 1: every image
    on one line), or, for DINO, the target entropy (of the batch's mean teacher
    distribution) below 0.05 nats (every image on one prototype). :meth:`update` returns
    the line the first time it holds, then None.

    The matching gap at its collapse value is named in the line as evidence, not taken as a
    signature alone: at initialisation a ViT's embeddings of different images are nearly
    parallel, and the loss reads its collapse value for the first hundreds of steps of a
    healthy run.
    """

    LOSS_AT_COLLAPSE = 0.02  # loss_progress at or below: the loss reads its collapse value
    DINO_ENTROPY = 0.05  # nats

    def __init__(self, loss_name: str, *, window: int, rank_threshold: float):
        self._loss, self._threshold = loss_name, rank_threshold
        self._rows: collections.deque = collections.deque(maxlen=window)
        self._said = False

    def _collapsed(self, row: Mapping[str, float]) -> bool:
        rank = row.get("health/effective_rank")
        entropy = row.get("train/target_entropy")
        return (rank is not None and rank <= self._threshold) or (
            self._loss == "dino" and entropy is not None and entropy <= self.DINO_ENTROPY
        )

    def _evidence(self, row: Mapping[str, float]) -> str:
        said = []
        if "health/effective_rank" in row:
            said.append(f"effective rank {row['health/effective_rank']:.2f}")
        progress = row.get("health/loss_progress")
        if progress is not None and progress <= self.LOSS_AT_COLLAPSE:
            said.append(
                f"loss {row['train/loss']:.4f} at its collapse value "
                f"{row['health/loss_at_collapse']:.4f}"
            )
        if self._loss == "dino" and "train/target_entropy" in row:
            said.append(f"DINO's target entropy {row['train/target_entropy']:.3f}")
        return ", ".join(said)

    def update(self, step: int, row: Mapping[str, float]) -> str | None:
        self._rows.append((step, self._collapsed(row)))
        full = len(self._rows) == self._rows.maxlen
        if self._said or not full or not all(collapsed for _, collapsed in self._rows):
            return None
        self._said = True
        return (
            f"The run looks collapsed: {self._evidence(row)} at step {step} (every row since "
            f"step {self._rows[0][0]}): every image gets nearly the same embedding. With "
            f"{self._loss} that is {_CAUSES.get(self._loss, 'usually the learning rate')}. "
            "Stop the run and change the setting before spending more on it."
        )
