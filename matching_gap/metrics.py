"""Metric writing with CLU's writers: ``metrics.jsonl`` (one JSON object per record) and,
where TensorFlow and TensorBoard are installed, TensorBoard event files.

Only process 0 writes. On the accelerator machines without TensorFlow the JSON lines are
still written. After a restart from the checkpoint at step ``s``, the records of steps after
``s`` (written before the interruption, and about to be redone) are dropped, so that each
training step appears once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines ``{"step": s, name: value, ...}``; other kinds are ignored."""

    def __init__(self, path: str, *, resume_step: int | None = None):
        self._path = path
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in read_records(path) if r["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        del step, values, metadata

    def write_images(self, step, images):
        del step, images

    def write_videos(self, step, videos):
        del step, videos

    def write_audios(self, step, audios, *, sample_rate):
        del step, audios, sample_rate

    def write_texts(self, step, texts):
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None):
        del step, arrays, num_buckets

    def write_hparams(self, hparams):
        del hparams

    def flush(self):
        pass

    def close(self):
        pass


def log(message: str) -> None:
    """A progress line on stdout, from process 0 only."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def create_writer(workdir: str, *, resume_step: int | None = None) -> metric_writers.MetricWriter:
    """The run's writer: JSON lines + TensorBoard on process 0, nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    os.makedirs(workdir, exist_ok=True)
    writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=resume_step)]
    try:
        import tensorboard  # noqa: F401  (tf.summary needs it; tensorflow-cpu lacks it)

        from matching_gap import data

        data.import_tensorflow()  # hidden from accelerators before CLU's writer imports it
        writers.append(metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))
    except ImportError:
        logging.warning("No TensorFlow/TensorBoard here: metrics go to metrics.jsonl only.")
    return metric_writers.MultiWriter(writers)


def _scalar(value) -> float:
    value = np.asarray(value)
    return float(value) if value.dtype != bool else float(bool(value))


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` (empty list if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    return read_records(path) if os.path.exists(path) else []


class Progress:
    """Host-side bookkeeping between log lines: means of the steps' metrics, images per
    second and ETA, written to the run's writer and printed as one short line.

    CLU's ``ReportProgress`` reports through absl's INFO log (kept at WARNING: Orbax is noisy
    there) and XManager notes; a local run wants one line on stdout instead.
    """

    def __init__(self, writer, batch_size: int, num_devices: int, start_step: int,
                 num_steps: int):  # fmt: skip
        self._writer, self._batch_size, self._num_devices = writer, batch_size, num_devices
        self._start_step, self._num_steps = start_step, num_steps
        self._t0 = self._last_time = time.perf_counter()
        self._last_step = start_step

    def seconds(self) -> float:
        """Seconds since this invocation started training."""
        return time.perf_counter() - self._t0

    def write(self, step: int, fetched: list[tuple[int, dict]]) -> None:
        """Writes the mean of the fetched steps' metrics at ``step`` and prints a line."""
        now = time.perf_counter()
        logged = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        rate = (step - self._last_step) * self._batch_size / max(now - self._last_time, 1e-9)
        logged["train/images_per_second"] = rate
        logged["train/images_per_second_per_device"] = rate / self._num_devices
        self._writer.write_scalars(step, logged)
        self._writer.flush()
        eta = (now - self._t0) / (step - self._start_step) * (self._num_steps - step)
        log(
            f"step {step}/{self._num_steps} | loss {logged['train/loss']:.4f} | "
            f"{rate:.0f} img/s | ETA {format_eta(eta)}"
        )
        self._last_time, self._last_step = now, step


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_results(results: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in results.items())
