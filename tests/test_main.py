"""The command line as a user meets it: a mistake in the config, the command line or the
data is one short message on stderr and exit status 2, before anything is written.

Each subprocess pays the JAX (and for one test TensorFlow) start-up, so there are few of
them and none trains; the flag-error messages are also checked in-process.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from matching_gap import main

REPO = os.path.join(os.path.dirname(__file__), "..")
# What TensorFlow's C++ start-up prints unless main silences it.
TF_START_UP = ("absl::InitializeLog", "cpu_feature_guard", "oneDNN", "TensorFlow binary", "cuda")


def run_cli(workdir, *args: str) -> subprocess.CompletedProcess:
    # The user's environment, without TensorFlow log settings of its own: main sets them.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")
    }
    command = [
        sys.executable,
        "-m",
        "matching_gap.main",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *expected: str, max_lines: int = 2):
    stderr = result.stderr
    assert result.returncode == main.USER_ERROR_STATUS, stderr
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) <= max_lines, stderr
    assert stderr.startswith("error: "), stderr
    for text in expected:
        assert text in stderr, stderr


def test_bad_value_is_reported_before_the_workdir_is_created(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(workdir, "--config.loss.epsilon=-1")
    assert_user_error(result, "loss.epsilon must be > 0, got -1.0")
    assert not workdir.exists()


def test_a_heartbeat_timeout_below_one_second_is_refused_before_anything_runs(tmp_path):
    workdir = tmp_path / "run"
    # Missing data too: a command that let the flag through would stop there, at once.
    result = run_cli(workdir, "--distributed_heartbeat_timeout=0", "--config.data.data_dir=/no")
    assert_user_error(result, "--distributed_heartbeat_timeout=0: 0 is not a positive integer")
    assert not workdir.exists()


def test_misspelt_key_names_the_close_match(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(workdir, "--config.loss.epsilonn=1")
    assert_user_error(result, "'loss.epsilonn'", "did you mean loss.epsilon")
    assert not workdir.exists()


def test_missing_data_says_how_to_get_it(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(workdir, "--config.data.data_dir=/nonexistent")
    assert_user_error(result, "apt-get install -y dataset-fashion-mnist", "/nonexistent")
    assert not workdir.exists()


def test_missing_tfds_data_without_tensorflow_start_up_lines(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli(workdir, "--config.data.source=tfds", "--config.data.data_dir=/nonexistent")
    assert_user_error(
        result, "tfds.builder('fashion_mnist', data_dir='DIR').download_and_prepare()"
    )
    assert not any(line in result.stderr for line in TF_START_UP), result.stderr
    assert not workdir.exists()


def test_validate_does_not_import_tensorflow():
    code = textwrap.dedent("""
        import sys
        from matching_gap import config_lib
        config_lib.validate(config_lib.load_config_file("configs/vitb16.py"), num_devices=8)
        assert "tensorflow" not in sys.modules, "validate imported TensorFlow"
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


# In-process: the message for each kind of command line that absl cannot parse.


def describe(*args: str) -> str:
    return main._describe_flag_error(RuntimeError("absl's message"), ["prog", *args])


def test_flag_error_for_a_missing_config_file():
    assert describe("--config=configs/nope.py:smoke") == (
        "--config=configs/nope.py:smoke: there is no config file 'configs/nope.py'."
    )
    assert "usage: python -m matching_gap.main" in describe("--workdir=/tmp/x")


def test_flag_error_for_a_config_file_that_raises(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(arg=None):\n    raise ValueError('k must be 2, 3 or 4')\n")
    message = describe(f"--config={path}:k=5")
    assert message == (
        f"--config={path}:k=5: the config file raised ValueError (line 2): k must be 2, 3 or 4"
    )


def test_flag_error_for_a_config_file_of_another_name_that_raises(tmp_path):
    """--config reads any file as Python (ml_collections' loader); so does the message."""
    path = tmp_path / "broken.cfg"
    path.write_text("def get_config(arg=None):\n    raise ValueError('k must be 2, 3 or 4')\n")
    message = describe(f"--config={path}")
    assert message == (
        f"--config={path}: the config file raised ValueError (line 2): k must be 2, 3 or 4"
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.loss.epsilonn=1"], "Unknown config key 'loss.epsilonn'; did you mean"),
        (["--config.optim.batch_size", "8", "--noconfig.teach.ema"], "'teach.ema'"),
        (["--config.loss.epsilon=abc"], "absl's message"),  # a known key: absl's own words
    ],
)
def test_flag_error_for_overrides(args, expected):
    assert expected in describe("--config", "configs/default.py", *args)


