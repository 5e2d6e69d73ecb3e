"""``matching_gap.launch``: which launcher started the process, found with JAX's own cluster
classes, and the one-line stop when the processes cannot meet. In-process, against each
launcher's environment (a TPU VM's metadata server is ``simulated_slice.MetadataServer``);
``tests/test_tpu_slice.py`` runs whole commands on a simulated slice."""

import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import simulated_slice
from jax._src import cloud_tpu_init, clusters
from jax._src.clusters import cloud_tpu_cluster

from matching_gap import errors, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every variable a launcher that JAX knows reads, cleared for each test.
LAUNCHER_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES",
    "MEGASCALE_SLICE_ID",
    "JAX_COORDINATOR_PORT",
    "KUBERNETES_SERVICE_HOST",
)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tpu_vm(monkeypatch):
    """This process as a TPU VM: JAX's TPU-VM flag true, the metadata server asked."""
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)

    def serve(accelerator: str, worker: int, workers: int):
        ips = [f"127.0.0.{11 + i}" for i in range(workers)]
        server = simulated_slice.MetadataServer(
            simulated_slice.tpu_vm_attributes(
                accelerator, worker, ips, zone="us-central2-b", node="n"
            )
        )
        monkeypatch.setenv("GCE_METADATA_IP", server.address)
        return server

    return serve


def test_what_is_used_of_jax_private_cluster_code_is_there():
    """``jax._src.clusters`` is private: a JAX release that renames what launch uses fails
    here, not on a slice."""
    names = {c.name: c for c in clusters.ClusterEnv._cluster_types}
    for name in ("gcetpu", "gketpu", "slurm", "ompi"):
        cluster = names[name]
        assert cluster.opt_in_only_method is False
        for method in ("is_env_present", "get_process_count", "get_process_id"):
            assert callable(getattr(cluster, method))
        parameters = inspect.signature(cluster.get_coordinator_address).parameters
        assert list(parameters) == ["timeout_secs", "override_coordinator_port"]
    assert names["mpi4py"].opt_in_only_method is True
    assert isinstance(cloud_tpu_init.running_in_cloud_tpu_vm, bool)
    # In JAX's order, the opt-in ones left out.
    names = [c.name for c in launch._cluster_types()]
    assert names == [c.name for c in clusters.ClusterEnv._cluster_types if c.name != "mpi4py"]


def test_a_plain_machine_is_one_process_without_a_coordinator():
    assert launch.detect() == launch.Launch("none (one process)")


def test_a_cloud_tpu_vm_slice_is_read_from_the_metadata_server(tpu_vm):
    server = tpu_vm("v4-32", worker=2, workers=4)
    found = launch.detect()
    assert found == launch.Launch(
        "Cloud TPU VM slice (GCE metadata server)", 4, 2, "127.0.0.11:8482"
    )
    asked = {path.rsplit("/", 1)[1] for path in server.requests}
    assert {"agent-worker-number", "worker-network-endpoints"} <= asked
    server.shutdown()


def test_jax_coordinator_port_moves_the_coordinator(tpu_vm, monkeypatch):
    tpu_vm("v4-32", worker=0, workers=4)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "9911")
    assert launch.detect().coordinator == "127.0.0.11:9911"


def test_a_single_host_tpu_vm_starts_no_coordinator(tpu_vm):
    tpu_vm("v4-8", worker=0, workers=1)
    found = launch.detect()
    assert found.coordinator is None and found.num_processes == 1
    assert found.launcher == "Cloud TPU VM slice (GCE metadata server)"
    # --distributed=on starts one anyway (a coordinator of one process).
    assert launch.detect(mode="on").coordinator == "127.0.0.11:8482"


def test_a_tpu_vm_without_its_metadata_server_is_one_process(tpu_vm, monkeypatch):
    """Colab or Kaggle TPU runtimes: a TPU VM whose metadata server has no TPU attributes."""
    server = simulated_slice.MetadataServer({})
    monkeypatch.setenv("GCE_METADATA_IP", server.address)
    start = time.perf_counter()
    assert launch.detect() == launch.Launch("none (one process)")
    assert time.perf_counter() - start < 10  # JAX's 6 tries, 0.5 s apart
    server.shutdown()


def test_gke_is_read_from_its_variables(monkeypatch):
    """GKE's metadata server has none of the TPU VM attributes (here: one that answers
    nothing); the slice is in TPU_WORKER_HOSTNAMES and TPU_WORKER_ID."""
    server = simulated_slice.MetadataServer({})
    monkeypatch.setenv("GCE_METADATA_IP", server.address)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4")
    monkeypatch.setenv("TPU_WORKER_ID", "3")
    assert launch.detect() == launch.Launch(
        "GKE TPU slice (TPU_WORKER_HOSTNAMES)", 4, 3, "10.0.0.1:8482"
    )
    server.shutdown()


