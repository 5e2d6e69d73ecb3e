"""Command line: ``python -m matching_gap.main --config=configs/default.py --workdir=DIR``.

Trains (resuming from ``--workdir`` if it holds checkpoints) and evaluates; with
``--mode=evaluate`` only runs the evaluators on the newest checkpoint of ``--workdir``;
``--mode=pictures`` only draws its pictures (``<workdir>/pictures/``); ``--mode=export``
writes its encoder as timm or Hugging Face files (``--config.export.format=timm|hf
--config.export.dir=OUT``); ``--mode=plan --topology=v4-32`` compiles the train step for a
TPU slice (or ``cpu-N``) without one and prints memory per device, FLOPs, collectives and
projected chip-hours (``matching_gap.plan``; ``<workdir>/plan.json`` with ``--workdir``).
Override any config field from the command line: ``--config.loss.epsilon=0.1``.

A mistake in the command line, the config or the data (:class:`errors.UserError`) is
reported in a line or two on stderr, before anything is written, with exit status 2. So is
a failure during a run that the user can act on: a checkpoint the storage refuses or does
not answer for, a process of a multi-host run that is gone (one line, what is kept, how to
resume); the command then exits at once, without waiting for what cannot finish.

Several hosts: run the same command on every host. ``jax.distributed`` is started from what
launched the processes (``matching_gap.launch``: a Cloud TPU VM slice's metadata server, GKE,
SLURM, Open MPI), or from ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I``; a launcher of one process starts none. The first line of every run says
which launcher was recognised and ``process i of n, d local devices of D``. The workdir must
be on storage that every host sees (a bucket or a shared file system). Such a process runs
the work in a child process and watches it (``launch.supervise``), so that a lost host ends
every survivor with one line and exit status 2 (``--distributed_heartbeat_timeout`` bounds
how long that takes), where JAX would abort with stack traces.
"""

import os

# Before anything imports TensorFlow (the input pipelines): its C++ start-up notices (oneDNN,
# CUDA not found, ...) say nothing a user of this program can act on. TensorFlow >= 2.21 prints
# its oneDNN notice through absl logging, which ignores TF_CPP_MIN_LOG_LEVEL; turning oneDNN's
# custom ops off is what silences it (TensorFlow only decodes and batches images here).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import logging as std_logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import NoReturn  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from matching_gap import config_lib, errors, launch, schema, storage  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "evaluate", "pictures", "export", "plan"], "What to run."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "--mode=plan: a Cloud TPU slice (v4-32, v5litepod-256, v5p-128, v6e-64) or cpu-N "
    "(N simulated CPU devices).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for multi-host runs that no launcher describes (Cloud TPU "
    "VM slices, GKE, SLURM and Open MPI are recognised by themselves).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(launch.MODES),
    "auto: start jax.distributed when the flags above or a launcher (Cloud TPU VM slice, "
    "GKE, SLURM, Open MPI) say this is one of several processes; on: also for one process; "
    "off: never (this host runs alone).",
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout",
    launch.DEFAULT_TIMEOUT_S,
    "Seconds to wait for every process of a multi-host run to join before stopping.",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout",
    launch.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "Seconds without a heartbeat after which a process of a multi-host run counts as lost "
    "(JAX's heartbeat timeout): the longest a survivor takes to stop.",
    lower_bound=1,
)
flags.mark_flags_as_required(["config"])

_USAGE = "usage: python -m matching_gap.main --config=configs/default.py --workdir=DIR"
USER_ERROR_STATUS = 2


def _exit_with(message: str, *, at_once: bool = False) -> NoReturn:
    """Prints the message and exits; ``at_once``: without waiting for background threads
    or exit handlers (a save in flight to storage that does not answer, a collective with a
    process that is gone), which could hold the exit for minutes or abort it."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if at_once:
        sys.stdout.flush()
        os._exit(USER_ERROR_STATUS)
    sys.exit(USER_ERROR_STATUS)


def _config_spec(argv: list[str]) -> str | None:
    """The value of ``--config`` (``path[:arg]``) on the command line, if any."""
    for i, word in enumerate(argv):
        if word.startswith(("--config=", "-config=")):
            return word.split("=", 1)[1]
        if word in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overridden_keys(argv: list[str]) -> list[str]:
    """``loss.epsilon`` for every ``--config.loss.epsilon=...`` (or ``--noconfig.x.y``)."""
    keys = []
    for word in argv:
        name = word.lstrip("-").split("=", 1)[0]
        for prefix in ("config.", "noconfig."):
            if word.startswith("-") and name.startswith(prefix):
                keys.append(name[len(prefix) :])
    return keys


def _describe_flag_error(error: Exception, argv: list[str]) -> str:
    """One or two lines for a command line that failed to parse: a missing or raising
    config file, or an unknown ``--config.*`` key with its close matches."""
    spec = _config_spec(argv)
    if spec:
        path, _, arg = spec.partition(":")
        if not os.path.isfile(path):
            return f"--config={spec}: there is no config file {path!r}."
        try:
            config = config_lib.load_config_file(path, arg)
        except Exception as e:  # noqa: BLE001 (whatever the file raised, say where)
            frames = [
                f
                for f in traceback.extract_tb(e.__traceback__)
                if os.path.abspath(f.filename) == os.path.abspath(path)
            ]
            where = f" (line {frames[-1].lineno})" if frames else ""
            return f"--config={spec}: the config file raised {type(e).__name__}{where}: {e}"
        for key in _overridden_keys(argv):
            try:
                config_lib.check_override(config, key)
            except errors.ConfigError as e:
                return str(e)
    lines = [line for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    return message if spec else f"{message}\n{_USAGE}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a command line or config file that fails becomes a short
    message and exit status 2 (instead of chained tracebacks from absl and ml_collections)."""
    try:
        remaining = flags.FLAGS(argv)
        if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
            raise errors.ConfigError("--config is not a config file")  # ml_collections defers
    except Exception as e:  # noqa: BLE001 (all of it comes from the command line)
        _exit_with(_describe_flag_error(e, argv))
    return remaining


