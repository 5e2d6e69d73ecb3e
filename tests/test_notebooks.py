"""Executes the notebooks in ``notebooks/`` with small settings (as CI does).

The cell tagged ``parameters`` holds a notebook's settings; the test inserts a cell after it
that overrides them (papermill's convention), runs the whole notebook in a fresh kernel and
checks what it printed.
"""

import importlib.util
import os
import re
import subprocess

import nbclient
import nbformat
import pytest

from matching_gap import data

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")


def run_notebook(name: str, overrides: str, cwd) -> str:
    """Runs ``notebooks/<name>`` with ``overrides`` after its parameters cell; returns stdout."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(overrides))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )


@pytest.mark.slow
def test_toy_notebook(tmp_path):
    stdout = run_notebook("toy_matching_gap.ipynb", "steps = 40", tmp_path)
    start, end = map(float, re.search(r"gap: ([\d.e-]+) -> ([\d.e-]+)", stdout).groups())
    assert 0 <= end < start


@pytest.mark.skipif(
    not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR),
    reason="Debian package dataset-fashion-mnist not installed (CI installs it)",
)
@pytest.mark.slow
def test_train_demo_notebook(tmp_path):
    overrides = (
        f"epochs = 2.0\nmax_examples = 1024\neval_max_examples = 1024\nknn_every = 4\n"
        f"probe_epochs = 2\nworkdir = {str(tmp_path / 'run')!r}"
    )
    stdout = run_notebook("train_demo.ipynb", overrides, tmp_path)
    assert "linear_probe_top1" in stdout
    assert "features: (6, " in stdout
    assert os.path.isdir(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "name,extra", [("toy_matching_gap.ipynb", ""), ("train_demo.ipynb", "[train]")]
)
def test_first_cell_installs_the_checkout_or_repo_url(name, extra, tmp_path, monkeypatch):
    """In a fresh Colab kernel (nothing installed) the first cell installs the checkout around
    the notebook, else the repository at REPO_URL, else says to set REPO_URL."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    cell = nb.cells[1].source
    assert 'REPO_URL = ""' in cell
    installed = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    monkeypatch.setattr(subprocess, "run", lambda argv, check: installed.append(argv[-1]))

    monkeypatch.chdir(NOTEBOOKS)  # Jupyter's working directory: the notebook's folder
    exec(cell, {})
    assert installed == [f"{os.path.dirname(NOTEBOOKS)}{extra}"]

    monkeypatch.chdir(tmp_path)  # Colab: no checkout around the notebook
    with pytest.raises(RuntimeError, match="set REPO_URL"):
        exec(cell, {})
    url = "https://git.example.org/someone/matching-gap"
    exec(cell.replace('REPO_URL = ""', f"REPO_URL = {url!r}"), {})
    assert installed[-1] == f"matching-gap{extra} @ git+{url}"
