"""docs/tpu.md rehearsed on a simulated Cloud TPU VM slice, from the page's own commands.

``tests/simulated_slice.py`` stands up the slice: 4 workers of one CPU device each, each with
a GCE metadata server of its own and the TPU-VM check true, the bucket in fake-gcs-server,
and ``gcloud`` / ``python3.11`` stand-ins on the ``PATH`` (its docstring says what stands in
for what). The commands are read from docs/tpu.md every time, never retyped here: the
variables block at the top, section 3 (copy, install, check), 5 (launch), 6 (watch), 7 (its
claim: a SIGTERM to every worker), 8 (evaluate) and 9 (export). Two substitutions, each
checked to find its text, make the paper's run a few CPU seconds:

- ``--config=configs/vitb16.py`` becomes the demo's smallest variant
  (``configs/default.py:smoke``, a 2-block ViT of width 32) with a fixed number of steps on
  256 Fashion-MNIST images;
- ``--config.data.data_dir=gs://$BUCKET/tensorflow_datasets`` (ImageNet in the bucket) is
  dropped: the demo reads the Fashion-MNIST IDX files from each worker's own disk, as the
  page's JPEG-folder variant reads ImageNet.

For the uninterrupted run that the resumed one is compared with, the workdir
``gs://$BUCKET/vitb16`` becomes ``gs://$BUCKET/straight``. Marked ``slice``: CI runs it in
``.ci/run`` (``pytest -m slice``) beside the default suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import simulated_slice
from test_storage import emulator, emulator_url, list_objects  # noqa: F401 (fixtures)

from matching_gap import data, metrics, storage

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "tpu.md"
STEPS, CHECKPOINT_EVERY = 240, 40
DEMO = " ".join(
    [
        "--config=configs/default.py:smoke",
        "--config.data.source=fashion_mnist_idx",
        "--config.data.max_examples=256",
        "--config.data.eval_max_examples=256",
        f"--config.optim.num_steps={STEPS}",
        f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
        "--config.train.log_every=20",
        "--config.train.final_eval=False",
        "--config.train.knn_every=0",
        "--config.eval.probe_epochs=3",
    ]
)
RECIPE = "--config=configs/vitb16.py"
IMAGENET = " --config.data.data_dir=gs://$BUCKET/tensorflow_datasets"

pytestmark = [
    pytest.mark.slice,
    pytest.mark.skipif(
        not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR),
        reason="needs the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
    ),
]


# ----------------------------------------------------------------------------- the page


def doc_blocks() -> dict[str, list[str]]:
    """The page's ```bash blocks by section: ``"intro"`` before the first heading, then the
    number of each numbered heading (``"3"`` for ``## 3. ...``)."""
    blocks, section = {}, "intro"
    lines, i = DOC.read_text().splitlines(), 0
    while i < len(lines):
        heading = re.match(r"## (\d+)\.", lines[i])
        if heading:
            section = heading.group(1)
        elif lines[i].startswith("## "):
            section = lines[i][3:].strip()
        if lines[i].strip() == "```bash":
            end = lines.index("```", i + 1)
            blocks.setdefault(section, []).append("\n".join(lines[i + 1 : end]))
            i = end
        i += 1
    return blocks


def doc_quote(section: str, start: str) -> str:
    """The inline code span of a section's prose that begins with ``start``."""
    text = DOC.read_text().split(f"\n## {section}. ", 1)[1].split("\n## ", 1)[0]
    (span,) = re.findall(rf"`({re.escape(start)}[^`]*)`", text.replace("\n", " "))
    return span


def same_shape(doc_line: str, printed: str) -> bool:
    """Equal up to the numbers (a v4-32's 16 devices in the docs, 4 here)."""
    return re.sub(r"\d+", "N", doc_line) == re.sub(r"\d+", "N", printed)


def substitute(block: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert old in block, f"docs/tpu.md no longer has {old!r} in:\n{block}"
        block = block.replace(old, new)
    return block


def demo(block: str, *more: tuple[str, str]) -> str:
    """A block with the demo in place of the recipe (see the module's docstring)."""
    return substitute(block, (RECIPE, DEMO), *more)


class User:
    """The user's machine: a checkout of the project (this working tree, committed) and a
    shell that runs the page's variables block before each block."""

    def __init__(self, tmp: pathlib.Path, the_slice: simulated_slice.Slice, variables: str):
        self.checkout = tmp / "checkout"
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, files):
            source, target = ROOT / name.decode(), self.checkout / name.decode()
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
        git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.com"]
        for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "checkout"]):
            subprocess.run([*git, *command], cwd=self.checkout, check=True)
        self.env = the_slice.user_env(
            {"PATH": os.environ["PATH"], "HOME": str(tmp / "user"), "LANG": "C.UTF-8"}
        )
        self.variables = variables

    def run(self, block: str, timeout: float = 900) -> str:
        out = subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{self.variables}\n{block}"],
            cwd=self.checkout,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, f"{block}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        return out.stdout


