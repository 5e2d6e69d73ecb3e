"""The pages cannot go stale or say what the code does not: every ``python -m
matching_gap.main ...`` command in the README, ``docs/``, ``experiments/`` and
``benchmarks/README.md`` parses with the command line's own parser and its config passes the
schema; the Python snippets of the README and ``docs/loss.md`` run; every table of measured
figures names the command that produced it; relative links and named files exist; no user page
carries the project's internal process; the figures a test can derive (the study's, the loss's
scale, the configs' values, the plans' costs) are checked against their source.

Nothing is trained: a command is parsed as ``main.parse_flags`` parses it (absl flags with
ml_collections' ``config_flags``, so every ``--config.x.y=value`` is checked against the
config file's locked ConfigDict and converted to the field's type), then
``schema.parse`` checks every field and how the sections fit, as ``main.main`` does first.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shlex

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from matching_gap import errors, main, schema

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND_DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "benchmarks" / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "experiments").glob("*.md"),
    ]
)
SNIPPET_DOCS = [ROOT / "README.md", ROOT / "docs" / "loss.md"]
MAX_README_LINES = 250

COMMAND = re.compile(r"python -m matching_gap\.main(?=\s|$|`)")
# Where a shell command line ends: redirections, pipes, separators, background.
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>&1"}


def logical_lines(text: str) -> list[tuple[int, str]]:
    """``(first line number, line)`` with backslash continuations joined."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        out.append((start + 1, line))
        i += 1
    return out


def command_arguments(rest: str) -> list[str]:
    """The arguments after ``python -m matching_gap.main`` on one logical line: up to the end
    of an inline code span, a shell operator or a comment. A quote left open belongs to an
    enclosing command (``gcloud ... --command "... python -m matching_gap.main ..."``)."""
    rest = rest.split("`", 1)[0]
    while True:
        try:
            words = shlex.split(rest, comments=True)
            break
        except ValueError:  # no closing quotation: drop the enclosing command's last quote
            cut = max(rest.rfind('"'), rest.rfind("'"))
            if cut < 0:
                raise
            rest = rest[:cut] + rest[cut + 1 :]
    argv = []
    for word in words:
        if word in SHELL_OPERATORS or word.startswith((">", "2>", "&>", "|")):
            break
        argv.append(word.rstrip(";"))
        if word.endswith(";"):
            break
    return argv


def main_commands(text: str) -> list[tuple[int, list[str]]]:
    """``(line number, arguments)`` of every ``python -m matching_gap.main`` in ``text``."""
    found = []
    for lineno, line in logical_lines(text):
        for match in COMMAND.finditer(line):
            found.append((lineno, command_arguments(line[match.end() :])))
    return found


LOOP = re.compile(r"\bfor (\w+) in ([^;]+); do\b")


def loop_values(text: str) -> dict[str, str]:
    """``{variable: first value}`` of the shell ``for`` loops of ``text``: a command inside
    ``for k in 2 3 4; do ... :k=$k ...`` is checked as the loop's first pass runs it."""
    return {m.group(1): m.group(2).split()[0] for m in LOOP.finditer(text)}


def all_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for doc in COMMAND_DOCS:
        text = doc.read_text()
        values = loop_values(text)
        for lineno, argv in main_commands(text):
            for name, value in values.items():
                argv = [re.sub(rf"\${name}\b", value, a) for a in argv]
            commands.append((f"{doc.relative_to(ROOT)}:{lineno}", argv))
    return commands


def parse_command(argv: list[str]) -> schema.Config:
    """``argv`` (without the program) through ``main``'s flags and ``schema.parse``, in a fresh
    ``FlagValues`` so that commands do not leak overrides into each other. Raises
    ``errors.ConfigError`` with the message the command line would print."""
    full_argv = ["matching_gap.main", *argv]
    values = flags.FlagValues()
    # sys_argv: config_flags defines one flag per --config.x.y override it finds there.
    config_flags.DEFINE_config_file("config", None, "", values, sys_argv=full_argv)
    for holder in vars(main).values():
        if isinstance(holder, flags.FlagHolder) and holder.name != "config":
            values[holder.name] = copy.deepcopy(flags.FLAGS[holder.name])
    try:
        remaining = values(full_argv)
        config = values["config"].value
        if not isinstance(config, ml_collections.ConfigDict):
            raise errors.ConfigError("--config is not a config file")
    except Exception as e:  # noqa: BLE001 (as main.parse_flags: everything comes from argv)
        raise errors.ConfigError(main._describe_flag_error(e, full_argv)) from e
    if len(remaining) > 1:
        raise errors.ConfigError(f"unexpected arguments {remaining[1:]}")
    return schema.parse(config)


