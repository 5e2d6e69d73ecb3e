"""Evaluating frozen encoders: one module per step and per protocol.

* ``encoder``: the encoder as the evaluation sees it (``make_encode``), and
  :func:`load_encoder`, a trained run as a frozen feature extractor.
* ``features``: a split's features on the devices (``extract``, ``Features``) and the two
  labelled splits of a config, encoded once for every evaluator (``SplitFeatures``).
* ``knn``: the ``knn`` protocol, DINO's weighted k-NN.
* ``linear_probe``: the ``features`` protocol, a grid of linear heads on stored features.
* ``augmented_probe``: the ``augmented`` protocol, heads trained on augmented views
  (resumable).
* ``suite``: the evaluators of ``eval.protocols`` and of the training monitor, run together.
* ``evaluate``: ``--mode=evaluate`` (whole splits, ``evaluation.json``).

In Python: ``from matching_gap.evaluation import load_encoder``. The names below are the
entry points; the submodules' names are the modules (``from matching_gap.evaluation import
linear_probe`` is the module, whose ``linear_probe`` is the probe itself).
"""

from matching_gap.evaluation.encoder import load_encoder, make_encode
from matching_gap.evaluation.evaluate import evaluate_workdir
from matching_gap.evaluation.features import Features, SplitFeatures, extract, from_numpy
from matching_gap.evaluation.knn import knn_accuracy
from matching_gap.evaluation.linear_probe import ProbeSettings

__all__ = [
    "Features",
    "ProbeSettings",
    "SplitFeatures",
    "evaluate_workdir",
    "extract",
    "from_numpy",
    "knn_accuracy",
    "load_encoder",
    "make_encode",
]