def create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=x",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=30).read()


def wait_for_workers(the_slice, timeout: float = 600) -> list[int]:
    """Exit status of every process that a launch left on the workers, in worker order."""
    pids = [pid for w in range(len(the_slice.workers)) for pid in the_slice.processes(w)]
    statuses = simulated_slice.wait_for(pids, timeout)
    return [statuses[p] for p in pids]


def worker_log(the_slice, worker: int, name: str = "run.log") -> str:
    return (the_slice.home(worker) / "matching-gap" / name).read_text()


def params(path) -> list[np.ndarray]:
    """A checkpoint's parameters, restored onto this process's first device (the slice's
    4 processes wrote it)."""
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = checkpointer.metadata(path / "default").item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    restored = checkpointer.restore(path / "default", target)
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def losses(workdir: str) -> dict[int, float]:
    rows = [r for r in metrics.read_metrics(workdir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metric rows written twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows}


# What a survivor's output must not hold: JAX's C++ abort, its stack, Python's dumps.
NOISE = ("Check failure", "Fatal Python error", "Traceback", "client.h", "*** ")
LOST_BOUND_S = 30  # a survivor in a collective with the lost process, or without process 0


def lose_host(the_slice, lost: int) -> str:
    """Stops a worker's host (every process on it, SIGKILL) and checks the survivors: each
    exits with status 2 within :data:`LOST_BOUND_S`, its ``run.log`` free of stack traces and
    ending with the one line of docs/tpu.md's "A lost host". Returns what they printed."""
    survivors = [w for w in range(len(the_slice.workers)) if w != lost]
    watched = {w: the_slice.processes(w) for w in survivors}
    assert all(watched.values()), watched
    the_slice.lose_host(lost)
    start = time.perf_counter()
    statuses = simulated_slice.wait_for([p for w in survivors for p in watched[w]], 300)
    took = time.perf_counter() - start
    deadline = time.time() + 30  # the lost worker's processes, reaped as they reach us
    while the_slice.processes(lost, all_of_them=True):
        for pid in the_slice.processes(lost, all_of_them=True):
            with contextlib.suppress(ChildProcessError):  # not yet handed to this process
                os.waitpid(pid, os.WNOHANG)
        assert time.time() < deadline
        time.sleep(0.1)
    assert sorted(set(statuses.values())) == [2], statuses
    assert took < LOST_BOUND_S, took
    lines = []
    for w in survivors:
        log = worker_log(the_slice, w)
        assert not any(word in log for word in NOISE), log[-3000:]
        last = log.strip().splitlines()[-1]
        assert last.startswith(f"error: Process {w} of 4 stopped: "), log[-3000:]
        assert " is gone " in last and "Rerun the same command on every worker" in last, last
        lines.append(f"worker {w}: {last}")
    return f"worker {lost}'s host lost: the others exited 2 within {took:.1f} s:\n" + "\n".join(
        lines
    )


# ----------------------------------------------------------------------------- the rehearsal


def test_docs_tpu_md_on_a_simulated_v4_32_slice(tmp_path, emulator):  # noqa: F811
    started = time.perf_counter()
    simulated_slice.become_subreaper()
    blocks = doc_blocks()
    variables = blocks["intro"][1]
    name = re.search(r"\bNAME=(\S+)", variables).group(1)
    bucket = re.search(r"\bBUCKET=(\S+)", variables).group(1)
    create_bucket(emulator, bucket)
    the_slice = simulated_slice.Slice(
        tmp_path / "cloud", name, "v4-32", 4, extra_env={storage.EMULATOR_VARIABLE: emulator}
    )
    user = User(tmp_path, the_slice, variables)
    report = []
    try:
        # 3. The repository and its environment on every worker, then the check.
        install, check = blocks["3"]
        user.run(install)
        for w in range(4):
            pip = (the_slice.home(w) / "matching-gap" / ".venv" / "pip-commands.txt").read_text()
            assert "install -q -e '.[tpu]' -c constraints.txt" in pip, pip
        out = user.run(check)
        report.append(out)
        for w in range(4):
            assert (
                f"worker {w}: Launcher: Cloud TPU VM slice (GCE metadata server); "
                f"process {w} of 4, 1 local devices of 4." in out
            ), out
            assert f"worker {w}: Processes [0, 1, 2, 3] answered." in out, out

        # 5. The launch, uninterrupted, into gs://$BUCKET/straight. gcloud returns at once.
        (launch,) = [b for b in blocks["5"] if RECIPE in b]  # the paper's run
        start = time.perf_counter()
        user.run(demo(launch, (IMAGENET, ""), ("gs://$BUCKET/vitb16", "gs://$BUCKET/straight")))
        assert time.perf_counter() - start < 30
        assert all(the_slice.processes(w) for w in range(4))
        assert wait_for_workers(the_slice) == [0, 0, 0, 0], worker_log(the_slice, 0)
        first_line = worker_log(the_slice, 2).splitlines()[0]
        assert same_shape(doc_quote("5", "Launcher: "), first_line), first_line
        straight = losses(f"gs://{bucket}/straight")
        assert sorted(straight) == list(range(20, STEPS + 1, 20))

        # The same run as one process with 4 devices: the same losses, each row once.
        reference = subprocess.run(
            [sys.executable, "-m", "matching_gap.main", *DEMO.split(), "--workdir", "one"],
            cwd=tmp_path / "checkout",
            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert reference.returncode == 0, reference.stderr[-3000:]
        assert "on 4 cpu device(s)" in reference.stdout, reference.stdout
        one = losses(str(tmp_path / "checkout" / "one"))
        assert sorted(one) == sorted(straight)
        np.testing.assert_allclose(
            [straight[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-6
        )

        # 5 again, into gs://$BUCKET/vitb16; 7: SIGTERM to every worker mid-run.
        user.run(demo(launch, (IMAGENET, "")))
        deadline = time.time() + 600
        first = f"vitb16/checkpoints/{CHECKPOINT_EVERY}/commit_success.txt"
        while first not in list_objects(emulator, "vitb16/", bucket):
            assert time.time() < deadline, worker_log(the_slice, 0)
            time.sleep(0.2)
        for w in range(4):
            for pid in the_slice.processes(w):
                os.kill(pid, signal.SIGTERM)
        assert wait_for_workers(the_slice) == [0, 0, 0, 0], worker_log(the_slice, 0)
        saved = set()
        for w in range(4):
            log = worker_log(the_slice, w)
            found = re.findall(r"Process (\d) of 4 stopped at step (\d+) of", log)
            assert [p for p, _ in found] == [str(w)], log
            saved.add(int(found[0][1]))
            (line,) = [x for x in log.splitlines() if " stopped at step " in x]
            assert same_shape(doc_quote("7", "Process "), line), line  # what section 7 says
        assert len(saved) == 1, saved
        (step,) = saved
        assert CHECKPOINT_EVERY <= step < STEPS
        report.append(f"SIGTERM to the 4 workers: every one saved step {step} and exited 0")
        steps_saved = sorted(
            int(n.split("/")[2])
            for n in list_objects(emulator, "vitb16/checkpoints/", bucket)
            if n.endswith("commit_success.txt")
        )
        assert steps_saved[-1] == step, steps_saved

        # 5 once more: it resumes from that step and ends bitwise equal to the straight run.
        user.run(demo(launch, (IMAGENET, "")))
        assert wait_for_workers(the_slice) == [0, 0, 0, 0], worker_log(the_slice, 0)
        resumed = re.search(r"Resumed from the checkpoint at step (\d+)", worker_log(the_slice, 0))
        assert resumed and int(resumed.group(1)) == step, worker_log(the_slice, 0)
        report.append(resumed.group(0))
        # Each row once; the preemption wrote a row at its step, and every other row is the
        # straight run's, the one after the preemption too (its window carried over).
        rows = losses(f"gs://{bucket}/vitb16")
        assert step in rows and sorted(set(rows) - {step}) == sorted(straight)
        assert {s: v for s, v in rows.items() if s != step} == straight
        # Worker 0 said how the run went: its rows, and the goodput of both invocations.
        log = worker_log(the_slice, 0)
        (row,) = [x for x in log.splitlines() if f"step {STEPS}/" in x]
        assert "TFLOP/s/device, MFU unknown" in row, row
        assert "Goodput over 2 invocation(s), 1 restart(s)" in log, log
        record = json.loads(storage.path(f"gs://{bucket}/vitb16", "goodput.json").read_text())
        assert record["restarts"] == [
            {"resumed_from_step": step, "reached_step": step, "redone_steps": 0}
        ]
        report.append(row.split("] ", 1)[1])
        report.append(next(x for x in log.splitlines() if "Goodput over" in x).split("] ", 1)[1])
        a = params(storage.path(f"gs://{bucket}/straight", "checkpoints", str(STEPS)))
        b = params(storage.path(f"gs://{bucket}/vitb16", "checkpoints", str(STEPS)))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)

        # 6. Watch it: worker 0's log through tail -f, for a few seconds.
        watch = substitute(blocks["6"][0].splitlines()[0], ("tail -f", "timeout 5 tail -f"))
        out = user.run(f"{watch} || true", timeout=120)  # timeout's exit status 124
        assert "worker 0: [" in out and f"step {STEPS}" in out, out

        # 8. Evaluate: one summary, in the bucket.
        (evaluate,) = [b for b in blocks["8"] if RECIPE in b]
        user.run(demo(evaluate, (IMAGENET, "")))
        assert wait_for_workers(the_slice) == [0, 0, 0, 0], worker_log(the_slice, 0, "eval.log")
        summaries = [n for n in list_objects(emulator, "vitb16/", bucket) if n.endswith(".json")]
        assert [n for n in summaries if "evaluation" in n] == ["vitb16/evaluation.json"], summaries
        summary = json.loads(storage.path(f"gs://{bucket}/vitb16", "evaluation.json").read_text())
        assert summary["knn"]["step"] == STEPS, summary
        report.append(f"evaluation.json: {json.dumps(summary['knn'])[:200]}")

        # 9. Export: worker 0 writes the files; scp brings them back.
        (export,) = blocks["9"]
        user.run(demo(export))
        exported = sorted(
            p.name for p in (the_slice.home(0) / "matching-gap" / "vitb16_timm").iterdir()
        )
        assert exported, exported
        for w in (1, 2, 3):
            assert not (the_slice.home(w) / "matching-gap" / "vitb16_timm").exists()
        assert sorted(p.name for p in (user.checkout / "vitb16_timm").iterdir()) == exported
        report.append(f"exported by worker 0 only: {exported}")

        # 7, "A lost host": worker 0's host (the coordinator's) stops while the others
        # train, then worker 3's; every survivor ends with one line and status 2, and the
        # launch of step 5 resumes from the newest checkpoint, bitwise as the straight run.
        lost_run = demo(launch, (IMAGENET, ""), ("gs://$BUCKET/vitb16", "gs://$BUCKET/lost"))
        for lost, saved_step in ((0, CHECKPOINT_EVERY), (3, 2 * CHECKPOINT_EVERY)):
            user.run(lost_run)
            deadline, first = time.time() + 600, f"lost/checkpoints/{saved_step}/commit_success.txt"
            while first not in list_objects(emulator, "lost/", bucket):
                assert time.time() < deadline, worker_log(the_slice, 0)
                time.sleep(0.2)
            report.append(lose_host(the_slice, lost))
        newest = max(
            int(n.split("/")[2])
            for n in list_objects(emulator, "lost/checkpoints/", bucket)
            if n.endswith("commit_success.txt")
        )
        user.run(lost_run)
        assert wait_for_workers(the_slice) == [0, 0, 0, 0], worker_log(the_slice, 0)
        log = worker_log(the_slice, 0)
        assert f"Resumed from the checkpoint at step {newest} in" in log, log
        a = params(storage.path(f"gs://{bucket}/straight", "checkpoints", str(STEPS)))
        b = params(storage.path(f"gs://{bucket}/lost", "checkpoints", str(STEPS)))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        report.append(f"after both: resumed from step {newest}, bitwise equal at step {STEPS}")
    finally:
        for w in range(len(the_slice.workers)):
            the_slice.lose_host(w)
        the_slice.close()
    report.append(f"rehearsal: {time.perf_counter() - started:.0f} s")
    print("\n" + "\n".join(report))


# ----------------------------------------------------------------------------- other launchers


def _holding(port: int) -> socket.socket:
    """A socket listening on the coordinator's port: a coordinator started there would fail."""
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen()
    return s


def test_a_single_host_tpu_vm_starts_no_coordinator(tmp_path):
    the_slice = simulated_slice.Slice(tmp_path, "mg-v4-8", "v4-8", 1)
    held = _holding(the_slice.coordinator_port)
    try:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "matching_gap.launch", "--distributed_timeout=20"],
            cwd=ROOT,
            env=the_slice.workers[0]["env"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.perf_counter() - start
    finally:
        held.close()
        the_slice.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "Launcher: Cloud TPU VM slice (GCE metadata server); process 0 of 1, 1 local devices of 1."
    ], out.stdout
    asked = {p.rsplit("/", 1)[1] for p in the_slice.servers[0].requests}
    assert "worker-network-endpoints" in asked, asked  # it did ask, and found one worker
    assert took < 60, took


def test_a_gke_slice_forms_one_run_from_its_environment(tmp_path):
    """GKE's TPU pods: the slice in TPU_WORKER_HOSTNAMES and TPU_WORKER_ID; GKE's metadata
    server does not have the TPU VM attributes (here: one that answers nothing)."""
    silent = simulated_slice.MetadataServer({})
    port = simulated_slice.free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": f"{simulated_slice.SITECUSTOMIZE_DIR}:{ROOT}",
        "JAX_PLATFORMS": "cpu",
        "GCE_METADATA_IP": silent.address,
        "TPU_WORKER_HOSTNAMES": "127.0.0.11,127.0.0.12",
        "JAX_COORDINATOR_PORT": str(port),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "matching_gap.launch", "--distributed_timeout=60"],
            cwd=ROOT,
            env={**env, "TPU_WORKER_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    silent.shutdown()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, err
        lines = [line for line in out.splitlines() if not line.startswith("[Gloo]")]
        assert lines == [
            f"Launcher: GKE TPU slice (TPU_WORKER_HOSTNAMES); process {i} of 2, 1 local "
            "devices of 2.",
            "Processes [0, 1] answered.",
        ], out
