"""Preemption, hard kills, corrupt checkpoints and several processes, on the real command.

The subprocess tests are marked ``slow`` (each starts fresh Python processes); CI runs them
with ``pytest -m slow``.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matching_gap import checkpointing, config_lib, data, metrics, monitor, schema, train
from matching_gap import state as state_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = os.path.join(ROOT, "configs", "default.py") + ":smoke"
# The subprocesses cannot use TFDS's mock: they read 64 real Fashion-MNIST images.
QUIET = [
    "--config.train.final_eval=False",
    "--config.train.knn_every=0",
    "--config.data.source=fashion_mnist_idx",
    "--config.data.max_examples=64",
]
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR),
    reason="needs the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
)


def _load_smoke_config():
    path, arg = SMOKE.split(":")
    return config_lib.load_config_file(path, arg)


def _params(workdir, step):
    """Parameters of a checkpoint, whatever the topology it was written on."""
    config = schema.parse(_load_smoke_config())
    _, state = state_lib.create_train_state(config, state_lib.make_optimizer(config, 3, 1)[0])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "default")
    # The saved tree leaves out the unset optional fields (a matching-gap run has no centre).
    saved = checkpointing._as_saved(target)
    restored = checkpointing._from_saved(ocp.StandardCheckpointer().restore(path, saved), target)
    return [np.asarray(x) for x in jax.tree.leaves(restored.params)]


def _command(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "matching_gap.main",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        *QUIET,
        *extra,
    ]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def _wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = metrics.read_metrics(str(workdir))
        if records and records[-1]["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {workdir} after {timeout} s")


def _run(args, env=None):
    out = subprocess.run(args, capture_output=True, text=True, env=env or _env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "RESTORE_RETRY_SECONDS", 0.0)
    config = _load_smoke_config()
    config.train.final_eval = False
    config.train.knn_every = 0
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=64):
        train.train_and_evaluate(config, str(tmp_path))  # checkpoints at 2 and 3
    for path in glob.glob(str(tmp_path / "checkpoints" / "3" / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    config.optim.num_steps = 4
    with tfds.testing.mock_data(num_examples=64):
        train.train_and_evaluate(config, str(tmp_path))
    moved = os.listdir(tmp_path / "corrupt_checkpoints")
    assert len(moved) == 1 and moved[0].startswith("3-")  # kept, not deleted
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    steps = [r["step"] for r in metrics.read_metrics(str(tmp_path))]
    assert steps == [1, 2, 3, 4]  # steps 3-4 were redone from the checkpoint at step 2


@pytest.mark.slow
@needs_fashion_mnist
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        _command(
            tmp_path, "--config.optim.num_steps=100000", "--config.train.checkpoint_every=1000"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _wait_for_step(tmp_path, 5, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "rerun the same command to resume" in stdout
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
    assert len(saved) == 1 and 5 <= saved[0] < 1000  # saved on the signal, not on schedule


@pytest.mark.slow
@needs_fashion_mnist
def test_goodput_and_the_next_row_across_a_sigterm_and_a_resume(tmp_path):
    long = ["--config.optim.num_steps=100000", "--config.train.checkpoint_every=100000"]
    log = ["--config.train.log_every=7"]
    proc = subprocess.Popen(
        _command(tmp_path / "stopped", *long, *log),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _wait_for_step(tmp_path / "stopped", 8, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Goodput over 1 invocation(s), 0 restart(s)" in stdout
    (stop,) = [int(s) for s in os.listdir(tmp_path / "stopped" / "checkpoints")]
    after = ["--config.train.run_steps=14"]
    resumed = _run(_command(tmp_path / "stopped", *long, *log, *after))
    assert f"Resumed from the checkpoint at step {stop}" in resumed.stdout
    assert "Goodput over 2 invocation(s), 1 restart(s)" in resumed.stdout
    record = json.loads((tmp_path / "stopped" / "goodput.json").read_text())
    assert record["restarts"] == [
        {"resumed_from_step": stop, "reached_step": stop, "redone_steps": 0}
    ]
    parts = record["productive_step_seconds"] + record["redone_step_seconds"]
    parts += sum(record[f"{c}_seconds"] for c in monitor.CATEGORIES)
    assert parts == pytest.approx(record["wall_seconds"], rel=0.05)
    assert record["max_step"] == stop + 14
    # The same run uninterrupted: its row after the stop equals the resumed run's.
    _run(_command(tmp_path / "straight", *long, *log, f"--config.train.run_steps={stop + 14}"))
    straight = {r["step"]: r for r in metrics.read_metrics(str(tmp_path / "straight"))}
    stopped = {r["step"]: r for r in metrics.read_metrics(str(tmp_path / "stopped"))}
    row = (stop // 7 + 1) * 7  # the first log step after the stop
    assert straight[row]["train/window_steps"] == stopped[row]["train/window_steps"] == 7
    for key in ("train/loss", "train/grad_norm", "sinkhorn/sinkhorn_iterations"):
        assert stopped[row][key] == straight[row][key], key


@pytest.mark.slow
@needs_fashion_mnist
def test_sigkill_and_restart_matches_an_uninterrupted_run_bitwise(tmp_path):
    steps = ["--config.optim.num_steps=24", "--config.train.checkpoint_every=5"]
    _run(_command(tmp_path / "straight", *steps))
    proc = subprocess.Popen(
        _command(tmp_path / "killed", *steps),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _wait_for_step(tmp_path / "killed", 12, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    restarted = _run(_command(tmp_path / "killed", *steps))
    assert "Resumed from the checkpoint at step" in restarted.stdout
    straight, killed = _params(tmp_path / "straight", 24), _params(tmp_path / "killed", 24)
    assert len(straight) == len(killed) > 0
    for a, b in zip(straight, killed, strict=True):
        np.testing.assert_array_equal(a, b)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir, *args) -> list[subprocess.Popen]:
    """Starts the command as two processes (jax.distributed over gloo)."""
    port = _free_port()
    # The parent process keeps a lost run's stderr in TMPDIR: pytest's folder, not /tmp.
    tmp = os.path.dirname(os.path.abspath(workdir))
    env = _env(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", TMPDIR=tmp)
    command = lambda i: _command(
        workdir,
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
    )
    return [
        subprocess.Popen(
            command(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for i in range(2)
    ]


def _two_processes(workdir, *args) -> list[tuple[str, str]]:
    """Runs the command as two processes; their (stdout, stderr)."""
    procs = _start_two_processes(workdir, *args)
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.slow
@needs_fashion_mnist
def test_two_processes_train_the_same_model_as_one(tmp_path):
    _run(_command(tmp_path / "one"))
    outputs = _two_processes(tmp_path / "two")
    assert "on 2 cpu device(s)" in outputs[0][0]
    one, two = (
        metrics.read_metrics(str(tmp_path / "one")),
        metrics.read_metrics(str(tmp_path / "two")),
    )
    np.testing.assert_allclose(
        [r["train/loss"] for r in one], [r["train/loss"] for r in two], rtol=1e-5
    )
    for a, b in zip(_params(tmp_path / "one", 3), _params(tmp_path / "two", 3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


class _Lines:
    """A process's output, read line by line as it comes (a thread per stream)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    def text(self, timeout=30) -> str:
        self._thread.join(timeout)
        return "".join(self.lines)


