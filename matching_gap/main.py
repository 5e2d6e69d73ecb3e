"""Command line: ``python -m matching_gap.main --config=configs/default.py --workdir=DIR``.

Trains (resuming from ``--workdir`` if it holds checkpoints) and evaluates; with
``--mode=evaluate`` only runs the evaluators on the newest checkpoint of ``--workdir``.
Override any config field from the command line: ``--config.loss.epsilon=0.1``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from matching_gap import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress is printed; Orbax's INFO is noise
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