# In-process: each one-line notice once per run, in the words of the mode.


def test_a_read_only_restore_does_not_say_resumed(tmp_path, capsys):
    """``--mode=evaluate|pictures|export`` read the newest checkpoint and name its step in
    their own words; "Resumed from ..." is training's notice."""
    import jax
    import jax.numpy as jnp

    from matching_gap import checkpointing

    writer = checkpointing.Checkpointer(str(tmp_path), every=1)
    writer.save(3, {"w": jnp.ones(4)}, force=True)
    writer.close()
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    capsys.readouterr()
    reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    assert reader.restore_latest(target) is not None
    reader.close()
    assert "Resumed" not in capsys.readouterr().out
    trainer = checkpointing.Checkpointer(str(tmp_path), every=1)
    trainer.restore_latest(target)
    trainer.close()
    assert (
        capsys.readouterr().out.count(f"Resumed from the checkpoint at step 3 in {tmp_path}") == 1
    )


def test_the_small_split_notice_of_the_knn_is_printed_once(monkeypatch, capsys):
    """A run's final evaluation runs the k-NN on the trained, the random-init and the raw-pixel
    features of one split: its notice that the split is smaller than k comes once."""
    from types import SimpleNamespace

    from matching_gap import metrics, schema
    from matching_gap.evaluation import knn as knn_lib

    monkeypatch.setattr(metrics, "_said", set())
    monkeypatch.setattr(knn_lib, "knn_accuracy", lambda fit, report, k, temperature: 0.5)
    config = schema.Config()
    fit = SimpleNamespace(num_examples=config.eval.knn_k - 1)
    for _ in range(3):
        assert knn_lib.configured_knn(fit, None, config) == (0.5, config.eval.knn_k - 1)
    assert capsys.readouterr().out.count("fewer than eval.knn_k") == 1


def test_late_callbacks_into_a_closed_event_loop_are_not_reported(capsys, monkeypatch):
    """The command drops the "Event loop is closed" tracebacks of TensorStore operations that
    Orbax abandoned after a failure it reported; any other uncatchable exception is shown."""

    class RaisesWhenCollected:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    monkeypatch.setattr(sys, "unraisablehook", main._unraisable)
    RaisesWhenCollected(RuntimeError("Event loop is closed"))
    assert capsys.readouterr().err == ""
    RaisesWhenCollected(ValueError("a real problem"))
    assert "ValueError: a real problem" in capsys.readouterr().err


