"""The docs cannot go stale: every ``python -m matching_gap.main ...`` command in the README
and ``docs/`` parses with the command line's own parser and its config passes the schema; the
Python snippets of the README and ``docs/loss.md`` run; every table of measured figures names
the command that produced it; relative links point at files that exist.

Nothing is trained: a command is parsed as ``main.parse_flags`` parses it (absl flags with
ml_collections' ``config_flags``, so every ``--config.x.y=value`` is checked against the
config file's locked ConfigDict and converted to the field's type), then
``schema.parse`` checks every field and how the sections fit, as ``main.main`` does first.
"""

from __future__ import annotations

import copy
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
    [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
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


def all_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for doc in COMMAND_DOCS:
        for lineno, argv in main_commands(doc.read_text()):
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
    assert {"README.md", "docs/training.md", "docs/tpu.md", "docs/evaluation.md"} <= docs


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
