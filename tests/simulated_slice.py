"""A Cloud TPU VM slice in a box: N workers on this CPU machine, driven through docs/tpu.md's
own commands. Standard library only (the ``gcloud`` stand-in imports it).

What stands in for what, and how close it is:

- **A worker** is a folder (its home, ``workers/<i>/home``) and an environment of its own:
  ``HOME``, a ``PATH`` without the test's virtual environment, nothing of the test's
  environment. The shell ``tpu-vm ssh`` opens on a real worker has no variable that names the
  slice; neither does this one.
- **Its GCE metadata server** is an HTTP server on 127.0.0.1 that JAX reaches through
  ``GCE_METADATA_IP``, as it does on GCE: ``/computeMetadata/v1/instance/attributes/<key>``
  with the header ``Metadata-Flavor: Google`` (403 without it), 404 for a key the worker does
  not have. It serves ``agent-worker-number``, ``worker-network-endpoints`` (the
  ``hostname:uid:ip`` triples, comma-separated, in worker order), ``accelerator-type`` and
  ``tpu-env`` (``KEY: 'value'`` lines, as on a v4 slice), the keys JAX's ``GceTpuCluster``
  and torch_xla read. The workers' addresses are 127.0.0.11, 127.0.0.12, ... (loopback).
- **The TPU-VM check** (a PCI scan for TPU chips) is made true by ``tests/tpu_vm/
  sitecustomize.py``, on the worker's ``PYTHONPATH`` only; the devices are one CPU device per
  worker (``JAX_PLATFORMS=cpu``).
- **The coordinator's port**: JAX's default 8482 on every slice; here each slice gets a free
  port (``JAX_COORDINATOR_PORT``, which JAX honours), so that two test runs on one machine
  cannot meet.
- **The bucket** is fake-gcs-server, reached through ``STORAGE_EMULATOR_HOST`` in every
  worker's environment (on a TPU VM the service account's credentials reach the real one).
- **``gcloud``** on the user's ``PATH``: ``compute tpus tpu-vm ssh NAME --worker=all|I
  --command=CMD`` runs ``bash -c CMD`` in every chosen worker's home and environment at once,
  each in a session of its own (what ``nohup ... &`` leaves running stays in it, as it stays
  on the VM); ``tpu-vm scp [--recurse] SRC NAME:DST`` and ``NAME:SRC DST`` copy to and from
  workers (``~`` and relative paths are the worker's home); ``config set`` is accepted.
  Anything else stops with a message.
- **``python3.11``** on the worker's ``PATH`` is the test's interpreter. ``python3.11 -m venv
  DIR`` makes a real virtual environment that sees the test environment's packages (which CI
  installs with ``pip install -e '.[tpu]' -c constraints.txt``, the docs' own install), and
  ``DIR/bin/pip`` records its arguments and checks them (the extra exists, the constraints
  file is there) instead of downloading: the workers have no network here.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib

HERE = pathlib.Path(__file__).resolve().parent
SITECUSTOMIZE_DIR = HERE / "tpu_vm"
STATE_VARIABLE = "SIMULATED_SLICE_STATE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- metadata


class MetadataServer(http.server.ThreadingHTTPServer):
    """One worker's GCE metadata server (instance attributes only)."""

    daemon_threads = True

    def __init__(self, attributes: dict[str, str]):
        self.attributes = attributes
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    PREFIX = "/computeMetadata/v1/instance/attributes/"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._answer(403, "Missing Metadata-Flavor:Google header.")
        key = self.path[len(self.PREFIX) :] if self.path.startswith(self.PREFIX) else None
        if key not in self.server.attributes:
            return self._answer(404, "Not found")
        self._answer(200, self.server.attributes[key])

    def _answer(self, status: int, text: str):
        body = text.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


# v4 slices: chips per worker 2x2x1; 'v4-N' has N/2 chips. Host bounds and topology as Cloud
# TPU's "TPU v4" page gives them for the sizes used here.
V4_SHAPES = {"v4-8": ("2x2x1", "1,1,1"), "v4-32": ("2x2x4", "1,1,4")}


def tpu_vm_attributes(
    accelerator: str, worker: int, ips: list[str], *, zone: str, node: str
) -> dict[str, str]:
    """What a v4 TPU VM worker's metadata server holds under ``instance/attributes/``."""
    topology, host_bounds = V4_SHAPES[accelerator]
    endpoints = ",".join(f"t1v-n-{node}-w-{j}:{1000 + j}:{ip}" for j, ip in enumerate(ips))
    env = {
        "ACCELERATOR_TYPE": accelerator,
        "CHIPS_PER_HOST_BOUNDS": "2,2,1",
        "HOST_BOUNDS": host_bounds,
        "NODE_ID": node,
        "PREEMPTIBLE": "false",
        "TOPOLOGY": topology,
        "TPU_CHIPS_PER_PROCESS_BOUNDS": "2,2,1",
        "TPU_PROCESS_BOUNDS": host_bounds,
        "TYPE": "V4",
        "WORKER_ID": str(worker),
        "ZONE": zone,
    }
    return {
        "agent-worker-number": str(worker),
        "accelerator-type": accelerator,
        "worker-network-endpoints": endpoints,
        "tpu-env": "".join(f"{k}: '{v}'\n" for k, v in env.items()),
    }