def test_the_docs_have_commands():
    docs = {where.split(":")[0] for where, _ in all_commands()}
    assert {
        "README.md",
        "docs/training.md",
        "docs/tpu.md",
        "docs/evaluation.md",
        "experiments/recipes.md",
    } <= docs


@pytest.mark.parametrize("where,argv", all_commands(), ids=[w for w, _ in all_commands()])
def test_command_parses(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' config paths are relative to the repository
    assert any(a.startswith("--config=") for a in argv), f"{where}: no --config in {argv}"
    try:
        parse_command(argv)
    except errors.ConfigError as e:
        pytest.fail(f"{where}: python -m matching_gap.main {shlex.join(argv)}\n  {e}")


def test_a_misspelt_override_fails(monkeypatch):
    """The check above can fail: a doc with a misspelt key or a bad value is caught."""
    monkeypatch.chdir(ROOT)
    doc = (
        "```bash\npython -m matching_gap.main --config=configs/default.py --workdir=/tmp/x \\\n"
        "    --config.loss.epsilonn=0.1\n```\n"
        "`python -m matching_gap.main --config=configs/default.py --config.loss.epsilon=-1` (x)\n"
    )
    (_, misspelt), (_, negative) = main_commands(doc)
    assert misspelt[-1] == "--config.loss.epsilonn=0.1" and negative[-1].endswith("=-1")
    with pytest.raises(errors.ConfigError, match="did you mean loss.epsilon"):
        parse_command(misspelt)
    with pytest.raises(errors.ConfigError, match="epsilon must be > 0"):
        parse_command(negative)


def test_commands_are_cut_where_the_shell_line_ends():
    text = (
        '--command "cd x && nohup .venv/bin/python -m matching_gap.main --config=c.py '
        '--workdir=gs://$B/r > run.log 2>&1 &"\n'
        "python -m matching_gap.main --config=c.py --mode=plan   # a comment\n"
        "| `python -m matching_gap.main --config=c.py --workdir=/tmp/d` | 84.02% |\n"
        "python -m matching_gap.main --config=c.py --config.augment.crop_scale='(0.3, 1.0)'\n"
    )
    assert [argv for _, argv in main_commands(text)] == [
        ["--config=c.py", "--workdir=gs://$B/r"],
        ["--config=c.py", "--mode=plan"],
        ["--config=c.py", "--workdir=/tmp/d"],
        ["--config=c.py", "--config.augment.crop_scale=(0.3, 1.0)"],
    ]


# ------------------------------------------------------------------------ Python snippets


def python_snippets(doc: pathlib.Path) -> list[tuple[int, str]]:
    """``(line number, source)`` of every fenced ```python block of ``doc``."""
    snippets, lines = [], doc.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            snippets.append((i + 2, "\n".join(lines[i + 1 : end])))
    return snippets


SNIPPETS = [
    (f"{doc.relative_to(ROOT)}:{lineno}", source)
    for doc in SNIPPET_DOCS
    for lineno, source in python_snippets(doc)
]


def test_the_snippet_docs_have_snippets():
    assert {w.split(":")[0] for w, _ in SNIPPETS} == {"README.md", "docs/loss.md"}


@pytest.mark.parametrize("where,source", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_python_snippet_runs(where, source):
    exec(compile(source, where, "exec"), {"__name__": "__snippet__"})


# ------------------------------------------------------------------------ figures, links

# A measured figure: a percentage or a multiple with decimals, a time in ms.
FIGURE = re.compile(r"\d+\.\d+\s*%|\d+\.\d+x\b|\b\d+(\.\d+)?\s*ms\b")
# A command: an inline ``python ...`` / ``bash ...`` span, or a fenced bash block.
NAMED_COMMAND = re.compile(r"`(python|bash|JAX_PLATFORMS=cpu python) [^`]+`|```bash")


def measured_tables(text: str) -> list[tuple[int, str]]:
    """``(line number, context)`` of every Markdown table holding a measured figure: the
    context is the text from the previous heading to the table's end."""
    lines, tables, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            table = "\n".join(lines[start:i])
            if FIGURE.search(table):
                heading = max((j for j in range(start) if lines[j].startswith("#")), default=0)
                tables.append((start + 1, "\n".join(lines[heading:i])))
        i += 1
    return tables


@pytest.mark.parametrize("doc", COMMAND_DOCS, ids=[str(d.relative_to(ROOT)) for d in COMMAND_DOCS])
def test_every_table_of_figures_names_its_command(doc):
    missing = [
        lineno
        for lineno, context in measured_tables(doc.read_text())
        if not NAMED_COMMAND.search(context)
    ]
    assert not missing, f"{doc.relative_to(ROOT)}: tables without their command at lines {missing}"


LINK = re.compile(r"\]\(([^)#]+)\)|<img src=\"([^\"]+)\"")


@pytest.mark.parametrize("doc", COMMAND_DOCS, ids=[str(d.relative_to(ROOT)) for d in COMMAND_DOCS])
def test_relative_links_exist(doc):
    targets = [a or b for a, b in LINK.findall(doc.read_text())]
    broken = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= MAX_README_LINES


# ------------------------------------------------------------------------ every user page

# What a user reads: the pages, the configs (their docstrings and comments) and the notebooks.
USER_PAGES = sorted(
    [
        *COMMAND_DOCS,
        ROOT / "experiments" / "study" / "results.md",
        *(ROOT / "configs").glob("*.py"),
        *(ROOT / "notebooks").glob("*.ipynb"),
    ]
)
PAGE_IDS = [str(p.relative_to(ROOT)) for p in USER_PAGES]


def page_text(page: pathlib.Path) -> str:
    """A page as its reader sees it (a notebook: its cells' sources, not their outputs)."""
    if page.suffix == ".ipynb":
        return "\n".join("".join(cell["source"]) for cell in json.loads(page.read_text())["cells"])
    return page.read_text()


# The project's own life, which belongs in git and notes, not on a user's page.
INTERNAL_PROCESS = {
    "an issue number": r"\bissues? #?\d+|(?<![\w&])#\d{2,}\b",
    "a date of work": r"\b20\d\d-\d\d-\d\d\b",
    "a CI run": r"\bCI\b|\.ci/",
    "a lent machine": r"\blent\b",
    "machine load": r"\b(idle|busy|shared|loaded)\b (machine|cores?|2-core)|\(shared\)|"
    r"other developers|beside other",
    "a rerun note": r"\brerun\b(?! the same command)",
    "history": r"\bis now\b|\bnow that\b|\bno longer\b|\bsince issue\b|'s target\b|target of \d",
}


@pytest.mark.parametrize("page", USER_PAGES, ids=PAGE_IDS)
def test_no_internal_process_on_user_pages(page):
    text = page_text(page)
    found = [
        f"{what}: {match.group(0)!r} (line {text[: match.start()].count(chr(10)) + 1})"
        for what, pattern in INTERNAL_PROCESS.items()
        for match in re.finditer(pattern, text)
    ]
    assert not found, f"{page.relative_to(ROOT)} carries internal process: {found}"


def test_internal_process_is_caught():
    for line in (
        "as issue 12 asked",
        "ran on 2026-11-29",
        "took 5 min in CI",
        "no GPU has been lent",
        "on the idle 2-core machine",
        "the demo rerun from a fresh clone",
        "the default is now DINO's rule",
        "the demo's target of 86%",
    ):
        assert any(re.search(p, line) for p in INTERNAL_PROCESS.values()), line
    assert not any(
        re.search(p, "rerun the same command to resume; rerunning the command resumes it")
        for p in INTERNAL_PROCESS.values()
    )


# A file a page names: `a/b.py`, `b.md`, `results/x.txt` (optionally `:variant`), or a bare
# name such as PAPER.md in a sentence.
NAMED_FILE = re.compile(
    r"(?<![\w/.<$-])((?:\.\./)?[\w-]+(?:/[\w.-]+)*\.(?:md|py|txt|json|png|ipynb|cff|toml|sh))\b"
)
REPO_FILES = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
# Files a run writes or a reader brings: named on the pages, not in the repository.
WRITTEN_BY_A_RUN = {
    "metrics.jsonl",
    "evaluation.json",
    "config.json",
    "plan.json",
    "validation.json",
    "goodput.json",
    "preprocessor_config.json",
    "neighbours.png",
    "embedding.png",
    "transport_plan.png",
    "confused_pairs.png",
    "main_dino.py",
    "eval_linear.py",
    "eval_knn.py",
    "vision_transformer.py",
    "utils.py",
    "train_compile.py",
    "cloud_tpu_cluster.py",
    "args.txt",
    "study_minutes.txt",
    "pytorch_model.bin",
    "commit_success.txt",
}


def named_files(text: str) -> list[str]:
    text = re.sub(r"https?://\S+", "", text)
    return [m.group(1) for m in NAMED_FILE.finditer(text)]


@pytest.mark.parametrize("page", USER_PAGES, ids=PAGE_IDS)
def test_every_file_a_page_names_exists(page):
    missing = []
    for name in named_files(page_text(page)):
        base = name.rsplit("/", 1)[-1]
        if base in WRITTEN_BY_A_RUN:
            continue
        if "/" in name:
            found = (page.parent / name).exists() or (ROOT / name).exists()
            found = found or any((ROOT / d / name).exists() for d in ("benchmarks", "experiments"))
        else:
            found = base in REPO_FILES
        if not found:
            missing.append(name)
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_a_missing_file_is_caught():
    assert named_files("(`../shared/PAPER.md` section 3), PAPER.md section 4") == [
        "../shared/PAPER.md",
        "PAPER.md",
    ]
    assert "PAPER.md" not in REPO_FILES


# Statements that were false on these pages, kept out (each was true of no code).
RETIRED = {
    "timm has no save_pretrained; its save_for_hf writes pytorch_model.bin by default": (
        r"save_pretrained|save_for_hf\((?![^)]*safe_serialization=True)"
    ),
    "for epsilon > 0 the entropic plan has full support and never equals J": (
        r"zero when every view|equality when the entropic plan|is zero only when the transport"
    ),
    "every cell of the study has run": r"have not run|has not run yet",
    "--mode=evaluate runs eval.protocols, knn,features unless told": (
        r"`--mode=evaluate` on a cell's workdir adds"
    ),
    "the demo's augmented probe crops are not its training crops": r"the training crops' \(",
    "a command ends where it ends": r"--config\.[\w.]+=\S+ \.\.\.$",
}


@pytest.mark.parametrize("page", USER_PAGES, ids=PAGE_IDS)
def test_retired_false_statements_stay_out(page):
    text = page_text(page)
    found = [
        why
        for why, pattern in RETIRED.items()
        if re.search(pattern.replace(" ", r"\s+"), text, re.M)
    ]
    assert not found, f"{page.relative_to(ROOT)}: {found}"


# ------------------------------------------------------------------------ the results page

RESULTS_PAGE = ROOT / "experiments" / "README.md"
STUDY_DIR = ROOT / "experiments" / "study"


def study_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def study_records() -> list[dict]:
    return json.loads((STUDY_DIR / "results.json").read_text())


def test_the_generated_report_is_the_results_json():
    """study/results.md is what `python experiments/study.py --report_only` writes now."""
    study = study_module()
    records = {r["name"]: r for r in study_records()}
    assert study.summarize(records) in (STUDY_DIR / "results.md").read_text()


def test_the_results_page_quotes_the_study():
    """Every mean ± std and every paired interval of the results page is the report's."""
    page, report = RESULTS_PAGE.read_text(), (STUDY_DIR / "results.md").read_text()
    stats = re.findall(r"\d+\.\d+ ± \d+\.\d+", page)
    intervals = re.findall(r"\[[-+]\d+\.\d+, [-+]\d+\.\d+\]", page)
    assert len(stats) >= 15 and len(intervals) >= 10
    missing = [s for s in stats + intervals if s not in report]
    assert not missing, f"experiments/README.md quotes figures the study did not measure: {missing}"


def test_every_question_of_the_study_has_its_table_and_command():
    page = RESULTS_PAGE.read_text()
    for group in sorted({r["group"] for r in study_records()}):
        command = f"python experiments/study.py --groups={group}"
        assert command in page, f"experiments/README.md: no section runs {command!r}"
        after = page.split(command, 1)[1].split("\n## ", 1)[0]
        assert "\n|" in after, f"experiments/README.md: {command!r} has no table after it"


def _mean(records, group, label, key):
    values = [r[key] for r in records if r["group"] == group and r["label"] == label]
    return 100 * sum(values) / len(values)


def test_what_each_method_loses_without_the_strong_set_is_derived_from_the_study():
    records = study_records()
    section = RESULTS_PAGE.read_text().split("--groups=strong", 1)[1].split("\n## ", 1)[0]
    rows = [r.split("|")[1:-1] for r in section.splitlines() if r.startswith("| ")][1:]
    assert {cells[0].strip() for cells in rows} == {"matching gap", "InfoNCE", "BYOL", "DINO"}
    for cells in rows:
        label = cells[0].strip()
        for column, key in ((5, "linear_probe_top1"), (6, "knn_top1")):
            lost = _mean(records, "strong", label, key) - _mean(records, "cropflip", label, key)
            assert float(cells[column]) == pytest.approx(lost, abs=0.006), (label, key)


def test_the_number_of_cells_the_pages_give_is_the_studys():
    study = study_module()
    cells = study.make_cells([0, 1, 2], study.GROUPS, cifar10=False, claim_seeds=[0, 1, 2, 3, 4])
    assert len(cells) == len(study_records())  # every cell of the default study has run
    quoted = {
        (str(page.relative_to(ROOT)), int(n))
        for page in USER_PAGES
        for n in re.findall(r"\ball (\d+) cells\b", page_text(page))
    }
    assert quoted, "no page gives the study's number of cells"
    assert all(n == len(cells) for _, n in quoted), quoted


# ------------------------------------------------------------------------ the loss's pages

LOSS_PAGE = ROOT / "docs" / "loss.md"


def table_after(text: str, marker: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``marker`` (header and rule dropped)."""
    at = text.index(marker)
    lines = text[text.rfind("\n", 0, at) + 1 :].splitlines()  # from the marker's line
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))])
    return rows


def test_the_loss_scale_table_is_the_helpers():
    from matching_gap import losses

    rows = table_after(LOSS_PAGE.read_text(), "print(losses.matching_gap_scale(0.8, 64))")
    assert len(rows) >= 4
    for epsilon, n, collapse, floor, mass in rows:
        scale = losses.matching_gap_scale(float(epsilon), int(n))
        assert float(collapse) == pytest.approx(scale["collapse"], abs=6e-5), (epsilon, n)
        assert float(floor) == pytest.approx(scale["floor"], abs=6e-5), (epsilon, n)
        assert float(mass.rstrip("%")) == pytest.approx(100 * scale["diagonal_mass"], abs=0.06)


def test_the_floor_the_pages_quote_is_the_loss_on_perfect_pairs():
    """Every "at epsilon E and N pairs ... the floor is F, with M% of the plan on the true
    pairs" of a user page, against the loss itself on N one-hot vectors paired with
    themselves (the helper is checked the same way in tests/test_losses.py)."""
    import jax.numpy as jnp

    from matching_gap import losses

    quoted = re.compile(
        r"epsilon\s+(\d+\.\d+)\s+and\s+(\d+)\s+pairs.{0,80}?"
        r"floor\s+is\s+(\d+\.\d+),\s+with\s+(\d+)%\s+of\s+the\s+plan",
        re.S,
    )
    found = [(p, m) for p in USER_PAGES for m in quoted.finditer(page_text(p))]
    assert {str(p.relative_to(ROOT)) for p, _ in found} >= {"README.md", "docs/loss.md"}
    for page, match in found:
        epsilon, n, floor, mass = match.groups()
        perfect = jnp.eye(int(n))
        tight = {"threshold": 1e-8, "max_iterations": 20000}
        value, _ = losses.matching_gap(
            perfect, perfect, epsilon=float(epsilon), sinkhorn_options=tight
        )
        plan = losses.transport_plan(
            perfect, perfect, epsilon=float(epsilon), sinkhorn_options=tight
        )
        assert float(floor) == pytest.approx(float(value), abs=6e-4), page
        assert int(mass) == round(100 * float(jnp.trace(plan))), page


def test_the_healthy_run_table_reads_its_share_of_the_way_from_the_helper():
    from matching_gap import losses

    text = LOSS_PAGE.read_text()
    collapse, floor = map(
        float, re.search(r"share of the way \(collapse (\d\.\d+), floor (\d\.\d+)\)", text).groups()
    )
    from matching_gap import config_lib

    config = config_lib.load_config_file(str(ROOT / "configs" / "default.py"))
    n = config.loss.group_size or config.optim.batch_size
    scale = losses.matching_gap_scale(config.loss.epsilon, n)
    assert (collapse, floor) == (round(scale["collapse"], 4), round(scale["floor"], 4))
    rows = table_after(text, "share of the way (collapse")
    assert len(rows) >= 3
    for row in rows:
        value, share = float(row[1]), float(row[2])
        assert share == round((collapse - value) / (collapse - floor), 2), row


def test_the_normalize_defaults_are_the_functions():
    import inspect

    from matching_gap import losses

    rows = table_after(LOSS_PAGE.read_text(), "**The `normalize` defaults differ")
    stated = {name.strip("`"): default.strip("`") for name, default, _ in rows}
    actual = {
        name: str(inspect.signature(getattr(losses, name)).parameters["normalize"].default)
        for name in stated
    }
    assert stated == actual
    assert set(stated) == {
        name
        for name in losses.__all__
        if inspect.isfunction(getattr(losses, name))
        and "normalize" in inspect.signature(getattr(losses, name)).parameters
    }


# ------------------------------------------------------------------------ docs/tpu.md's costs

RESULTS = ROOT / "benchmarks" / "results"


def test_the_tpu_costs_are_the_plans_at_the_assumed_and_the_measured_mfu():
    """docs/tpu.md's cost table from its sources: the v4-32 plans (analytic FLOPs, steps, the
    chip's peak), the MFU measured on the H200, and for v5e the remat the 16 GiB chip needs
    (XLA's FLOPs with remat over the model's, from the v5e plan)."""
    from matching_gap import plan

    plans = json.loads((RESULTS / "tpu_plan_v4-32.json").read_text())
    h200 = (RESULTS / "h200_train_throughput_vitb16_multicrop_b128.txt").read_text()
    measured = float(re.search(r"\| matching_gap \|[^\n]*\| (\d+\.\d+)% \|", h200).group(1))
    remat = (RESULTS / "tpu_plan_v5litepod-16_vitb16_remat.txt").read_text()
    assert "remat True" in remat and "fits                       yes" in remat
    xla, matmuls = map(
        float, re.search(r"XLA ([\d.]+) T, model matmuls ([\d.]+) T", remat).groups()
    )

    text = (ROOT / "docs" / "tpu.md").read_text()
    assert f"The only MFU measured for this step is {measured}%" in text
    rows, config = table_after(text, "| run | config | slice |"), None
    assert len(rows) == 5
    for _run, config_cell, slice_name, assumed, at_measured, hours in rows:
        config = config_cell or config
        recipe = re.search(r"`(\w+\.py)`", config).group(1)
        kind = re.match(r"(v\d\w*)-\d+", slice_name).group(1)
        p = plans[recipe]
        chip_hours = (
            p["flops_per_device_analytic"]
            * p["devices"]
            * p["recipe_steps"]
            / (plan.CHIP_HOURS_MFU * plan.CHIPS[kind].peak_flops)
            / 3600
        )
        if kind == "v5litepod":  # 16 GiB per chip: the step fits only with remat
            assert "--config.model.remat=True" in config, config
            chip_hours *= xla / matmuls
        slow = chip_hours * plan.CHIP_HOURS_MFU / (measured / 100)
        assert float(assumed) == pytest.approx(chip_hours, abs=0.051), (recipe, kind)
        assert float(at_measured) == pytest.approx(slow, abs=0.051), (recipe, kind)
        assert [float(h) for h in hours.split(" / ")] == [
            round(chip_hours / p["devices"], 1),
            round(slow / p["devices"], 1),
        ], (recipe, kind)


# ------------------------------------------------------------------------ config values quoted


def load(config: str):
    from matching_gap import config_lib

    path, _, arg = config.partition(":")
    return config_lib.load_config_file(str(ROOT / "configs" / path), arg or None)


def test_the_evaluation_settings_the_pages_quote_are_the_configs():
    demo, imagenet = load("default.py"), load("vitb16.py")
    evaluation = (ROOT / "docs" / "evaluation.md").read_text()
    epochs = re.search(
        r"`eval.probe_epochs` epochs \((\d+) for the demo, (\d+) for the ImageNet recipes\)",
        evaluation,
    )
    assert epochs, "docs/evaluation.md no longer says the features probe's epochs"
    assert tuple(map(int, epochs.groups())) == (demo.eval.probe_epochs, imagenet.eval.probe_epochs)
    crops = re.search(
        r"`eval.augmented_crop_scale`: \((\S+), (\S+)\) for the demo, whose training crops are "
        r"\((\S+), (\S+)\); DINO's \((\S+), (\S+)\) for ImageNet",
        evaluation,
    )
    assert crops, "docs/evaluation.md no longer says the augmented probe's crops"
    values = [float(v) for v in crops.groups()]
    assert values == [
        *demo.eval.augmented_crop_scale,
        *demo.augment.crop_scale,
        *imagenet.eval.augmented_crop_scale,
    ]
    default = re.search(r"runs `eval.protocols` \(default `([\w,]+)`", evaluation).group(1)
    assert default == demo.eval.protocols == schema.EvalConfig().protocols
    for recipe in ("vitb16.py", "vits16.py", "dino_vits16.py", "m3g_vitb16.py"):
        assert load(recipe).eval.protocols == "knn,features,augmented", recipe
    recipes = (ROOT / "experiments" / "recipes.md").read_text()
    quoted = re.findall(r"`(?:eval\.)?probe_epochs`:? (\d+)", recipes)
    assert quoted and {int(q) for q in quoted} == {imagenet.eval.probe_epochs}, quoted


def test_one_raw_pixel_baseline_on_every_page():
    """The raw pixels' figures are the demo's own row (its normalised inputs, the same probe
    and k-NN) wherever a page quotes them."""
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| raw pixels"))
    figures = set(re.findall(r"\d+\.\d+%?", row))
    found = {}
    for page in USER_PAGES:
        for line in page_text(page).splitlines():
            if line.startswith("| raw pixels"):  # a row of figures
                quoted = {f.rstrip("%") for f in re.findall(r"\d+\.\d+%?", line)}
                found[(page.name, line[:40])] = quoted - {f.rstrip("%") for f in figures}
    assert len(found) >= 3
    assert not any(found.values()), {k: v for k, v in found.items() if v}


SCRIPT = re.compile(r"python (?:-u )?((?:experiments|benchmarks)/\w+\.py)((?: +--\w+(?:=\S+)?)*)")


def test_every_script_flag_a_page_names_exists():
    """``python experiments/study.py --groups=...``, ``python benchmarks/x.py --flag``: the
    script exists and defines each flag (argparse's ``"--flag"`` or absl's ``DEFINE_*``)."""
    seen, missing = 0, []
    for page in USER_PAGES:
        text = " ".join(line.strip().rstrip("\\") for line in page_text(page).splitlines())
        for match in SCRIPT.finditer(text):
            script = ROOT / match.group(1)
            assert script.is_file(), f"{page.relative_to(ROOT)} names {match.group(1)}"
            source = script.read_text()
            for flag in re.findall(r"--(\w+)", match.group(2)):
                seen += 1
                defined = f'"--{flag}"' in source or re.search(rf'DEFINE_\w+\(\s*"{flag}"', source)
                if not defined and not (flag == "config" and "config_flags" in source):
                    missing.append(f"{page.relative_to(ROOT)}: {match.group(1)} --{flag}")
    assert seen > 10 and not missing, missing


def test_every_config_variant_a_page_names_loads():
    """``configs/default.py:cropflip``, ``m3g_vitb16.py:k=2``: each config file and variant a
    page names in passing (outside a command) loads."""
    named = {
        (m.group(1), m.group(2))
        for page in USER_PAGES
        for m in re.finditer(r"`(?:configs/)?(\w+\.py):([\w=,]+)`", page_text(page))
        if (ROOT / "configs" / m.group(1)).is_file()
    }
    assert len(named) >= 5, named
    for path, variant in sorted(named):
        load(f"{path}:{variant}")


def test_the_evaluation_page_measures_the_readmes_demo_checkpoint():
    """docs/evaluation.md's protocols ran on the checkpoint of the README's demo run: its k-NN
    and `features` rows are the figures that run printed (the README's trained row)."""
    readme = (ROOT / "README.md").read_text()
    trained = next(line for line in readme.splitlines() if line.startswith("| trained encoder"))
    probe, knn = re.findall(r"\d+\.\d+%", trained)
    rows = table_after((ROOT / "docs" / "evaluation.md").read_text(), "| protocol | top-1 |")
    top1 = {name.strip("`"): value for name, value, _ in rows}
    assert (top1["features"], top1["knn"]) == (probe, knn)
