"""A run measured while it runs: efficiency, where the wall time goes, and goodput.

- :class:`Stopwatch`: this invocation's wall time by category (``startup``, ``compile``,
  ``input_wait``, ``checkpoint`` (the blocking part of saves), ``evaluation``, ``other``);
  whatever no category claims is the training steps' own time.
- :class:`Progress`: one progress row every ``train.log_every`` steps, in ``metrics.jsonl``,
  TensorBoard and one printed line: the means of the steps' metrics, images/s, the model's
  FLOP rate per device (``efficiency.analytic_flops``, the plan's count) and MFU where the
  device's peak is known, each category's share of the wall time since the last row, the
  effective rank and, for the matching gap, the loss's place between collapse and its floor.
  Once the step time has settled it compares the run with the plan in one line; it says
  once when the run waits on its input and once when it looks collapsed.
- ``<workdir>/goodput.json``: the whole run's account across restarts (:class:`Goodput`),
  updated at each progress row and at each stop, printed as a table at the end.

Google's ml-goodput-measurement (``ml_goodput_measurement``) records the same kind of
account as Cloud Logging entries and computes goodput from them with a Cloud Logging
query: it needs Google Cloud credentials and a logging API on every run, so it serves a pod
run on Google Cloud but not a CPU run, a GPU machine or a test; the account here is a file
in the workdir, which a run on any machine writes and reads back when it resumes.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from matching_gap import efficiency, errors, health, metrics, schema, storage

CATEGORIES = ("startup", "compile", "input_wait", "checkpoint", "evaluation", "other")
# The shares a progress row carries (of the wall time since the last row).
ROW_SHARES = ("input_wait", "checkpoint", "evaluation", "compile")
SETTLED_ROWS = 2  # rows free of compilation before the plan comparison is made


class Stopwatch:
    """Wall time since the start of this invocation, by category."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.start = clock()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)

    def now(self) -> float:
        return self._clock()

    def elapsed(self) -> float:
        return self._clock() - self.start

    def mark_startup(self) -> None:
        """Everything so far that no category claimed was starting up (config, data,
        restore, init): call once, before the first step."""
        self.seconds["startup"] += self.elapsed() - sum(self.seconds.values())

    @contextlib.contextmanager
    def measure(self, category: str) -> Iterator[None]:
        if category not in self.seconds:
            raise ValueError(f"Unknown category {category!r}; the categories: {CATEGORIES}.")
        begin = self._clock()
        try:
            yield
        finally:
            self.seconds[category] += self._clock() - begin


# ------------------------------------------------------------------------------ goodput

_SECONDS = (
    "wall_seconds",
    "productive_step_seconds",
    "redone_step_seconds",
    *(f"{c}_seconds" for c in CATEGORIES),
)


class Goodput:
    """The run's account in ``<workdir>/goodput.json``, carried across restarts.

    At the start of an invocation the saved account (if any) is read back; this
    invocation's seconds are added to it at each :meth:`write`. A restart records the step
    it resumed from, the highest step the run had reached before (``max_step``) and the
    steps between the two, which this invocation trains again (their time is
    ``redone_step_seconds``, not productive). ``goodput`` is productive step time over
    wall time. Only process 0 writes.
    """

    def __init__(self, workdir: str, start_step: int):
        self._path = storage.path(workdir, "goodput.json")
        saved = _read_account(self._path)
        self.base: dict[str, Any] = {k: 0.0 for k in _SECONDS}
        self.base.update(invocations=0, restarts=[], max_step=start_step, open_window=None)
        if saved is not None:
            self.base.update(saved)
        self.previous_max = int(self.base["max_step"])
        self.redo_until = self.previous_max if saved is not None else start_step
        if saved is not None:
            self.base["restarts"] = [
                *saved.get("restarts", []),
                {
                    "resumed_from_step": start_step,
                    "reached_step": self.previous_max,
                    "redone_steps": max(self.previous_max - start_step, 0),
                },
            ]
        self.carried_window: dict[str, Any] | None = self.base.pop("open_window", None)
        if self.carried_window and self.carried_window.get("step") != start_step:
            self.carried_window = None  # the run resumed from another checkpoint
        self.open_window: dict | None = None
        self.max_step = max(self.previous_max, start_step)
        self.current = dict.fromkeys(_SECONDS, 0.0)

    def record(self) -> dict[str, Any]:
        """The whole run's account: the saved one plus this invocation's."""
        out: dict[str, Any] = {k: self.base[k] + self.current[k] for k in _SECONDS}
        out["goodput"] = (
            out["productive_step_seconds"] / out["wall_seconds"] if out["wall_seconds"] else 0.0
        )
        restarts = list(self.base["restarts"])
        out.update(
            invocations=int(self.base["invocations"]) + 1,
            restarts=restarts,
            redone_steps=int(sum(r["redone_steps"] for r in restarts)),
            max_step=self.max_step,
            open_window=self.open_window,
        )
        return out

    def write(self) -> None:
        if jax.process_index() == 0:
            storage.write_text(self._path, json.dumps(self.record(), indent=1))


