"""Checkpoints of a run: Orbax saving policy, restore with fallback, quarantine, and the
guard that keeps a workdir to one model.

A checkpoint that cannot be read after a few tries (partial or corrupt files) is moved to
``<workdir>/corrupt_checkpoints/<step>-<time>`` (never deleted) and the previous one is
restored. Restoring reads into an abstract target (``jax.ShapeDtypeStruct`` with
shardings), so every array lands directly in its final layout, sharded when the run is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from matching_gap import errors, metrics, schema, storage

# Attempts to read one checkpoint before it counts as corrupt: a shared file system or a
# bucket can fail a read transiently, and quarantining a good checkpoint loses work.
RESTORE_TRIES = 3
RESTORE_RETRY_SECONDS = 1.0

# How long a save in flight may take to finish once the run needs it finished (at the next
# save, or at the end; it has had the steps in between already): a bucket that stops
# answering ends the run after this, with one line, instead of Orbax's 20-minute deadline
# and its tracebacks. Generous: the state of a large model takes minutes to upload.
SAVE_WAIT_SECONDS = 600.0

# The name Orbax's CheckpointManager gives the one item of a step saved with unnamed args.
ITEM = "default"

# Model fields that change how a model computes, not its parameters: a run may resume with
# other values.
# init_from and init only choose the start of a run: a resumed run continues from its
# checkpoint (the ImageNet recipes' runs from before model.init existed resume under "torch").
_RESUMABLE_MODEL_FIELDS = ("dtype", "remat", "attention", "init_from", "init")


class CheckpointWriteError(errors.UserError, OSError):
    """A checkpoint could not be written (the storage refused it or stopped answering); the
    checkpoints written before it are kept.

    ``exit_at_once``: the command exits without waiting for Orbax's background writes,
    which may never finish against storage that does not answer.
    """

    exit_at_once = True


def _sync(name: str) -> None:
    """All processes wait here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agreed_steps(local_steps) -> list[int]:
    """The checkpoint steps to try, newest first: process 0's listing, for every process (a
    listing of shared storage can differ between hosts while a save is being finalised)."""
    steps = np.array(sorted(local_steps, reverse=True), np.int32)
    if jax.process_count() == 1:
        return steps.tolist()
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    padded = np.full(count, -1, np.int32)  # the same shape on every process
    padded[: min(count, len(steps))] = steps[:count]
    return np.asarray(multihost_utils.broadcast_one_to_all(padded)).tolist()


def _count_processes(local: bool) -> int:
    """How many processes hold ``local`` True (a collective; ``local`` itself with one)."""
    if jax.process_count() == 1:
        return int(local)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(local))))


@contextlib.contextmanager
def _absl_quiet(quiet: bool):
    """absl logging at ERROR and above inside the block (when ``quiet``)."""
    before = absl_logging.get_verbosity()
    if quiet:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(before)


# Metadata of a state dataclass's field that the checkpoint holds only when it is set: a None
# there is left out of the saved tree (and of the restore target), so that adding such a field
# keeps the checkpoints written before it readable.
OPTIONAL = "checkpoint_only_if_set"