def start_processes() -> None:
    """Joins this process to the others of its run (``matching_gap.launch``), before any JAX
    computation, and prints who started it and where it stands.

    A process of several first re-executes itself as a child and only watches it
    (``launch.supervise``): when another host is lost, it ends with one line where JAX would
    abort with stack traces; this function does not return in that parent."""
    try:
        launch.start(
            mode=_DISTRIBUTED.value,
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            timeout_s=_DISTRIBUTED_TIMEOUT.value,
            heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
            watched=True,
        )
    except errors.UserError as e:
        _exit_with(str(e))


# Libraries that log a failure with its traceback and then raise it to the run, which
# reports it in one line (a checkpoint or file the storage refuses, a storage out of reach).
_RAISE_WHAT_THEY_LOG = ("orbax", "gcsfs")


def _drop_reported_tracebacks(record: std_logging.LogRecord) -> bool:
    """Drops those libraries' log records that carry a traceback (Orbax logs one failed save
    three or four times, gcsfs each request that ran out of retries); their other messages
    are kept."""
    parts = record.pathname.split(os.sep)
    return not (record.exc_info and any(name in parts for name in _RAISE_WHAT_THEY_LOG))


# The warning for one of Orbax's abandoned reads (see _unraisable) that never started.
_ABANDONED_READ = "coroutine '_read_array_index_and_device_put' was never awaited"


def _unraisable(unraisable) -> None:
    """Python's report of an exception nobody could catch, less two kinds that say nothing.

    Orbax runs each save or restore as many TensorStore reads or writes on an asyncio loop
    of its own; when one fails, Orbax raises that failure (reported in one line) and closes
    the loop with the others still in flight (``asyncio_utils._run_sync_via_new_loop``).
    Each of those, on finishing, calls back into the closed loop from a TensorStore thread:
    "RuntimeError: Event loop is closed", about a hundred tracebacks for one failed save or
    one corrupt checkpoint. An abandoned read is then collected unfinished: Python closes it
    with ``GeneratorExit``, which Orbax's ``_read_array_index_and_device_put`` catches and
    re-raises as an ``Exception`` ("Encountered error while reading array index"). Those
    operations belong to the checkpoint that failed (never committed, or not restored), so
    nothing is lost."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    read = getattr(unraisable.object, "__qualname__", None) == "_read_array_index_and_device_put"
    if read and isinstance(error.__cause__, GeneratorExit):
        return
    sys.__unraisablehook__(unraisable)


_default_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Config warnings as one line; every other warning as Python prints it."""
    if issubclass(category, schema.ConfigWarning):
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


def run_plan(config, workdir: str | None) -> None:
    """``--mode=plan``: compiles on this machine's CPU (a TPU slice's devices come from
    libtpu, compile-only), so no accelerator is touched and ``cpu-N`` gets N devices."""
    from matching_gap import plan

    if not _TOPOLOGY.value:
        _exit_with("--mode=plan needs --topology (e.g. v4-32, v5litepod-256, v6e-64, cpu-4).")
    try:
        if workdir:
            storage.check_workdir(workdir)  # before minutes of compiling
        _, count, _ = plan.parse_topology(_TOPOLOGY.value)
        jax.config.update("jax_platforms", "cpu")
        if _TOPOLOGY.value.startswith("cpu-"):
            jax.config.update("jax_num_cpu_devices", count)
        result = plan.plan_run(config, plan.get_topology(_TOPOLOGY.value))
    except errors.UserError as e:
        _exit_with(str(e))
    print(plan.format_plan(result), flush=True)
    if workdir:
        path = plan.write_plan(workdir, result)
        print(f"Wrote {path}.", flush=True)


def main(argv):
    if len(argv) > 1:
        _exit_with(f"unexpected arguments {argv[1:]}.\n{_USAGE}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress is printed; Orbax's INFO is noise
    logging.get_absl_handler().addFilter(_drop_reported_tracebacks)  # every logger's records
    sys.unraisablehook = _unraisable
    warnings.filterwarnings("ignore", _ABANDONED_READ, RuntimeWarning)  # as _unraisable
    std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)
    warnings.showwarning = _show_warning
    try:
        config = schema.parse(config)  # the one parse; the modes check their devices
    except errors.ConfigError as e:
        _exit_with(str(e))
    if _MODE.value == "plan":
        run_plan(config, workdir)
        return
    if not workdir:
        _exit_with(f"--workdir is required.\n{_USAGE}")
    start_processes()
    try:
        storage.check_workdir(workdir)  # a gs:// bucket that is missing or out of reach
        # Imported here, so that command-line mistakes are reported without the wait.
        if _MODE.value == "evaluate":
            from matching_gap.evaluation import evaluate

            evaluate.evaluate_workdir(config, workdir)
        elif _MODE.value == "pictures":
            from matching_gap import pictures

            pictures.write_workdir_pictures(config, workdir)
        elif _MODE.value == "export":
            from matching_gap import export_run

            export_run.export_workdir(config, workdir)
        else:
            from matching_gap import train

            train.train_and_evaluate(config, workdir)
    except errors.UserError as e:
        _exit_with(str(e), at_once=getattr(e, "exit_at_once", False))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
