"""Executes the notebooks in ``notebooks/`` with small settings (as CI does).

The cell tagged ``parameters`` holds a notebook's settings; the test inserts a cell after it
that overrides them (papermill's convention), runs the whole notebook in a fresh kernel and
checks what it printed.
"""

import contextlib
import importlib.metadata
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


def _first_cell(name: str) -> str:
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4).cells[1].source


@pytest.mark.parametrize("name", ["toy_matching_gap.ipynb", "train_demo.ipynb"])
def test_first_cell_finds_the_clone_or_clones_repo_url_or_says_what_to_set(
    name, tmp_path, monkeypatch
):
    """In a fresh kernel (nothing installed) the first cell installs the clone around the
    notebook, else clones REPO_URL and installs that, else stops with one line that says
    to set REPO_URL."""
    cell = _first_cell(name)
    assert 'REPO_URL = ""' in cell
    ran = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    monkeypatch.setattr(subprocess, "run", lambda argv, check: ran.append(argv))

    monkeypatch.chdir(NOTEBOOKS)  # Jupyter's working directory: the notebook's folder
    exec(cell, {})
    assert ran[-1][3:5] == ["install", "-q"]
    assert ran[-1][5].startswith(os.path.dirname(NOTEBOOKS) + "[")

    monkeypatch.chdir(tmp_path)  # Colab: no clone around the notebook
    namespace = {}
    with pytest.raises(RuntimeError, match="set REPO_URL") as stopped:
        exec(cell, namespace)
    assert len(stopped.value._render_traceback_()) == 1  # what Jupyter shows: one line
    url = "https://git.example.org/someone/matching-gap"
    exec(cell.replace('REPO_URL = ""', f"REPO_URL = {url!r}"), {})
    assert ran[-2] == ["git", "clone", "-q", url, "matching-gap"]
    assert ran[-1][5].startswith(str(tmp_path / "matching-gap") + "[")


def test_the_demo_notebook_stops_without_a_clone_even_when_installed(tmp_path, monkeypatch):
    """It reads configs/default.py, which the package does not install."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="reads configs/.*set REPO_URL"):
        exec(_first_cell("train_demo.ipynb"), {})
    exec(_first_cell("toy_matching_gap.ipynb"), {})  # the package alone is enough


def _imports(name: str) -> set[str]:
    """The top-level modules the notebook's code cells import."""
    import ast

    modules = set()
    for cell in nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4).cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules


def _requirements(extras: tuple[str, ...]) -> set[str]:
    """The distributions ``pip install .[extras]`` brings, with what they require in turn."""
    import tomllib

    with open(os.path.join(os.path.dirname(NOTEBOOKS), "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def name(requirement: str) -> str:
        return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()

    todo = list(project["dependencies"])
    for extra in extras:
        todo += project["optional-dependencies"][extra]
    found = set()
    while todo:
        requirement = todo.pop()
        if requirement.startswith("matching-gap["):  # an extra of this project
            for extra in requirement[len("matching-gap[") : requirement.index("]")].split(","):
                todo += project["optional-dependencies"][extra]
            continue
        dist = name(requirement).replace("_", "-")
        if dist in found:
            continue
        found.add(dist)
        # a distribution missing here (tensorflow's platform twin) brings nothing more
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += [r for r in importlib.metadata.requires(dist) or [] if "extra ==" not in r]
    return found


@pytest.mark.parametrize("name", ["toy_matching_gap.ipynb", "train_demo.ipynb"])
def test_the_first_cell_installs_what_the_notebook_imports(name, monkeypatch):
    import sys

    namespace = {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.chdir(NOTEBOOKS)
    exec(_first_cell(name), namespace)
    installed = _requirements(namespace["EXTRAS"])
    providers = importlib.metadata.packages_distributions()
    missing = [
        module
        for module in sorted(_imports(name) - set(sys.stdlib_module_names))
        if module not in ("matching_gap", "IPython")  # the project; Jupyter's own
        and not {d.lower().replace("_", "-") for d in providers.get(module, [])} & installed
    ]
    assert not missing, f"{name} imports {missing}, which its first cell does not install"


# What each runtime has installed (distribution: version) before the first cell runs.
FRESH_VENV = {}
COLAB_CPU = {"tensorflow": "2.19.0", "jax": "0.7.1", "jaxlib": "0.7.1"}
COLAB_GPU = {**COLAB_CPU, "jax-cuda12-plugin": "0.7.1", "jax-cuda12-pjrt": "0.7.1"}
COLAB_TPU = {"tensorflow-cpu": "2.19.0", "jax": "0.7.1", "jaxlib": "0.7.1", "libtpu": "0.0.21"}
CPU_JAX_ON_A_TPU_VM = {"jax": "0.7.1", "jaxlib": "0.7.1"}
PINS = ["jax==0.7.1", "jaxlib==0.7.1"]


@pytest.mark.parametrize(
    "have,machine,train,expected",
    [
        # A plain machine: the extra as the README installs it; JAX's CPU build comes with it.
        (FRESH_VENV, "cpu", True, ["SRC[train]"]),
        (FRESH_VENV, "cpu", False, ["SRC"]),
        # Colab and Kaggle: their TensorFlow and JAX builds stay (no tensorflow-cpu, no plain
        # jax over a CUDA or TPU build), whatever the accelerator.
        (COLAB_CPU, "cpu", True, ["SRC[hosted]", *PINS]),
        (COLAB_GPU, "gpu", True, ["SRC[hosted]", *PINS]),
        (COLAB_TPU, "tpu", True, ["SRC[hosted]", *PINS]),
        (COLAB_GPU, "gpu", False, ["SRC", *PINS]),
        # An accelerator without JAX, or with JAX's CPU build: what the accelerator needs.
        (FRESH_VENV, "tpu", True, ["SRC[train]", "jax[tpu]"]),
        (FRESH_VENV, "gpu", False, ["SRC", "jax[cuda12]"]),
        (CPU_JAX_ON_A_TPU_VM, "tpu", False, ["SRC", "jax[tpu]==0.7.1", "jaxlib==0.7.1"]),
    ],
)
def test_first_cell_keeps_what_the_runtime_brings(have, machine, train, expected, monkeypatch):
    namespace = {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    exec(_first_cell("train_demo.ipynb"), namespace)  # everything installed: defines only
    extras = ("train",) if train else ()
    arguments = namespace["pip_arguments"]("SRC", extras, machine, have.get)
    assert arguments == ["install", "-q", *expected]
    git = namespace["pip_arguments"]("git+https://h/r", extras, machine, have.get)
    assert git[2] == "matching-gap" + expected[0][3:] + " @ git+https://h/r"
    # The loss-only notebook decides with the same function.
    toy = {}
    exec(_first_cell("toy_matching_gap.ipynb"), toy)
    assert toy["pip_arguments"]("SRC", extras, machine, have.get) == arguments
    if train:  # the demo notebook's extras: the trainer and matplotlib
        both = namespace["pip_arguments"]("SRC", ("train", "plots"), machine, have.get)
        assert both[2] == expected[0].replace("]", ",plots]")


@pytest.mark.parametrize(
    "devices,nvidia_smi,expected",
    [(["/dev/accel0"], None, "tpu"), ([], "/usr/bin/nvidia-smi", "gpu"), ([], None, "cpu")],
)
def test_first_cell_tells_the_accelerator(devices, nvidia_smi, expected, monkeypatch):
    import glob
    import shutil

    namespace = {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object())
    exec(_first_cell("train_demo.ipynb"), namespace)
    monkeypatch.setattr(glob, "glob", lambda pattern: devices if "accel" in pattern else [])
    monkeypatch.setattr(shutil, "which", lambda name: nvidia_smi)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    assert namespace["accelerator"]() == expected


def _outputs(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )


@pytest.mark.parametrize("name", ["toy_matching_gap.ipynb", "train_demo.ipynb"])
def test_notebooks_are_committed_with_the_outputs_their_introduction_quotes(name):
    """A reader sees a run before running one: every code cell executed, the plots kept as
    PNG, and the runtime and figures the introduction states are those of the outputs."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code[1:]), f"{name}: cells not executed"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, name
    intro, printed = nb.cells[0].source, _outputs(nb)
    quoted = re.findall(r"`([^`\n]*\d[^`\n]*)`", intro.split("**Run it**")[0])
    stated = [q for q in quoted if any(ch.isdigit() for ch in q) and not q.endswith(".py")]
    assert stated, f"{name}: its introduction quotes no output"
    parameters = next(c.source for c in code if "parameters" in c.metadata.get("tags", []))
    for line in stated:
        if re.match(r"\w+ = ", line):  # a setting the run used: the parameters cell's
            assert re.search(rf"^{re.escape(line)}\b", parameters, re.M), (name, line)
        else:
            assert line in printed, f"{name}: the introduction quotes {line!r}, not its outputs"


def test_the_demo_notebook_prints_the_readmes_demo_figures():
    """The committed run is the README's demo (same recipe and budget): same figures."""
    with open(os.path.join(os.path.dirname(NOTEBOOKS), "README.md")) as f:
        readme = f.read()
    rows = {
        line.split("|")[1].split(",")[0].split("(")[0].strip(): re.findall(r"\d+\.\d+%", line)
        for line in readme.splitlines()
        if line.startswith(("| trained encoder", "| random init", "| raw pixels"))
    }
    printed = _outputs(nbformat.read(os.path.join(NOTEBOOKS, "train_demo.ipynb"), as_version=4))
    probe = re.search(
        r"linear_probe_top1 +trained +(\S+) \| random init +(\S+) \| raw pixels +(\S+)", printed
    )
    knn = re.search(r"knn_top1 +trained +(\S+) \| random init +(\S+) \| raw pixels +(\S+)", printed)
    assert probe and knn, printed[-2000:]
    for i, row in enumerate(("trained encoder", "random init", "raw pixels")):
        assert rows[row] == [probe.group(i + 1), knn.group(i + 1)], row