def _unset_optional(state: Any) -> list[str]:
    """The OPTIONAL fields of a dataclass ``state`` that are None."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return []
    return [
        f.name
        for f in dataclasses.fields(state)
        if f.metadata.get(OPTIONAL) and getattr(state, f.name) is None
    ]


def _as_saved(state: Any) -> Any:
    """The tree a checkpoint holds: ``state``, or its fields as a dict without the unset
    OPTIONAL ones (the same keys Orbax writes for the dataclass itself)."""
    unset = _unset_optional(state)
    if not unset:
        return state
    return {
        f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in unset
    }


def _from_saved(restored: Any, target: Any) -> Any:
    """The inverse of :func:`_as_saved` for a restore into ``target``."""
    unset = _unset_optional(target)
    if not unset:
        return restored
    return type(target)(**restored, **{name: None for name in unset})


class Checkpointer:
    """The checkpoints of ``<workdir>/checkpoints``: one every ``every`` steps (Orbax's
    fixed-interval policy) plus the forced ones (end of run, time limit, preemption)."""

    def __init__(self, workdir: str, *, every: int = 1, keep: int = 2, read_only: bool = False):
        self.workdir = storage.path(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        )
        with _absl_quiet(read_only):  # Orbax's "Given directory is read only" says nothing new
            self._manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)
        self._read_only = read_only
        self._in_flight: int | None = None  # the step of the save not yet known to be written
        self._written = None if read_only else self._manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether the schedule saves a checkpoint at ``step``."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, *, force: bool = False) -> Any:
        """Saves (asynchronously) when due or forced; returns the state to train on.

        Orbax reads the saved arrays in the background, and the train step donates its
        input buffers: training goes on with a device copy, the checkpoint keeps the
        originals until it is written.
        """
        if not (force or self.due(step)):
            return state
        self.finish()  # the previous save's failure ends the run before another one starts
        try:
            saved = self._manager.save(
                step, args=ocp.args.StandardSave(_as_saved(state)), force=force
            )
        except Exception as e:  # noqa: BLE001 (whatever the storage raised: one line)
            raise self._write_error(step, f"could not be written ({storage.reason(e)})") from e
        if not saved:
            return state  # not due: nothing holds the buffers
        self._in_flight = step
        return jax.tree.map(jnp.copy, state)

    @property
    def last_written(self) -> int | None:
        """The newest step known to be written (saved by this run, or restored from)."""
        return self._written

    def check(self) -> None:
        """Raises :class:`CheckpointWriteError` if the save in flight has failed (does not wait
        for one that is still being written)."""
        if self._in_flight is not None and not self._manager.is_saving_in_progress():
            self.finish()

    def finish(self, timeout: float | None = None) -> None:
        """Waits (at most ``timeout``, default :data:`SAVE_WAIT_SECONDS`) until the save in
        flight is written; raises :class:`CheckpointWriteError` if it failed or did not end
        in time."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return
        timeout = SAVE_WAIT_SECONDS if timeout is None else timeout
        try:  # Orbax's wait has no deadline
            storage.within(timeout, self._manager.wait_until_finished)
        except storage.NoAnswerError:
            reason = f"still not written after {timeout:.0f} s: the storage does not answer"
            raise self._write_error(step, f"{reason} (or too slowly)") from None
        except Exception as e:  # noqa: BLE001 (whatever the storage raised: one line)
            raise self._write_error(step, f"could not be written ({storage.reason(e)})") from e
        self._written = step

    def _write_error(self, step: int, reason: str) -> CheckpointWriteError:
        kept = (
            f"the checkpoint at step {self._written} is kept"
            if self._written is not None
            else "no checkpoint was written before it"
        )
        return CheckpointWriteError(
            f"The checkpoint at step {step} in {self.workdir}/checkpoints {reason}. Training "
            f"stopped; {kept}: check the storage (space, permissions, network), then rerun "
            "the same command to resume."
        )

    def close(self) -> None:
        self.finish()
        self._manager.close()

    def restore_latest(self, target: Any, *, partial: bool = False) -> Any | None:
        """The newest checkpoint that every process restores into ``target`` (abstract arrays
        with shardings, or arrays), or None when there is none.

        ``partial``: ``target`` is a part of the saved state, as nested dicts keyed by the
        saved fields (``{"step": ..., "teacher": ...}`` of a ``TrainState``); only its
        arrays are read (Orbax's partial restore), the rest of the checkpoint is not.

        One decision for all processes: they try the same steps (process 0's list), newest
        first, and after each one share whether they could read it, so that all resume from
        the same step or none does. A checkpoint that no process could read in
        ``RESTORE_TRIES`` tries is quarantined once an older one restores (process 0 moves
        it); one that some processes read is kept (the failure was on the others' side). If
        none restores everywhere, nothing is moved and the error says why (typically: the
        checkpoints were written by a different config).
        """
        # (step, error): unreadable everywhere; every step that failed here.
        unreadable: list[tuple[int, Exception]] = []
        failures: list[tuple[int, Exception]] = []
        for step in _agreed_steps(self._manager.all_steps()):
            state, error = self._restore_step(step, target, partial=partial)
            readers = _count_processes(error is None)
            if readers == jax.process_count():
                for bad_step, bad_error in unreadable:
                    self._quarantine(bad_step, bad_error)
                if unreadable:
                    self._manager.reload()
                if not self._read_only:  # the other modes name the step in their own words
                    metrics.log(f"Resumed from the checkpoint at step {step} in {self.workdir}.")
                self._written = step
                return state
            if error is not None:
                failures.append((step, error))
            if readers == 0 and error is not None:  # none read it (this one counts itself)
                unreadable.append((step, error))
            else:
                metrics.log(
                    f"WARNING: the checkpoint at step {step} was read by {readers} of "
                    f"{jax.process_count()} processes; all fall back to an older "
                    "one (it is kept)."
                )
        if unreadable or failures:
            step, error = (failures or unreadable)[0]
            raise errors.WorkdirError(
                f"No checkpoint in {self.workdir}/checkpoints could be restored into the "
                f"current config by every process (model, teacher or optimiser differ?). "
                f"Newest (step {step}): {type(error).__name__}: {str(error)[:600]} ... Use a "
                "new --workdir, or the settings the checkpoints were written with."
            ) from error
        return None

    def _restore_step(
        self, step: int, target: Any, *, partial: bool = False
    ) -> tuple[Any, Exception | None]:
        """``(state, None)``, or ``(None, the last error)`` after ``RESTORE_TRIES`` reads."""
        error: Exception | None = None
        for attempt in range(RESTORE_TRIES):
            try:
                return self._read(step, target, partial=partial), None
            except Exception as e:  # noqa: BLE001 (any read failure: retry, then fall back)
                error = e
                if attempt + 1 < RESTORE_TRIES:
                    time.sleep(RESTORE_RETRY_SECONDS * (attempt + 1))
        return None, error

    def _read(self, step: int, target: Any, *, partial: bool = False) -> Any:
        """Reads one checkpoint in this process alone: Orbax's own restore ends with a barrier
        of all processes, which the others would wait at forever when this one's read fails
        (the processes agree afterwards, in :meth:`restore_latest`)."""
        this_process = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(
            primary_host=this_process, active_processes={this_process}
        )
        path = self.workdir / "checkpoints" / str(step) / ITEM
        if partial:
            handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=alone)
            args = ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )
            with ocp.Checkpointer(handler, multiprocessing_options=alone) as reader:
                return reader.restore(path, args=args)
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as reader:
            return _from_saved(reader.restore(path, _as_saved(target)), target)

    def _quarantine(self, step: int, error: Exception) -> None:
        """Process 0 moves an unreadable checkpoint aside (keeping its files); the other
        processes wait until it has."""
        target = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            storage.move_tree(self.workdir / "checkpoints" / str(step), target)
        _sync(f"quarantine_{step}")
        metrics.log(
            f"WARNING: the checkpoint at step {step} could not be read "
            f"({type(error).__name__}: {str(error)[:200]}); moved to {target}, falling "
            "back to an older one."
        )