def _read_account(path) -> dict | None:
    """The saved account, or None. One that cannot be read is kept aside (with its reason in
    the log) and the run starts a new one: training never stops for its bookkeeping."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("restarts", []), list):
            raise ValueError("not an account")
        float(saved.get("wall_seconds", 0.0)), int(saved.get("max_step", 0))
        return saved
    except (OSError, ValueError, TypeError) as e:
        aside = path.parent / f"{path.name}.unreadable"
        if jax.process_index() == 0:
            with contextlib.suppress(OSError):
                storage.write_bytes(aside, path.read_bytes())
        metrics.log(f"{path} cannot be read ({e}); kept as {aside}, a new account starts.")
        return None


def format_goodput(record: Mapping[str, Any]) -> str:
    """The account as a small table (seconds and share of the wall time)."""
    wall = record["wall_seconds"] or 1.0
    rows = [
        ("productive steps", record["productive_step_seconds"]),
        (f"steps redone after restarts ({record['redone_steps']})", record["redone_step_seconds"]),
        ("waiting for input", record["input_wait_seconds"]),
        ("compiling", record["compile_seconds"]),
        ("checkpoints (restore, blocking saves)", record["checkpoint_seconds"]),
        ("evaluating", record["evaluation_seconds"]),
        ("starting (data, restore, init)", record["startup_seconds"]),
        ("other (logging, pictures, profile)", record["other_seconds"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"Goodput over {record['invocations']} invocation(s), {len(record['restarts'])} "
        f"restart(s): {record['goodput']:.1%} of {format_seconds(record['wall_seconds'])} "
        "went to productive training steps."
    ]
    lines += [f"  {name:<{width}}  {format_seconds(s):>9}  {s / wall:6.1%}" for name, s in rows]
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    seconds = max(float(seconds), 0.0)
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


# ----------------------------------------------------------------------------- progress


class Progress:
    """The progress rows of one invocation (see the module doc) and the run's goodput.

    ``device_kind``: what JAX reports for the devices (or ``monitor.device_kind``); its
    peak (``efficiency.PEAK_FLOPS``) gives MFU, an unknown kind gives the FLOP rate only.
    """

    def __init__(
        self,
        config: schema.Config,
        workdir: str,
        writer,
        stopwatch: Stopwatch,
        *,
        num_devices: int,
        device_kind: str,
        start_step: int,
        num_steps: int,
    ):
        self._config, self._writer, self._watch = config, writer, stopwatch
        self._num_devices, self._kind = num_devices, device_kind
        self._start_step, self._num_steps = start_step, num_steps
        self._batch = config.optim.batch_size
        self._flops_per_device = efficiency.analytic_flops(config)["total"] / num_devices
        self._peak = efficiency.peak_flops(device_kind, config.model.dtype)
        self.goodput = Goodput(workdir, start_step)
        window = self.goodput.carried_window
        self._sums: dict[str, float] = dict(window["sums"]) if window else {}
        self._count = int(window["count"]) if window else 0
        self._last_step, self._last_time = start_step, stopwatch.now()
        self._training_start = self._last_time
        self._last_seconds = dict(stopwatch.seconds)
        # The account covers the wall time up to _accounted, when the categories had
        # claimed _claimed seconds; unclaimed time after training is "other".
        self._accounted, self._claimed = stopwatch.start, 0.0
        self._other_extra = 0.0
        self._training_done = False
        mc = config.monitor
        self._collapse = health.CollapseWatch(
            config.loss.name, window=mc.window, rank_threshold=mc.collapse_rank
        )
        self._waits: collections.deque = collections.deque(maxlen=mc.window)
        self._said_input = False
        self._clean_rows: list[tuple[int, float]] = []  # (steps, training seconds)
        self._compared = False

    def seconds(self) -> float:
        """Seconds since this invocation started training (``train.time_limit_minutes``)."""
        return self._watch.now() - self._training_start

    # ------------------------------------------------------------------ the account

    def _account(self, steps: int = 0, redone: int = 0) -> None:
        """Brings this invocation's account up to now: each category's seconds, and the
        wall time no category claimed since the last call as step time (split between
        redone and productive steps by count), or as ``other`` when no step ran (after
        training, or at a stop between rows)."""
        now, g = self._watch.now(), self.goodput.current
        claimed = sum(self._watch.seconds.values())
        unclaimed = (now - self._accounted) - (claimed - self._claimed)
        if self._training_done or not steps:
            self._other_extra += unclaimed
        else:
            g["redone_step_seconds"] += unclaimed * redone / steps
            g["productive_step_seconds"] += unclaimed * (steps - redone) / steps
        for c in CATEGORIES:
            g[f"{c}_seconds"] = self._watch.seconds[c]
        g["other_seconds"] += self._other_extra
        g["wall_seconds"] = now - self._watch.start
        self._accounted, self._claimed = now, claimed

    def finish_training(self) -> None:
        """Training has stopped: later wall time is evaluation, pictures or other."""
        self._account()
        self._training_done = True

    def close(self, *, print_table: bool) -> dict[str, Any]:
        """Writes goodput.json (and prints its table); returns the account."""
        self._account()
        self.goodput.write()
        record = self.goodput.record()
        if print_table:
            metrics.log(format_goodput(record))
        return record

    # ------------------------------------------------------------------ rows

    def write(
        self, step: int, fetched: list[tuple[int, dict]], *, stopping: bool = False
    ) -> dict[str, float]:
        """Writes the row at ``step`` (the mean of the fetched steps' metrics and of a
        window carried over a restart) and prints its line; returns the row.

        ``stopping``: the run stops after this step. When that cuts a logging window short,
        the window's sums are kept in goodput.json, and a run resumed from this very step
        completes the window with them: its next row equals the uninterrupted run's."""
        for _, m in fetched:
            for k, v in m.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += len(fetched)
        row = {k: v / self._count for k, v in self._sums.items()}
        row["train/window_steps"] = float(self._count)

        now, steps = self._watch.now(), step - self._last_step
        redone = min(max(self.goodput.redo_until - self._last_step, 0), steps)
        self._account(steps, redone)
        wall = max(now - self._last_time, 1e-9)
        spent = {c: self._watch.seconds[c] - self._last_seconds[c] for c in CATEGORIES}
        train_time = max(
            wall - spent["compile"] - spent["checkpoint"] - spent["evaluation"] - spent["other"],
            1e-9,
        )
        rate = steps * self._batch / wall
        row["train/images_per_second"] = rate
        row["train/images_per_second_per_device"] = rate / self._num_devices
        flops_rate = steps * self._flops_per_device / train_time
        row["perf/model_tflops_per_device"] = flops_rate / 1e12
        mfu = efficiency.mfu(flops_rate, self._kind, self._config.model.dtype)
        if mfu is not None:
            row["perf/mfu"] = mfu
        for c in ROW_SHARES:
            row[f"time/{c}_share"] = spent[c] / wall
        scale = health.loss_scale(self._config, row.get("sinkhorn/epsilon", 0.0))
        if scale is not None:
            row["health/loss_at_collapse"] = scale["collapse"]
            row["health/loss_floor"] = scale["floor"]
            row["health/loss_progress"] = (scale["collapse"] - row["train/loss"]) / (
                scale["collapse"] - scale["floor"]
            )
        self._writer.write_scalars(step, row)
        self._writer.flush()

        elapsed = now - self._training_start
        eta = elapsed / max(step - self._start_step, 1) * (self._num_steps - step)
        metrics.log(self._line(step, row, eta))
        self._notices(step, steps, row, spent, wall, train_time)

        complete = step % self._config.train.log_every == 0 or step == self._num_steps
        self.goodput.open_window = (
            {"step": step, "count": self._count, "sums": dict(self._sums)}
            if stopping and not complete
            else None
        )
        self.goodput.max_step = max(self.goodput.max_step, step)
        self._sums, self._count = {}, 0
        self._last_step, self._last_time = step, now
        self._last_seconds = dict(self._watch.seconds)
        self.goodput.write()
        return row

    def _line(self, step: int, row: Mapping[str, float], eta: float) -> str:
        parts = [f"step {step}/{self._num_steps}", f"loss {row['train/loss']:.4f}"]
        if "health/loss_progress" in row:
            parts[-1] += (
                f" ({round(100 * row['health/loss_progress']):d}% of the way from collapse "
                f"{row['health/loss_at_collapse']:.3f} to floor {row['health/loss_floor']:.3f})"
            )
        if "health/effective_rank" in row:
            parts.append(f"rank {row['health/effective_rank']:.1f}")
        parts.append(f"{row['train/images_per_second']:.0f} img/s")
        tflops = row["perf/model_tflops_per_device"]
        mfu = f"MFU {row['perf/mfu']:.1%}" if "perf/mfu" in row else "MFU unknown"
        parts.append(f"{_tflops(tflops)} TFLOP/s/device, {mfu}")
        shares = [
            f"{c.replace('_', ' ')} {row[f'time/{c}_share']:.0%}"
            for c in ROW_SHARES
            if row[f"time/{c}_share"] >= 0.005
        ]
        if shares:
            parts.append(", ".join(shares))
        parts.append(f"ETA {metrics.format_eta(eta)}")
        return " | ".join(parts)

    def _notices(self, step, steps, row, spent, wall, train_time) -> None:
        """The lines said once: the plan comparison, input-bound, collapsed."""
        mc = self._config.monitor
        self._waits.append((step, spent["input_wait"], wall))
        if not self._said_input and len(self._waits) == self._waits.maxlen:
            share = sum(w for _, w, _ in self._waits) / sum(t for _, _, t in self._waits)
            if share > mc.input_wait_warning:
                self._said_input = True
                metrics.log(self._input_line(share, self._waits[0][0] - steps))
        line = self._collapse.update(step, row)
        if line:
            metrics.log(line)
        if spent["compile"] == 0.0 and steps:
            self._clean_rows.append((steps, train_time))
        if not self._compared and len(self._clean_rows) >= SETTLED_ROWS:
            self._compared = True
            metrics.log(self.plan_comparison(step))

    def _input_line(self, share: float, first: int) -> str:
        streamed = not self._config.data.in_memory
        where = (
            "the host decodes the images and cuts the views (data.in_memory=False): give "
            "each device more host cores, read a prepared TFDS copy (data.source='tfds') "
            "rather than a folder of JPEGs, and keep the host free of other work; tf.data "
            "already runs its maps with AUTOTUNE parallel calls"
            if streamed
            else "the batches come from memory: check that no other process holds the host's cores"
        )
        threshold = self._config.monitor.input_wait_warning
        return (
            f"Input-bound: {share:.0%} of the wall time since step {first} went to waiting "
            f"for the next batch (monitor.input_wait_warning {threshold:.0%}); {where}."
        )

    def plan_comparison(self, step: int) -> str:
        """Measured against the plan: MFU and images/s per device, and the chip-hours and
        end of the run at the measured rate (over the rows free of compilation)."""
        steps = sum(s for s, _ in self._clean_rows)
        seconds = sum(t for _, t in self._clean_rows)
        step_time = seconds / steps
        per_device = self._batch / step_time / self._num_devices
        flops = self._flops_per_device / step_time
        hours = self._num_steps * step_time * self._num_devices / 3600
        end = datetime.datetime.now().astimezone() + datetime.timedelta(
            seconds=step_time * (self._num_steps - step)
        )
        unit = "chip-hours" if self._kind.startswith("TPU") else "device-hours"
        text = (
            f"Settled at step {step}: {_tflops(flops / 1e12)} TFLOP/s per device "
            f"({per_device:,.0f} images/s per device, {step_time * 1000:.0f} ms a step)"
        )
        mfu = efficiency.mfu(flops, self._kind, self._config.model.dtype)
        if mfu is not None and self._peak is not None:
            planned = efficiency.images_per_second_per_device(
                self._config, self._peak, efficiency.ASSUMED_MFU
            )
            planned_hours = hours * mfu / efficiency.ASSUMED_MFU
            text += (
                f" = MFU {mfu:.1%} of a {self._kind}'s "
                f"{self._peak / 1e12:.0f} {self._config.model.dtype} TFLOP/s; the plan "
                f"assumes {efficiency.ASSUMED_MFU:.0%} ({planned:,.0f} images/s per "
                f"device). At this rate the run's {self._num_steps:,} steps take "
                f"{hours:,.1f} {unit} ({planned_hours:,.1f} at the plan's MFU)"
            )
        else:
            known = (
                "a CPU has none"
                if self._kind.lower() == "cpu"
                else "if this is a listed chip under another name, set monitor.device_kind"
            )
            text += (
                f"; MFU unknown: no published peak for {self._kind!r} ({known}). At this "
                f"rate the run's {self._num_steps:,} steps take {hours:,.2f} {unit}"
            )
        return text + f" and end at {end:%Y-%m-%d %H:%M %Z} (the host's time zone)."


