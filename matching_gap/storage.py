"""Where a run's files live: a local folder or a bucket (``gs://bucket/run``), behind one
path layer.

Every file under a workdir is reached through :func:`path` (an ``etils.epath.Path``, the
path type Orbax uses): local paths go to the operating system, ``gs://`` paths to Google
Cloud Storage through gcsfs, and Orbax writes the checkpoints' arrays through tensorstore.

A local GCS emulator (tests, or a dry run of a pod command) is selected the way Google's
client libraries select one: ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``. From that one
setting :func:`configure` sets what the other libraries read (see there).
"""

from __future__ import annotations

import os
import re
import threading

from etils import epath

from matching_gap import errors

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def configure() -> None:
    """Points the storage libraries at the right service; idempotent, and called by
    :func:`path` before any remote path is used.

    - epath picks TensorFlow's file system for ``gs://`` when TensorFlow is installed; that
      one takes no endpoint (it always goes to the real service), so epath is told to use
      fsspec (gcsfs), which reads ``STORAGE_EMULATOR_HOST`` itself.
    - gcsfs's listing cache is turned off: other processes (hosts) and tensorstore write to
      the same bucket behind its back, and a stale listing hides or resurrects checkpoints.
    - With an emulator: tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` instead; and gcsfs's
      support for zonal / hierarchical buckets first asks for the bucket's layout over gRPC
      (Storage Control), which an emulator does not serve: a wait of about a minute where
      that endpoint does not answer, or a warning per bucket without credentials. It is
      turned off (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, read when gcsfs is imported).
    """
    os.environ["EPATH_USE_TF"] = "false"
    # epath decides once per process (a cached check that any path, local ones too, makes
    # first): forget a decision taken before the variable was set.
    from etils.epath import gpath

    if hasattr(gpath._is_tf_installed, "cache_clear"):
        gpath._is_tf_installed.cache_clear()
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
    emulator = emulator_url()
    if emulator:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def emulator_url() -> str | None:
    """``http://host:port`` of the GCS emulator named by ``STORAGE_EMULATOR_HOST``, if any."""
    value = os.environ.get(EMULATOR_VARIABLE, "")
    if value in ("", "default"):
        return None
    return value if value.startswith(("http://", "https://")) else f"http://{value}"


def is_remote(workdir: str | os.PathLike) -> bool:
    return os.fspath(workdir).startswith("gs://")


def path(workdir: str | os.PathLike, *parts: str) -> epath.Path:
    """``workdir/parts...`` as a path of the layer (absolute when local)."""
    if is_remote(workdir):
        configure()
        return epath.Path(os.fspath(workdir), *parts)
    return epath.Path(os.path.abspath(os.fspath(workdir)), *parts)


class StorageWriteError(errors.UserError, OSError):
    """A file of the run could not be written (a bucket that refuses writes or stopped
    answering, a full disk). ``exit_at_once``: the command exits without waiting for other
    writes in flight to the same storage."""

    exit_at_once = True


def reason(error: BaseException) -> str:
    """The storage's own words for a failure, on one line: the innermost cause's, without
    the spec and response payloads TensorStore appends (`` [key='...']``)."""
    while error.__cause__ is not None and error.__cause__ is not error:
        error = error.__cause__
    text = re.split(r" \[\w+=", " ".join(str(error).split()))[0]
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__


# The longest a write to a bucket may go unanswered: gcsfs itself waits forever for a server
# that accepted the connection and stopped answering.
WRITE_WAIT_SECONDS = 120.0


class NoAnswerError(TimeoutError):
    """A call to the storage that did not return in time (it may still be running)."""


def within(seconds: float, fn) -> None:
    """Calls ``fn()`` in a thread of its own and waits at most ``seconds`` for it; raises
    what it raised, or :class:`NoAnswerError`. The thread is left behind when it does not
    return (a daemon: it does not hold the exit)."""
    done, failures = threading.Event(), []

    def call():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (raised in the waiting thread)
            failures.append(e)
        finally:
            done.set()

    threading.Thread(target=call, daemon=True, name="storage_call").start()
    if not done.wait(seconds):
        raise NoAnswerError(f"no answer within {seconds:.0f} s")
    if failures:
        raise failures[0]


