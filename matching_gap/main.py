"""Command line: ``python -m matching_gap.main --config=configs/default.py --workdir=DIR``.

Trains (resuming from ``--workdir`` if it holds checkpoints) and evaluates; with
``--mode=evaluate`` only runs the evaluators on the newest checkpoint of ``--workdir``.
Override any config field from the command line: ``--config.loss.epsilon=0.1``.

Several hosts: run the same command on every host. ``jax.distributed`` is initialised
automatically on TPU pods and SLURM/Open MPI clusters; elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. The workdir must be
on storage that every host sees (a bucket or a shared file system).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads data here

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from matching_gap import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-host runs outside "
    "TPU pods and SLURM (which are detected automatically).")  # fmt: skip
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialise jax.distributed when flags or a cluster environment ask for it.")  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_environment() -> bool:
    """Whether a launcher that jax.distributed recognises started several processes."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    return slurm or mpi or tpu_pod


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` for multi-process runs (before any JAX computation)."""
    explicit = _COORDINATOR.value is not None
    if _DISTRIBUTED.value == "off" or (
        _DISTRIBUTED.value == "auto" and not explicit and not _cluster_environment()
    ):
        return
    if explicit and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id.")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )  # fmt: skip


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress is printed; Orbax's INFO is noise
    initialize_distributed()
    # TensorFlow is only used for input pipelines: keep it off any accelerator.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass
    if _MODE.value == "evaluate":
        train.evaluate_workdir(_CONFIG.value, _WORKDIR.value)
    else:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