def _tflops(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.0f}"


# ------------------------------------------------------------------------------ profile


class Profiler:
    """Traces steps ``[start, start + steps)`` with ``jax.profiler`` (process 0, or every
    process with ``monitor.profile_all_processes``), then copies the trace to
    ``<workdir>/tensorboard/plugins/profile/<run>/``, where TensorBoard's profile plugin
    finds it, for a local or a ``gs://`` workdir alike. The trace is written to a local
    temporary folder first (the profiler's own writer knows only local paths and Google's
    real buckets). Python's own calls are not traced (``python_tracer_level=0``): the trace
    holds the device's ops and the host's runtime, a few MB per step."""

    def __init__(self, config: schema.Config, workdir: str, start_step: int):
        mc = config.monitor
        self.start, self.stop = mc.profile_start, mc.profile_start + mc.profile_steps - 1
        self._on = bool(mc.profile_start) and (mc.profile_all_processes or jax.process_index() == 0)
        if mc.profile_start and mc.profile_start <= start_step:
            self._on = False
            metrics.log(
                f"monitor.profile_start={mc.profile_start}: the run resumes after it (at "
                f"step {start_step}); no profile is taken."
            )
        self._workdir = workdir
        self._tmp: str | None = None
        self._last = 0  # the last step traced

    def before(self, step: int) -> None:
        if self._on and step == self.start:
            self._tmp = tempfile.mkdtemp(prefix="mg_profile_")
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0
            options.host_tracer_level = 2
            jax.profiler.start_trace(self._tmp, profiler_options=options)

    def after(self, step: int, state) -> None:
        """Ends the trace after its last step (``finish`` ends it at a stop before)."""
        if self._tmp is not None:
            self._last = step
            if step == self.stop:
                self.finish(state)

    def finish(self, state) -> None:
        """Stops the trace if it runs (a run stopped inside the range keeps what it traced)."""
        if self._tmp is None:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        root = os.path.join(self._tmp, "plugins", "profile")
        for run in sorted(os.listdir(root)):
            for name in sorted(os.listdir(os.path.join(root, run))):
                target = storage.path(self._workdir, "tensorboard", "plugins", "profile", run, name)
                with open(os.path.join(root, run, name), "rb") as f:
                    storage.write_bytes(target, f.read())
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        metrics.log(
            f"Profile of steps {self.start}-{self._last} ({size / 2**20:.1f} MB) in "
            f"{storage.path(self._workdir, 'tensorboard')}: `tensorboard --logdir` it, "
            "Profile tab (docs/training.md says how to read it)."
        )


