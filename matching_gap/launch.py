"""How this process was started, and ``jax.distributed`` from it, before any JAX computation.

The processes of a multi-host run find each other through whatever started them:

- a Cloud TPU VM slice (``gcloud compute tpus tpu-vm create``, a queued resource): each
  worker's GCE metadata server (``agent-worker-number``, ``worker-network-endpoints``,
  ``tpu-env``); nothing in the environment of the shell ``tpu-vm ssh --worker=all`` opens
  says so;
- GKE: ``TPU_WORKER_HOSTNAMES`` (or ``TPU_PROCESS_ADDRESSES``) and ``TPU_WORKER_ID``;
- SLURM and Open MPI: their variables;
- anything else: ``--coordinator_address``, ``--num_processes`` and ``--process_id``.

JAX knows the first three: ``jax.distributed.initialize()`` without arguments asks the
cluster classes of ``jax._src.clusters``. :func:`detect` asks the same classes, in JAX's
order, with JAX's code, and adds one decision: a launcher of a single process (a single-host
TPU VM, a Colab or Kaggle runtime, one SLURM task) starts no coordinator and waits on none.
``jax._src.clusters`` is private: ``tests/test_launch.py`` pins what is used of it.

:func:`initialize` joins the processes within a bounded time: a process that cannot reach
the coordinator (a firewall, a worker not started) stops with one line that names the
address and what to check, where JAX would abort with a C++ stack trace.

``python -m matching_gap.launch`` runs the same start-up as the training command and
prints what it found: the check of ``docs/tpu.md`` before a launch.

**A lost host, and why a run of several processes is watched by a parent process.** When a
process of the run is gone (its host stopped, was preempted or lost its network), every
surviving process must end within a bounded time with one line that says so, that the
checkpoints are safe and what to do. What JAX 0.10 offers cannot give that line:

- the coordination service's client (every process) aborts its process from C++ as soon as
  its error polling or its heartbeats fail (``client.h:80] Terminating process because the
  JAX distributed service detected fatal errors``, a ``Check failure`` stack, then Python's
  faulthandler dump of every thread): at once when process 0 (which runs the service) is
  gone, after the heartbeat timeout when another one is. That abort races the collective's
  Python error that :func:`matching_gap.train` turns into one line, and often wins;
- ``missed_heartbeat_callback``, the client's option that replaces the abort, is not passed
  by ``jax.distributed.initialize``, and given to the binding directly (jaxlib 0.10.2) the
  process dies in ``std::bad_cast`` when it fires (tried);
- ``jax_enable_recoverability`` is an option of the service (process 0) that lets it outlive
  a failed task: nothing when process 0 itself is the one lost;
- ``heartbeat_timeout_seconds`` only sets when the abort comes (``--distributed_heartbeat
  _timeout``, JAX's 100 s by default: the bound on how long a survivor that is not in a
  collective with the lost process takes to notice).

So, as torchrun's agent does, :func:`supervise`: the command, when it finds a coordinator,
re-executes itself as a child and watches it. The child's stdout is the command's (it
streams as it is); its stderr is relayed line by line, each line held :data:`HOLD_S`
seconds, and kept whole in a file. When the child reports JAX's fatal error, the parent
stops it, drops what was held (the C++ stack, the thread dumps), prints one line
(:func:`lost_process_message`) that names the file, and exits with
:data:`LOST_PROCESS_STATUS`. SIGTERM (a preemption notice) is passed on to the child, which
checkpoints as usual; the child dies with its parent (``PR_SET_PDEATHSIG``). One process (no
coordinator) runs as before, with no parent.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import jax

from matching_gap import errors

DEFAULT_TIMEOUT_S = 300  # JAX's own initialization_timeout
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's own heartbeat_timeout_seconds
MODES = ("auto", "on", "off")  # --distributed

# JAX's cluster names, in words; another (a newer JAX's) is shown by its class name.
_LAUNCHERS = {
    "gcetpu": "Cloud TPU VM slice (GCE metadata server)",
    "gketpu": "GKE TPU slice (TPU_WORKER_HOSTNAMES)",
    "slurm": "SLURM",
    "ompi": "Open MPI",
}


@dataclasses.dataclass(frozen=True)
class Launch:
    """What started this process. ``coordinator`` (``HOST:PORT`` of process 0) is None
    when no ``jax.distributed`` is started: one process."""

    launcher: str
    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None


def _cluster_types() -> list:
    """JAX's cluster environments in the order ``jax.distributed.initialize()`` tries them
    (the opt-in ones, such as mpi4py, are never tried without being named)."""
    from jax._src import clusters

    return [c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method]


def _present(cluster) -> bool:
    """``is_env_present``, with a failure to ask (a metadata server that does not answer,
    a missing optional package) read as 'not this one', as a warning-free no."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(cluster.is_env_present())
        except Exception:  # noqa: BLE001 (requests, kubernetes, ... each raise their own)
            return False