LOST_STEPS = ["--config.optim.num_steps=30", "--config.train.checkpoint_every=5"]
HEARTBEAT_S = 10  # --distributed_heartbeat_timeout: when a survivor not in a collective stops
NOISE = ("Check failure", "Fatal Python error", "Traceback", "client.h", "*** ")


@pytest.fixture(scope="module")
def uninterrupted_two_processes(tmp_path_factory):
    """The checkpoint of step 30 of a 2-process run that nothing interrupted."""
    workdir = tmp_path_factory.mktemp("straight")
    _two_processes(workdir, *LOST_STEPS)
    return _params(workdir, 30)


# What the survivor is doing when the other host is lost: the flags that make the moment
# last, and how the test knows it has come.
MOMENTS = {
    "compiling": [],  # after the "Training with" line, before the first step
    "training": [],  # past step 12
    "saving": ["--config.train.checkpoint_every=1"],  # a checkpoint's folder is being written
    # the k-NN monitor at step 12 (after its row; no save), over 5,000 + 5,000 images
    "evaluating": ["--config.train.knn_every=12", "--config.data.eval_max_examples=5000"],
}


def _await_moment(moment, workdir, out, survivor) -> str:
    """Returns once ``survivor`` is at ``moment``; what the test saw."""
    deadline = time.time() + 300
    while True:
        assert survivor.poll() is None and time.time() < deadline, moment
        if moment == "compiling" and any("] Training with" in line for line in out.lines):
            time.sleep(0.5)
            return "the Training line"
        if moment in ("training", "evaluating"):
            records = metrics.read_metrics(str(workdir))
            if records and records[-1]["step"] >= 12:
                return f"the row of step {records[-1]['step']}"
        if moment == "saving":
            folder = workdir / "checkpoints"
            names = os.listdir(folder) if folder.is_dir() else []
            writing = [n for n in names if "tmp" in n and int(n.split(".")[0]) >= 12]
            if writing:
                return f"checkpoints/{writing[0]}"
        time.sleep(0.002 if moment == "saving" else 0.05)


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("killed", [0, 1])
def test_a_host_lost_the_survivor_ends_with_one_line_then_both_resume_bitwise(
    tmp_path, killed, moment, uninterrupted_two_processes
):
    """One host of two lost (its processes SIGKILLed), process 0 (the coordinator's host)
    or the last one, while the survivor compiles, trains, saves a checkpoint or evaluates:
    the survivor exits with status 2 within the bound and one line on stderr (no C++ abort,
    no stack); rerun on both, the run resumes from the newest checkpoint and ends bitwise
    equal to an uninterrupted run."""
    beat = f"--distributed_heartbeat_timeout={HEARTBEAT_S}"
    procs = _start_two_processes(tmp_path, *LOST_STEPS, *MOMENTS[moment], beat)
    survivor = 1 - killed
    out = _Lines(procs[0].stdout)  # process 0 prints the progress
    seen = _await_moment(moment, tmp_path, out, procs[survivor])
    procs[killed].kill()  # SIGKILL, as a host that stops: no handler runs
    lost = time.perf_counter()
    procs[survivor].wait(timeout=300)
    waited = time.perf_counter() - lost
    stderr = procs[survivor].stderr.read()
    procs[killed].wait()
    if moment == "compiling":
        assert not metrics.read_metrics(str(tmp_path))  # the kill came before any step
    print(
        f"\nProcess {killed} lost while {moment} (at {seen}): the survivor exited with status "
        f"{procs[survivor].returncode} {waited:.1f} s later, with: {stderr.strip()}"
    )
    assert procs[survivor].returncode == 2, stderr[-3000:]
    # At once from a collective or from the coordinator's loss; else after the heartbeats.
    assert waited < (10 if killed == 0 or moment == "training" else HEARTBEAT_S + 20), waited
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: Process {survivor} of 2 stopped: "), lines[0]
    assert "Rerun the same command on every worker to resume" in lines[0], lines[0]
    assert "recreate the slice" in lines[0], lines[0]
    assert not any(word in stderr for word in NOISE), stderr[-3000:]
    saved = [int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()]
    restarted = _two_processes(tmp_path, *LOST_STEPS, beat)
    if saved:
        assert f"Resumed from the checkpoint at step {max(saved)} in" in restarted[0][0]
    for a, b in zip(uninterrupted_two_processes, _params(tmp_path, 30), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@needs_fashion_mnist
def test_two_processes_evaluate_the_whole_split_as_one(tmp_path):
    """``--mode=evaluate`` on all 70k Fashion-MNIST images: each process extracts its own
    share; the k-NN, the ``features`` probe and the ``augmented`` probe agree with one
    process."""
    _run(_command(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    evaluate_args = [
        "--mode=evaluate",
        "--config.eval.protocols=knn,features,augmented",
        "--config.eval.batch_size=1024",
        "--config.eval.probe_epochs=3",
        "--config.eval.augmented_epochs=1",
        "--config.eval.augmented_batch_size=1024",
    ]
    _run(_command(tmp_path / "one", *evaluate_args))
    _two_processes(tmp_path / "two", *evaluate_args)
    one, two = (
        json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("one", "two")
    )
    assert one["knn"]["train_examples"] == two["knn"]["train_examples"] == 60_000
    assert one["knn"]["top1"] == two["knn"]["top1"]
    for protocol in ("features", "augmented"):
        assert one[protocol]["learning_rate"] == two[protocol]["learning_rate"], protocol
        assert one[protocol]["top1"] == pytest.approx(two[protocol]["top1"], abs=2e-3), protocol


@pytest.mark.slow
@needs_fashion_mnist
def test_augmented_probe_killed_mid_way_resumes_to_the_same_heads(tmp_path):
    """The ``augmented`` probe on all 60k images, SIGKILLed after its first checkpoint, then
    rerun: it resumes from that checkpoint and ends with the uninterrupted run's heads."""
    _run(_command(tmp_path / "straight"))
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    probe = [
        "--mode=evaluate",
        "--config.eval.protocols=augmented",
        "--config.eval.batch_size=1024",
        "--config.eval.augmented_batch_size=1024",
        "--config.eval.augmented_epochs=4",
        "--config.eval.augmented_checkpoint_every=20",
    ]
    _run(_command(tmp_path / "straight", *probe))
    proc = subprocess.Popen(
        _command(tmp_path / "killed", *probe),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    saved = tmp_path / "killed" / "linear_eval" / "checkpoints"
    deadline = time.time() + 300
    while not (saved.is_dir() and any(name.isdigit() for name in os.listdir(saved))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "evaluation.json").exists()
    restarted = _run(_command(tmp_path / "killed", *probe))
    assert re.search(r"Augmented linear probe: .* from step [1-9]", restarted.stdout)
    straight, killed = (
        json.loads((tmp_path / name / "evaluation.json").read_text())
        for name in ("straight", "killed")
    )
    assert killed["augmented"]["finished"] and killed["augmented"]["step"] == 232
    assert killed["augmented"]["heads"] == straight["augmented"]["heads"]


def _write_large_jpeg_folder(root, count: int) -> int:
    """``root/train/{a,b}/*.JPEG``: ``count`` smooth non-square images of 480 to 960 pixels a
    side (ImageNet's sizes and more); returns their decoded size in bytes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        h, w = (int(v) for v in rng.integers(480, 960, 2))
        y, x = np.mgrid[0:h, 0:w]
        base = (x * rng.uniform(0.1, 0.5) + y * rng.uniform(0.1, 0.5)) % 256
        pixels = np.stack([base, base[::-1], base[:, ::-1]], -1).astype(np.uint8)
        folder = root / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=75)
        total += h * w * 3
    return total


@pytest.mark.slow
def test_a_streamed_folder_killed_and_resumed_trains_bitwise_in_bounded_memory(tmp_path):
    """3,000 JPEGs streamed through a short run: SIGKILLed at step 12 and restarted, the run
    ends with the parameters of an uninterrupted one, and the process holds no more than a
    run over 300 of the same files does, give or take a quarter of the decoded images (a
    pipeline that kept its decoded images, in a cache or a shuffle buffer after decoding,
    would hold all or a third of them). The fixed cost (TensorFlow, JAX, XLA's compilations,
    tf.data's autotuned buffers) is measured by that second run rather than assumed: it is
    about a third of the decoded images and moves by a few hundred MB from run to run."""
    decoded = _write_large_jpeg_folder(tmp_path / "images", 3000)
    flags = [
        "--config.data.source=image_folder",
        f"--config.data.data_dir={tmp_path / 'images'}",
        "--config.data.in_memory=False",
        "--config.optim.batch_size=64",
        "--config.optim.num_steps=24",
        "--config.train.checkpoint_every=5",
    ]
    all_files = "--config.data.max_examples=0"

    def peak_memory(workdir, *extra):
        run = subprocess.Popen(
            _command(workdir, *flags, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        _, status, usage = os.wait4(run.pid, 0)
        assert status == 0, run.stderr.read()[-3000:]
        return usage.ru_maxrss * 1024  # kilobytes on Linux

    fixed = peak_memory(tmp_path / "small", "--config.data.max_examples=300")
    peak = peak_memory(tmp_path / "straight", all_files)
    assert peak - fixed < decoded / 4, (peak, fixed, decoded)
    proc = subprocess.Popen(
        _command(tmp_path / "killed", *flags, all_files),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _wait_for_step(tmp_path / "killed", 12, proc)
    proc.kill()
    proc.communicate()
    restarted = _run(_command(tmp_path / "killed", *flags, all_files))
    assert "Resumed from the checkpoint at step" in restarted.stdout
    a, b = _params(tmp_path / "straight", 24), _params(tmp_path / "killed", 24)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