def test_the_reads_orbax_abandons_after_a_failed_restore_are_not_reported(tmp_path, monkeypatch):
    """Orbax 0.12.8, reproduced: a restore that fails on one array raises at once and closes
    its event loop with the other reads in flight (``asyncio_utils._run_sync_via_new_loop``).
    Each abandoned read calls back into the closed loop when it finishes ("Event loop is
    closed"), then is collected unfinished: the ``GeneratorExit`` that closes it is re-raised
    as an ``Exception`` by ``serialization._read_array_index_and_device_put``. The command
    drops both kinds, and pyproject's ``filterwarnings`` names each of them (nothing else)."""
    import gc
    import re
    import time
    import tomllib
    import traceback

    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from _pytest.config import parse_warning_filter

    reported, messages = [], []

    def hook(unraisable):
        # The message of pytest's PytestUnraisableExceptionWarning for it.
        summary = f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}"
        messages.append(f"{summary}\n\n{''.join(traceback.format_exception(unraisable.exc_value))}")
        main._unraisable(unraisable)

    gc.collect()  # earlier tests' garbage goes to pytest's hook, not to this one
    monkeypatch.setattr(sys, "unraisablehook", hook)
    monkeypatch.setattr(sys, "__unraisablehook__", reported.append)  # what main lets through
    saved = {f"w{i}": jnp.zeros((512, 512)) for i in range(8)}
    with ocp.StandardCheckpointer() as writer:
        writer.save(tmp_path / "checkpoint", saved)
    abandoned = lambda: any("GeneratorExit" in m for m in messages)
    for _ in range(10):  # until a read is still in flight when w7's fails (most tries)
        target = dict(saved, w7=jnp.zeros((3,)))  # the last array does not fit
        with ocp.StandardCheckpointer() as reader, pytest.raises(ValueError, match="stored shape"):
            reader.restore(tmp_path / "checkpoint", target)
        for _ in range(20):
            gc.collect()
            if abandoned():
                break
            time.sleep(0.1)
        if abandoned():
            break
    assert abandoned(), messages
    assert reported == []
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        filters = tomllib.load(f)["tool"]["pytest"]["ini_options"]["filterwarnings"]
    ignored = [
        re.compile(message, re.I)
        for action, message, category, _, _ in (
            parse_warning_filter(f, escape=False) for f in filters
        )
        if action == "ignore" and category is pytest.PytestUnraisableExceptionWarning
    ]
    for message in messages:
        assert any(p.match(message) for p in ignored), message
    other = "Exception ignored in: None\n\nTraceback ...\nValueError: a real problem\n"
    assert not any(p.match(other) for p in ignored)
    # A read the closed loop never started is collected unawaited: a RuntimeWarning, which
    # pyproject and main ignore by that message alone.
    assert f"ignore:{main._ABANDONED_READ}:RuntimeWarning" in filters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _read_array_index_and_device_put()
        gc.collect()
    assert [str(w.message) for w in caught] == [main._ABANDONED_READ]


async def _read_array_index_and_device_put():
    """Named as Orbax's read (serialization.py), for the message of an unawaited one."""


@pytest.mark.slow
def test_each_mode_names_the_checkpoint_in_its_own_words_once(tmp_path):
    """A short run, then ``--mode=export`` and ``--mode=evaluate`` on it: each prints its
    notice once, and none of them says it resumed training."""
    from matching_gap import data

    if not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR):
        pytest.skip("needs the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)")
    workdir = tmp_path / "run"
    small = [
        "--config=configs/default.py:smoke",
        "--config.data.source=fashion_mnist_idx",
        "--config.data.max_examples=64",
        "--config.train.final_eval=False",
        "--config.train.knn_every=0",
    ]

    def run(*args):
        command = [sys.executable, "-m", "matching_gap.main", f"--workdir={workdir}", *small]
        out = subprocess.run(
            command + list(args), cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "Launcher: none (one process); process 0 of 1, 1 local devices of 1."
        return [line.split("] ", 1)[-1] for line in lines[1:]]

    run()
    exported = run(
        "--mode=export", "--config.export.format=timm", f"--config.export.dir={tmp_path}"
    )
    assert len(exported) == 1 and exported[0].startswith("Wrote the encoder of step 3 as timm")
    evaluated = run("--mode=evaluate", "--config.eval.protocols=knn")
    assert sum(line.startswith("Evaluating the checkpoint at step 3") for line in evaluated) == 1
    assert not [line for line in exported + evaluated if "Resumed" in line]
    assert len(set(evaluated)) == len(evaluated), evaluated  # no notice twice


def test_tracebacks_logged_by_orbax_and_gcsfs_before_they_raise_are_dropped():
    """The command reports a failed save or write in one line: the tracebacks Orbax and
    gcsfs log on the way are dropped; their other records, and other libraries', are kept."""
    import logging as std_logging

    try:
        raise OSError("refused")
    except OSError:
        exc_info = sys.exc_info()

    def kept(path, exc_info):
        record = std_logging.LogRecord("x", std_logging.ERROR, path, 1, "m", None, exc_info)
        return main._drop_reported_tracebacks(record)

    site = os.path.join(os.sep, "venv", "site-packages")
    assert not kept(os.path.join(site, "orbax", "checkpoint", "checkpoint_manager.py"), exc_info)
    assert not kept(os.path.join(site, "gcsfs", "retry.py"), exc_info)
    assert kept(os.path.join(site, "gcsfs", "retry.py"), None)
    assert kept(os.path.join(site, "jax", "_src", "compiler.py"), exc_info)