def has_checkpoints(workdir: str) -> bool:
    path = storage.path(workdir, "checkpoints")
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def check_workdir(workdir: str, config) -> None:
    """Refuses a workdir whose checkpoints belong to a different model (writes nothing)."""
    path = storage.path(workdir, "config.json")
    if not (has_checkpoints(workdir) and path.exists()):
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise errors.WorkdirError(
            f"{path} cannot be read ({e}); the checkpoints beside it cannot be checked "
            "against this config. Use a new --workdir, or restore that file."
        ) from e
    current = _as_json(config)
    # A field added after the saved run was written (model.layer_norm_eps) ran at its default.
    defaults = _as_json(schema.Config())
    was = {
        section: {**defaults[section], **saved.get(section, {})} for section in ("model", "teacher")
    }
    changed = [
        f"{section}.{k}: {was[section].get(k)!r} -> {v!r}"
        for section in ("model", "teacher")
        for k, v in current[section].items()
        if was[section].get(k) != v and k not in _RESUMABLE_MODEL_FIELDS
    ]
    if changed:
        raise errors.WorkdirError(
            f"{workdir} holds checkpoints of a different model ({'; '.join(changed)}). "
            "Use a new --workdir, or restore the original settings to resume."
        )


def _as_json(config) -> dict:
    """The config's values as ``config.json`` holds them (tuples as lists)."""
    return json.loads(json.dumps(schema.parse(config).to_dict()))


def write_config(workdir: str, config) -> None:
    """Saves the run's config as ``<workdir>/config.json`` (process 0)."""
    if jax.process_index() != 0:
        return
    text = json.dumps(_as_json(config), indent=2)
    storage.write_text(storage.path(workdir, "config.json"), text)


@contextlib.contextmanager
def preemption_notice():
    """Yields ``preempted(step) -> bool``: whether to checkpoint and stop after this step.

    One process: SIGTERM (the usual preemption notice) sets a flag. Several processes:
    JAX's coordination service (which receives SIGTERM on every host) picks one common
    step, so that all processes save the same checkpoint and stop together.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        yield multihost_utils.reached_preemption_sync_point
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False  # signals reach the main thread only
        return
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield lambda step: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)