def _write(target: epath.Path, write) -> None:
    """Runs ``write()`` (with a deadline for a bucket); a failure becomes one line that names
    the file and the reason."""
    try:
        within(WRITE_WAIT_SECONDS, write) if is_remote(target) else write()
    except Exception as e:  # noqa: BLE001 (a bucket's client raises more than OSError)
        if not (is_remote(target) or isinstance(e, OSError)):
            raise
        raise StorageWriteError(
            f"{target} could not be written ({reason(e)}): check the storage (space, "
            "permissions, network), then rerun the same command to resume from the last "
            "checkpoint."
        ) from e


def write_bytes(target: epath.Path, data: bytes) -> None:
    """Writes a whole file that readers never see half-written: locally through a temporary
    file and a rename; a GCS object only appears once its upload is complete."""

    def write():
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(target):
            target.write_bytes(data)
            return
        tmp = target.parent / f"{target.name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(target)

    _write(target, write)


def write_text(target: epath.Path, text: str) -> None:
    write_bytes(target, text.encode())


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Moves the folder ``source`` to ``target`` (its parent created as needed).

    A bucket has no folders, only object names: epath's rename insists that the target's
    parent folder exist, which an empty one never does there, so objects are moved by
    gcsfs (a copy and a delete of each).
    """
    if is_remote(source):
        import fsspec.core

        fs, source_path = fsspec.core.url_to_fs(os.fspath(source))
        fs.mv(source_path, fs._strip_protocol(os.fspath(target)), recursive=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


class GrowingFile:
    """A file written by appends (metric records, TensorBoard events).

    A GCS object cannot be appended to: there the whole content is kept in memory and the
    object rewritten at each :meth:`flush`. A local file is appended to in place, so that a
    reader following it (TensorBoard) keeps its position.
    """

    def __init__(self, target: epath.Path, initial: bytes = b""):
        self.path = target
        self._remote = is_remote(target)
        self._content = bytearray(initial)  # remote: everything; local: not yet written
        self.size = len(initial)
        write_bytes(target, initial)
        if not self._remote:
            self._content.clear()

    def append(self, data: bytes) -> None:
        self._content += data
        self.size += len(data)

    def flush(self) -> None:
        if self._remote:
            _write(self.path, lambda: self.path.write_bytes(bytes(self._content)))
        elif self._content:
            _write(self.path, self._append_local)

    def _append_local(self) -> None:
        with self.path.open("ab") as f:
            f.write(bytes(self._content))
        self._content.clear()


def check_workdir(workdir: str) -> None:
    """Stops early, with the fix, when a ``gs://`` workdir cannot be used: no credentials
    (without an emulator), or a bucket that does not exist. Local workdirs pass."""
    if not is_remote(workdir):
        return
    bucket = os.fspath(workdir)[len("gs://") :].split("/", 1)[0]
    if not bucket:
        raise errors.WorkdirError(f"--workdir={workdir} names no bucket: use gs://BUCKET/RUN.")
    configure()
    if emulator_url() is None:
        import google.auth
        import google.auth.exceptions

        try:
            google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise errors.WorkdirError(
                f"--workdir={workdir}: no Google Cloud credentials to reach bucket gs://{bucket}"
                ": run `gcloud auth application-default login` (a TPU VM uses its service "
                f"account), or set {EMULATOR_VARIABLE}=http://HOST:PORT for a local emulator."
            ) from e
    try:
        exists = path(f"gs://{bucket}").exists()
    except Exception as e:  # noqa: BLE001 (network or permission: say which bucket, and why)
        raise errors.WorkdirError(
            f"--workdir={workdir}: bucket gs://{bucket} cannot be reached "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): check "
            f"the network and your access to it{_emulator_hint()}."
        ) from e
    if not exists:
        raise errors.WorkdirError(
            f"--workdir={workdir}: bucket gs://{bucket} does not exist: create it "
            f"(`gcloud storage buckets create gs://{bucket}`) or fix --workdir"
            f"{_emulator_hint()}."
        )


def _emulator_hint() -> str:
    url = emulator_url()
    return f" (on the emulator at {url}, set by {EMULATOR_VARIABLE})" if url else ""
