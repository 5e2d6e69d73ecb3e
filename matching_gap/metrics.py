"""Metric writing: one JSON object per logged step in ``metrics.jsonl``, plus TensorBoard.

TensorBoard event files are written with ``tf.summary`` when TensorFlow is importable (it is
an optional runtime dependency on accelerator machines); the JSON lines always are.
Only process 0 writes.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging


class MetricWriter:
    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        try:
            import tensorboard  # noqa: F401  (tf.summary needs it; tensorflow-cpu lacks it)
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        except ImportError:
            logging.warning("No TensorFlow/TensorBoard: metrics go to metrics.jsonl only.")

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for name, value in scalars.items():
                    tf.summary.scalar(name, value)
            self._tb.flush()


def _scalar(value) -> float:
    value = np.asarray(value)
    return float(value) if value.dtype != bool else float(bool(value))


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` (empty list if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