def test_slurm_and_open_mpi(monkeypatch):
    slurm = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_NODELIST": "gpu-a,gpu-b",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    found = launch.detect()
    assert (found.launcher, found.num_processes, found.process_id) == ("SLURM", 2, 1)
    assert found.coordinator.startswith("gpu-a:")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launch.detect() == launch.Launch("SLURM")  # one task: no coordinator
    for key in slurm:
        monkeypatch.delenv(key)
    mpi = {
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    }
    for key, value in mpi.items():
        monkeypatch.setenv(key, value)
    found = launch.detect()
    assert (found.launcher, found.num_processes, found.process_id) == ("Open MPI", 4, 2)


def test_flags_and_modes(monkeypatch):
    assert launch.detect(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1) == (
        launch.Launch("--coordinator_address flags", 2, 1, "10.0.0.1:1234")
    )
    with pytest.raises(errors.ConfigError, match="needs --num_processes and --process_id"):
        launch.detect(coordinator_address="10.0.0.1:1234")
    with pytest.raises(errors.ConfigError, match="must be in 0..1"):
        launch.detect(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(errors.ConfigError, match="no launcher that JAX recognises"):
        launch.detect(mode="on")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.96.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launch.detect(mode="off") == launch.Launch("none (--distributed=off)")


def _run(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_a_coordinator_out_of_reach_stops_in_bounded_time_with_one_line(tmp_path):
    """A worker whose coordinator never answers: JAX alone would wait, then abort with a C++
    stack trace; the command stops after --distributed_timeout with one line that names the
    address, before anything is written."""
    port = simulated_slice.free_port()
    start = time.perf_counter()
    out = _run(
        "matching_gap.main",
        "--config=configs/default.py",
        f"--workdir={tmp_path / 'run'}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--process_id=1",
        "--distributed_timeout=3",
    )
    took = time.perf_counter() - start
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: process 1 of 2 ")
    assert f"could not reach the coordinator at 127.0.0.1:{port}" in lines[0]
    assert f"TCP port {port}" in lines[0]
    assert took < 60, took
    assert not (tmp_path / "run").exists()


def test_the_check_prints_the_launcher_and_the_devices():
    out = _run("matching_gap.launch")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Launcher: none (one process); process 0 of 1, 1 local devices of 1.\n"


# ----------------------------------------------------------------------------- supervise

_FATAL = (
    "F1206 00:36:06.544260 864 client.h:80] Terminating process because the JAX distributed "
    "service detected fatal errors. This most likely indicates that another task died; "
    "absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader "
    "task was preempted/died/restarted unexpectedly or this task is experiencing network "
    "issues."
)


# This test process runs JAX's backends (other tests started them), and JAX warns at every
# fork; the command's parent forks before any JAX computation (launch.start).
_FORKS = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _child(body: str) -> list[str]:
    return [sys.executable, "-c", f"import os, signal, sys, time\n{body}"]


@_FORKS
def test_the_parent_speaks_for_a_child_that_jax_aborts(capfd):
    """JAX's abort (its F line, a C++ stack, Python's dumps) becomes one line naming the lost
    process and the file that keeps the child's stderr; what came before it is relayed."""
    status = launch.supervise(
        launch.Launch("test", 2, 1, "127.0.0.1:1"),
        _child(
            "print('step 1', flush=True)\n"
            "print('warning: kept', file=sys.stderr, flush=True)\n"
            "time.sleep(2 * 1.0 + 0.5)\n"
            f"print({_FATAL!r} + '\\n*** Check failure stack trace: ***', file=sys.stderr)\n"
            "sys.stderr.flush(); time.sleep(0.5)\n"
            "print('Fatal Python error: Aborted', file=sys.stderr, flush=True)\n"
            "os.abort()"
        ),
    )
    out, err = capfd.readouterr()
    assert status == launch.LOST_PROCESS_STATUS == 2
    assert out == "step 1\n"
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0] == "warning: kept", err
    assert lines[1].startswith(
        "error: Process 1 of 2 stopped: process 0 (the coordinator) is gone"
    ), lines[1]
    path = re.search(r"JAX's report: (\S+)\)$", lines[1]).group(1)
    with open(path) as f:
        kept = f.read()
    os.remove(path)
    assert "warning: kept" in kept and "client.h:80" in kept


@_FORKS
def test_the_parent_relays_a_child_that_ends_by_itself_and_passes_on_sigterm(capfd):
    """A child that ends as usual: its stderr whole, its status; SIGTERM to the parent
    reaches it (a preemption notice)."""
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    status = launch.supervise(
        launch.Launch("test", 2, 0, "127.0.0.1:1"),
        _child(
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(print('saved', flush=True)))\n"
            "print('error: one line', file=sys.stderr, flush=True)\n"
            "time.sleep(60)\n"
        ),
    )
    out, err = capfd.readouterr()
    assert (status, out, err) == (0, "saved\n", "error: one line\n")
    assert launch.supervise(launch.Launch("test", 2, 0, "x:1"), _child("sys.exit(3)")) == 3