def check_settings(config: schema.Config, num_steps: int) -> None:
    """The monitor's settings that the schema cannot check alone, before anything is
    written: a device kind given by hand must be in the table of peaks, and the profiled
    range must lie inside the run's ``num_steps``. Raises errors.ConfigError."""
    mc = config.monitor
    if mc.device_kind and mc.device_kind not in efficiency.PEAK_FLOPS:
        raise errors.ConfigError(
            f"monitor.device_kind={mc.device_kind!r} is not a kind of known peak; the kinds: "
            f"{sorted(efficiency.PEAK_FLOPS)} (or '' for what JAX reports)."
        )
    if mc.profile_start and mc.profile_start + mc.profile_steps - 1 > num_steps:
        raise errors.ConfigError(
            f"monitor.profile_start={mc.profile_start} with monitor.profile_steps="
            f"{mc.profile_steps} traces steps {mc.profile_start}-"
            f"{mc.profile_start + mc.profile_steps - 1}, past the run's {num_steps} steps: "
            "choose a range inside the run (a few steps after the first 10 or so, once "
            "compiled)."
        )


def device_kind(config: schema.Config, mesh) -> str:
    """``monitor.device_kind``, else what JAX reports for the mesh's devices."""
    return config.monitor.device_kind or mesh.devices.flat[0].device_kind
