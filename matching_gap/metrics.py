"""Metric writing behind CLU's writer interface: ``metrics.jsonl`` (one JSON object per
record) and, where the ``tensorboard`` package is installed, TensorBoard event files. Both go
through :mod:`matching_gap.storage`, so a ``gs://`` workdir gets them in its bucket.

Only process 0 writes. On the accelerator machines without TensorFlow the JSON lines are
still written. After a restart from the checkpoint at step ``s``, the records of steps after
``s`` (written before the interruption, and about to be redone) are dropped, so that each
training step appears once.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from matching_gap import storage


class _ScalarsAndImages(metric_writers.MetricWriter):
    """A writer of the kinds of metric this project writes (scalars, images); the others
    are ignored."""

    def write_summaries(self, step, values, metadata=None):
        del step, values, metadata

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


class JsonlWriter(_ScalarsAndImages):
    """Scalars as JSON lines ``{"step": s, name: value, ...}``; other kinds are ignored."""

    def __init__(self, path: epath.Path, *, resume_step: int | None = None):
        kept = read_records(path) if path.exists() else []
        if resume_step is not None:
            kept = [r for r in kept if r["step"] <= resume_step]
        self._file = storage.GrowingFile(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        self._file.append((json.dumps(record) + "\n").encode())
        self._file.flush()  # each record is on disk (or in the bucket) once written

    def write_images(self, step, images):
        del step, images

    def flush(self):
        pass

    def close(self):
        pass


def log(message: str) -> None:
    """A progress line on stdout, from process 0 only."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


_said: set[str] = set()


def log_once(message: str) -> None:
    """:func:`log`, but a message already printed in this process is not printed again (a
    notice about the data that each of several evaluations of one run would repeat)."""
    if message not in _said:
        _said.add(message)
        log(message)


def create_writer(workdir: str, *, resume_step: int | None = None) -> metric_writers.MetricWriter:
    """The run's writer: JSON lines + TensorBoard on process 0, nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    writers = [JsonlWriter(storage.path(workdir, "metrics.jsonl"), resume_step=resume_step)]
    try:
        writers.append(TensorBoardWriter(storage.path(workdir, "tensorboard")))
    except ImportError:
        logging.warning("No tensorboard package here: metrics go to metrics.jsonl only.")
    return metric_writers.MultiWriter(writers)


class TensorBoardWriter(_ScalarsAndImages):
    """Scalars and images as TensorBoard event files in ``logdir``, written through
    :mod:`matching_gap.storage` with the ``tensorboard`` package's protos and record format.

    CLU's ``SummaryWriter`` writes through TensorFlow's file system, which for ``gs://``
    always goes to the real Google Cloud Storage (no emulator, no other endpoint) and needs
    TensorFlow. On a bucket an event file is rewritten whole at each flush; a new one is
    started past ``EVENT_FILE_BYTES`` so that a long run does not upload an ever larger one.
    Other kinds (histograms, audio, ...) are not written: the project writes none.
    """

    EVENT_FILE_BYTES = 16 * 2**20

    def __init__(self, logdir: epath.Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._logdir, self._event_pb2, self._summary_pb2 = logdir, event_pb2, summary_pb2
        self._record_writer = RecordWriter
        self._file: storage.GrowingFile | None = None

    def _write(self, step: int, values: list) -> None:
        if self._file is None or self._file.size > self.EVENT_FILE_BYTES:
            # TensorBoard reads a folder's event files in the order of their names.
            name = f"events.out.tfevents.{time.time_ns() // 1000}.{socket.gethostname()}"
            self._file = storage.GrowingFile(self._logdir / name)
            event = self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._append(self._file, event)
        summary = self._summary_pb2.Summary(value=values)
        self._append(
            self._file,
            self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary),
        )

    def _append(self, file: storage.GrowingFile, event) -> None:
        buffer = io.BytesIO()
        self._record_writer(buffer).write(event.SerializeToString())
        file.append(buffer.getvalue())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        Value = self._summary_pb2.Summary.Value
        self._write(step, [Value(tag=k, simple_value=_scalar(v)) for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """``images``: name -> ``[N, H, W, C]`` uint8 (C = 1, 3 or 4); N > 1 adds ``/i``."""
        from PIL import Image

        values = []
        for name, batch in images.items():
            for i, image in enumerate(np.asarray(batch)):
                png = io.BytesIO()
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                    png, format="PNG"
                )
                encoded = self._summary_pb2.Summary.Image(
                    height=image.shape[0],
                    width=image.shape[1],
                    colorspace=image.shape[2],
                    encoded_image_string=png.getvalue(),
                )
                tag = name if len(batch) == 1 else f"{name}/{i}"
                values.append(self._summary_pb2.Summary.Value(tag=tag, image=encoded))
        self._write(step, values)

    def flush(self):
        if self._file is not None:
            self._file.flush()

    def close(self):
        self.flush()


def _scalar(value) -> float:
    value = np.asarray(value)
    return float(value) if value.dtype != bool else float(bool(value))


def read_records(path: epath.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` (empty list if none)."""
    path = storage.path(workdir, "metrics.jsonl")
    return read_records(path) if path.exists() else []


class Progress:
    """Host-side bookkeeping between log lines: means of the steps' metrics, images per
    second and ETA, written to the run's writer and printed as one short line.

    CLU's ``ReportProgress`` reports through absl's INFO log (kept at WARNING: Orbax is noisy
    there) and XManager notes; a local run wants one line on stdout instead.
    """

    def __init__(self, writer, batch_size: int, num_devices: int, start_step: int, num_steps: int):
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
