"""The package's import graph has no cycle (imports inside functions included)."""

from __future__ import annotations

import ast
import pathlib

import matching_gap

PACKAGE = pathlib.Path(matching_gap.__file__).parent


def import_graph(package_dir: pathlib.Path, *, skip=frozenset()) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, from every ``import`` statement of
    every module of ``package_dir`` (at the top or inside a function). ``skip``: ``(module,
    imported)`` edges left out."""
    package = package_dir.name
    modules = {p.stem for p in package_dir.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in sorted(modules):
        edges = set()
        for node in ast.walk(ast.parse((package_dir / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package if node.level else node.module or ""
                if node.level and node.module:
                    base = f"{package}.{node.module}"
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] == package and len(parts) > 1 and parts[1] in modules:
                    edges.add(parts[1])
        graph[name] = {m for m in edges if m != name and (name, m) not in skip}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def _assert_acyclic(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in matching_gap: " + " -> ".join(cycle)


def test_find_cycle_names_a_function_level_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("import os\n\ndef f():\n    from pkg.c import g\n")
    (package / "c.py").write_text("def g():\n    from . import a\n")
    graph = import_graph(package)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle(import_graph(package, skip={("c", "a")})) is None


def test_no_import_cycle():
    _assert_acyclic(import_graph(PACKAGE))