# ----------------------------------------------------------------------------- the slice


class Slice:
    """The workers of one slice, their metadata servers, and the state the stand-ins read."""

    def __init__(
        self,
        root: pathlib.Path,
        name: str,
        accelerator: str,
        num_workers: int,
        *,
        zone: str = "us-central2-b",
        extra_env: dict[str, str] | None = None,
    ):
        self.root, self.name = root, name
        self.bin = root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        _write_stand_ins(self.bin)
        ips = [f"127.0.0.{11 + i}" for i in range(num_workers)]
        self.coordinator_port = free_port()
        self.servers, self.workers = [], []
        for i in range(num_workers):
            server = MetadataServer(
                tpu_vm_attributes(accelerator, i, ips, zone=zone, node=f"{name}-{i:04d}")
            )
            home = root / name / f"worker{i}" / "home"
            home.mkdir(parents=True)
            (home.parent / "tmp").mkdir()  # the worker's /tmp
            env = {
                "HOME": str(home),
                "USER": "tpu-user",
                "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "GCE_METADATA_IP": server.address,
                "PYTHONPATH": str(SITECUSTOMIZE_DIR),
                "JAX_PLATFORMS": "cpu",
                "JAX_COORDINATOR_PORT": str(self.coordinator_port),
                "TMPDIR": str(home.parent / "tmp"),
                **(extra_env or {}),
            }
            self.servers.append(server)
            self.workers.append({"home": str(home), "env": env, "sessions": []})
        self._save()

    def _save(self):
        state = _read_state(self.root)
        state[self.name] = {"workers": self.workers}
        (self.root / "state.json").write_text(json.dumps(state, indent=1))

    def home(self, worker: int) -> pathlib.Path:
        return pathlib.Path(self.workers[worker]["home"])

    def user_env(self, base: dict[str, str]) -> dict[str, str]:
        """The user's own machine: ``gcloud`` on the ``PATH``."""
        return {**base, "PATH": f"{self.bin}:{base['PATH']}", STATE_VARIABLE: str(self.root)}

    def processes(self, worker: int, *, all_of_them: bool = False) -> list[int]:
        """The processes that ``tpu-vm ssh`` commands left on a worker (those whose parent
        has exited, now this process's children: see :func:`become_subreaper`), running or
        exited and not yet waited for; ``all_of_them``: their children too, every process
        of the worker (what a host that stops takes with it)."""
        sessions = set(_read_state(self.root)[self.name]["workers"][worker]["sessions"])
        found = []
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) not in sessions:  # (state, parent, group, session id, ...)
                continue
            if all_of_them or int(fields[1]) == os.getpid():
                found.append(int(entry.name))
        return found

    def lose_host(self, worker: int) -> None:
        """The worker's host stops: SIGKILL to every process on it, at once."""
        for pid in self.processes(worker, all_of_them=True):
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, 9)  # SIGKILL

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _read_state(root: pathlib.Path) -> dict:
    path = root / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def become_subreaper() -> None:
    """Processes that a worker's shell leaves behind (``nohup ... &``) become this process's
    children when their parents exit (Linux's PR_SET_CHILD_SUBREAPER), so that their exit
    status can be read with :func:`wait_for`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def wait_for(pids: list[int], timeout: float) -> dict[int, int]:
    """Exit status of each process (this process must be their subreaper)."""
    statuses, deadline = {}, time.time() + timeout
    while len(statuses) < len(pids):
        for pid in pids:
            if pid in statuses:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses[pid] = os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            raise TimeoutError(f"processes {sorted(set(pids) - set(statuses))} still running")
        time.sleep(0.2)
    return statuses


# ----------------------------------------------------------------------------- stand-ins


def _write_entry(script: pathlib.Path, function: str) -> None:
    """An executable that runs ``simulated_slice.<function>(argv)`` in the test's interpreter."""
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\n"
        f"import simulated_slice\nsys.exit(simulated_slice.{function}(sys.argv[1:]))\n"
    )
    script.chmod(0o755)


def _write_stand_ins(bin_dir: pathlib.Path) -> None:
    _write_entry(bin_dir / "gcloud", "gcloud")
    _write_entry(bin_dir / "python3.11", "python311")


_VALUED = ("command", "zone", "worker", "project")