def _launcher_name(cluster) -> str:
    return _LAUNCHERS.get(cluster.name, cluster.__name__)


def detect(
    *,
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> Launch:
    """What started this process, and whether it is one of several.

    ``mode``: ``auto`` starts ``jax.distributed`` for several processes; ``on`` also for a
    launcher of one process (or fails when none is recognised); ``off`` never.
    Raises :class:`errors.ConfigError` for flags that do not fit, and for a launcher that was
    recognised but could not say how many processes there are.
    """
    if mode == "off":
        return Launch("none (--distributed=off)")
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise errors.ConfigError(
                "--coordinator_address needs --num_processes and --process_id."
            )
        if not 0 <= process_id < num_processes:
            raise errors.ConfigError(
                f"--process_id={process_id} must be in 0..{num_processes - 1} "
                f"(--num_processes={num_processes})."
            )
        return Launch(
            "--coordinator_address flags",
            num_processes,
            process_id,
            coordinator_address,
        )
    cluster = next((c for c in _cluster_types() if _present(c)), None)
    if cluster is None:
        if mode == "on":
            raise errors.ConfigError(
                "--distributed=on, but no launcher that JAX recognises started this process "
                "(Cloud TPU VM, GKE, SLURM, Open MPI): pass --coordinator_address=HOST:PORT "
                "--num_processes=N --process_id=I."
            )
        return Launch("none (one process)")
    name = _launcher_name(cluster)
    try:
        count = cluster.get_process_count()
        if count == 1 and mode == "auto":
            return Launch(name)
        index = cluster.get_process_id()
        port = os.environ.get("JAX_COORDINATOR_PORT")
        address = cluster.get_coordinator_address(
            timeout_secs=timeout_s, override_coordinator_port=port
        )
    except Exception as e:  # noqa: BLE001 (metadata, environment: whatever the launcher gave)
        raise errors.ConfigError(
            f"Started by {name}, but could not read the processes of the run from it: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}. Pass "
            "--coordinator_address=HOST:PORT --num_processes=N --process_id=I instead."
        ) from e
    return Launch(name, count, index, address)


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            return True
    except OSError:
        return False


def _not_joined_message(launch: Launch, address: str, timeout_s: int) -> str:
    """``address``: the coordinator's (a run of several processes has one)."""
    i, n = launch.process_id, launch.num_processes
    port = address.rpartition(":")[2]
    start = (
        f"process {i} of {n} (launcher: {launch.launcher}) waited {timeout_s} s for the other "
        f"processes at the coordinator {address}"
    )
    if i != 0 and not _reachable(address):
        start = (
            f"process {i} of {n} (launcher: {launch.launcher}) could not reach the coordinator at "
            f"{address} (process 0) within {timeout_s} s"
        )
    return (
        f"{start}. Check that the same command was started on every worker (all {n}: "
        f"--worker=all), that process 0 is up, and that the workers reach each other on "
        f"TCP port {port} (the network's firewall). --distributed_timeout=S waits longer."
    )


def initialize(
    launch: Launch,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> None:
    """``jax.distributed.initialize`` for a run of several processes (nothing for one).

    JAX aborts the process (a C++ check failure) when the processes do not all join within
    its timeout; a watchdog stops it first, with one line and exit status 2."""
    address = launch.coordinator
    if address is None:
        return

    def give_up():
        message = _not_joined_message(launch, address, timeout_s)
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            initialization_timeout=timeout_s + 60,  # the watchdog speaks first
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    finally:
        watchdog.cancel()


def describe(launch: Launch) -> str:
    """The run's first line: who started it and where this process stands in it."""
    return (
        f"Launcher: {launch.launcher}; process {jax.process_index()} of "
        f"{jax.process_count()}, {jax.local_device_count()} local devices of "
        f"{jax.device_count()}."
    )


def start(
    *,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    watched: bool = False,
    **flags,
) -> Launch:
    """:func:`detect` (``flags`` are its keywords), :func:`initialize`, then the run's first
    line: what the training command and ``python -m matching_gap.launch`` both do first.

    ``watched`` (the training command): a process of several first runs the command again
    as a child and only watches it (:func:`supervise`), exiting with the child's status; it
    does not return in that parent."""
    launch = detect(timeout_s=timeout_s, **flags)
    if watched and launch.coordinator is not None and not supervised():
        sys.exit(supervise(launch))
    initialize(launch, timeout_s, heartbeat_timeout_s)
    print(describe(launch), flush=True)
    return launch


# ----------------------------------------------------------------------------- a lost host

LOST_PROCESS_STATUS = 2  # the status of every error a user can act on
HOLD_S = 1.0  # how long a line of the child's stderr waits before it is relayed
SUPERVISED_VARIABLE = "MATCHING_GAP_SUPERVISED"  # set in the child's environment
# The start of the line JAX's client prints before it aborts the process.
_JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
# What that line says when process 0 (the service) is gone, and when others are.
_LEADER_GONE = ("leader task was preempted", "Failed to send RPC to coordination service")
_UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)")


def lost_process_message(
    index: int, count: int, *, lost: str = "another process", saved: str, detail: str = ""
) -> str:
    """The line a surviving process ends with: who is gone, what is kept, what to do.
    ``saved``: what is safe (the newest checkpoint, or that none was written yet)."""
    return (
        f"Process {index} of {count} stopped: {lost} is gone (its host stopped, was preempted "
        f"or lost its network); {saved}. Rerun the same command on every worker to resume; "
        "if that host does not come back, recreate the slice (or replace the host) first."
        + (f" {detail}" if detail else "")
    )


def supervised() -> bool:
    """Whether this process is the child that :func:`supervise` started."""
    return os.environ.get(SUPERVISED_VARIABLE) == "1"


def _lost_name(report: str) -> str:
    """Which process is gone, from JAX's fatal report (``another process`` if it does not
    say)."""
    if any(words in report for words in _LEADER_GONE):
        return "process 0 (the coordinator)"
    found = _UNHEALTHY.search(report)
    if found:
        indices = [int(i) for i in re.findall(r"\d+", found.group(1))]
        return ("process " if len(indices) == 1 else "processes ") + ", ".join(
            str(i) for i in indices
        )
    return "another process"


class _Relay:
    """The child's stderr: every line into a file at once, and to this process's stderr
    after :data:`HOLD_S`, until JAX's fatal report is seen (what follows it, and what is
    still held, is the abort's noise)."""

    def __init__(self, stream, path: str):
        self.fatal = False
        self._held: collections.deque[tuple[float, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._report: list[bytes] = []
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, b""):
            with self._lock:
                if self._file.closed:  # a grandchild kept the stream open: read no more
                    return
                self._file.write(line)
                self._file.flush()
                if _JAX_FATAL.encode() in line:
                    self.fatal = True
                if self.fatal:
                    self._report.append(line)
                else:
                    self._held.append((time.monotonic(), line))

    def release(self, *, all_lines: bool = False) -> None:
        """Relays the lines held long enough (``all_lines``: every one), unless fatal."""
        out = []
        with self._lock:
            now = time.monotonic()
            while self._held and not self.fatal:
                if not all_lines and now - self._held[0][0] < HOLD_S:
                    break
                out.append(self._held.popleft()[1])
        if out:
            sys.stderr.write(b"".join(out).decode(errors="replace"))
            sys.stderr.flush()

    def report(self) -> str:
        with self._lock:
            return b"".join(self._report[:20]).decode(errors="replace")

    def close(self, timeout_s: float = 5.0) -> None:
        self._thread.join(timeout_s)  # the end of the child's stderr
        with self._lock:
            self._file.close()


def _die_with_parent() -> None:
    """In the child, before it runs: SIGKILL when the parent dies (Linux), so that a killed
    parent does not leave a trainer behind."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def supervise(launch: Launch, command: list[str] | None = None) -> int:
    """Runs ``command`` (default: this command again) as a child process and watches it
    (see the module's docstring); returns the status to exit with: the child's, or
    :data:`LOST_PROCESS_STATUS` with one line on stderr when JAX reported a lost process."""
    sys.stdout.flush()
    command = command or [sys.executable, *sys.orig_argv[1:]]
    env = {**os.environ, SUPERVISED_VARIABLE: "1"}
    path = os.path.join(
        tempfile.gettempdir(), f"matching_gap-process{launch.process_id}-{os.getpid()}.stderr"
    )
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    relay = _Relay(child.stderr, path)

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):  # the child has just exited
            child.send_signal(signum)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),  # the child checkpoints
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),  # Ctrl-C reaches both
    }
    status = None
    try:
        while status is None and not relay.fatal:
            try:
                status = child.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                relay.release()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if relay.fatal:  # the abort's stack traces add nothing to the line below
        child.kill()
        child.wait()
    relay.close()
    if not relay.fatal and status is not None:
        relay.release(all_lines=True)
        os.remove(path)  # every line was relayed
        return status if status >= 0 else 128 - status  # a signal: as a shell says it
    message = lost_process_message(
        launch.process_id,
        launch.num_processes,
        lost=_lost_name(relay.report()),
        saved="the checkpoints written so far are safe",
        detail=f"(JAX's report: {path})",
    )
    print(f"error: {message}", file=sys.stderr, flush=True)
    return LOST_PROCESS_STATUS


def main(argv: list[str]) -> int:
    """The training command's start-up alone, then one gather over every process to show
    that they form one run."""
    parser = argparse.ArgumentParser(
        prog="python -m matching_gap.launch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--distributed", choices=MODES, default="auto")
    parser.add_argument("--distributed_timeout", type=int, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args(argv)
    try:
        start(
            mode=args.distributed,
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            timeout_s=args.distributed_timeout,
        )
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        indices = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index()))
        print(f"Processes {sorted(int(i) for i in indices)} answered.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