def _options(words: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    """gcloud's ``--key=value`` or ``--key value`` (for the keys above), and ``--flag``."""
    positional, options, i = [], {}, 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
            if not eq and key in _VALUED:
                i += 1
                value = words[i]
            options[key] = value if key in _VALUED else True
        else:
            positional.append(word)
        i += 1
    return positional, options


def gcloud(argv: list[str]) -> int:
    """The ``gcloud`` stand-in (see the module's docstring)."""
    if argv[:2] == ["config", "set"]:
        return 0
    if argv[:3] != ["compute", "tpus", "tpu-vm"] or len(argv) < 4:
        print(f"gcloud stand-in: not simulated: gcloud {shlex.join(argv)}", file=sys.stderr)
        return 2
    verb, (positional, options) = argv[3], _options(argv[4:])
    root = pathlib.Path(os.environ[STATE_VARIABLE])
    state = _read_state(root)
    if verb == "ssh":
        name = positional[0]
        workers = _chosen(state, name, options)
        return _ssh(root, state, name, workers, str(options["command"]))
    if verb == "scp":
        source, target = positional
        remote = source if ":" in source else target
        name = remote.split(":", 1)[0]
        workers = _chosen(state, name, options)
        return _scp(state, name, workers, source, target, recurse=bool(options.get("recurse")))
    print(f"gcloud stand-in: not simulated: tpu-vm {verb}", file=sys.stderr)
    return 2


def _chosen(state: dict, name: str, options: dict) -> list[int]:
    if name not in state:
        raise SystemExit(f"ERROR: (gcloud.compute.tpus.tpu-vm) NOT_FOUND: TPU {name!r} not found")
    count = len(state[name]["workers"])
    which = str(options.get("worker", "0"))
    return list(range(count)) if which == "all" else [int(w) for w in which.split(",")]


def _ssh(root: pathlib.Path, state: dict, name: str, workers: list[int], command: str) -> int:
    procs = {}
    for i in workers:
        worker = state[name]["workers"][i]
        procs[i] = subprocess.Popen(
            ["bash", "-c", command],
            cwd=worker["home"],
            env=worker["env"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        worker["sessions"].append(procs[i].pid)
    (root / "state.json").write_text(json.dumps(state, indent=1))
    failed = 0
    for i, proc in procs.items():
        output, _ = proc.communicate()
        for line in output.splitlines():
            print(f"worker {i}: {line}", flush=True)
        failed |= proc.returncode != 0
    return int(failed)


def _worker_path(home: str, path: str) -> pathlib.Path:
    if path in ("~", ""):
        return pathlib.Path(home)
    if path.startswith("~/"):
        path = path[2:]
    if path.startswith("/"):
        raise SystemExit(f"gcloud stand-in: absolute worker paths are not simulated: {path}")
    return pathlib.Path(home) / path


def _copy(source: pathlib.Path, target: pathlib.Path, recurse: bool) -> None:
    if target.is_dir():
        target = target / source.name
    if source.is_dir():
        if not recurse:
            raise SystemExit(f"gcloud stand-in: {source} is a directory: add --recurse")
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy(source, target)


def _scp(state, name, workers, source: str, target: str, *, recurse: bool) -> int:
    for i in workers:
        home = state[name]["workers"][i]["home"]
        if ":" in target:
            _copy(pathlib.Path(source), _worker_path(home, target.split(":", 1)[1]), recurse)
        else:
            _copy(_worker_path(home, source.split(":", 1)[1]), pathlib.Path(target), recurse)
    return 0


def python311(argv: list[str]) -> int:
    """``python3.11``: the test's interpreter; ``-m venv DIR`` as the module says."""
    if argv[:2] != ["-m", "venv"]:
        os.execv(sys.executable, [sys.executable, *argv])
    target = pathlib.Path(argv[-1])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    (site,) = target.glob("lib/python3*/site-packages")
    ours = [p for p in sys.path if p.endswith("site-packages")]
    (site / "simulated_slice_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    _write_entry(target / "bin" / "pip", "pip")
    return 0


def pip(argv: list[str]) -> int:
    """A worker venv's ``pip``: records the command and checks what it names."""
    venv = pathlib.Path(sys.argv[0]).resolve().parent.parent
    with open(venv / "pip-commands.txt", "a") as f:
        f.write(shlex.join(argv) + "\n")
    if argv[:1] != ["install"]:
        return 0
    words = [w for w in argv[1:] if w not in ("-q", "--upgrade")]
    if "-c" in words:
        constraints = words[words.index("-c") + 1]
        if not os.path.isfile(constraints):
            print(f"ERROR: Could not open requirements file: {constraints}", file=sys.stderr)
            return 1
    if "-e" in words:
        match = re.fullmatch(r"(.*)\[(.*)\]", words[words.index("-e") + 1])
        project, extra = (match.group(1), match.group(2)) if match else (".", "")
        with open(os.path.join(project, "pyproject.toml"), "rb") as f:
            extras = tomllib.load(f)["project"].get("optional-dependencies", {})
        if extra and extra not in extras:
            print(f"WARNING: matching-gap does not provide the extra '{extra}'", file=sys.stderr)
            return 1
    return 0
