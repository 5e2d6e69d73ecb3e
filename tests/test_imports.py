"""The package's import graph has no cycle (imports inside functions included), and no module
of a sub-package imports the sub-package's own ``__init__`` (an import that runs back up)."""

from __future__ import annotations

import ast
import pathlib

import matching_gap

PACKAGE = pathlib.Path(matching_gap.__file__).parent


def import_graph(package_dir: pathlib.Path, *, skip=frozenset()) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, from every ``import`` statement of
    every module of ``package_dir`` and of its sub-packages (at the top or inside a
    function). Modules are named below the package (``train``, ``data.tfds``); a
    sub-package's ``__init__`` goes by the sub-package's name (``data``). Importing ``a.b``
    runs ``a``'s ``__init__`` first, so from outside ``a`` it counts as importing ``a`` too;
    ``from a import b`` of a module ``b`` reads none of ``a``'s names. ``skip``: ``(module,
    imported)`` edges left out."""
    package = package_dir.name
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            files[".".join(parts)] = path
    modules = set(files)

    def chain(dotted: str) -> list[str]:
        """The package's modules that importing ``dotted`` runs, outermost first."""
        parts = dotted.split(".")
        if parts[0] != package:
            return []
        return [m for m in (".".join(parts[1:i]) for i in range(2, len(parts) + 1)) if m in modules]

    graph = {}
    for name, path in sorted(files.items()):
        # the sub-package this module belongs to ("" for the package itself)
        home = name if path.name == "__init__.py" else name.rpartition(".")[0]
        home_parts = [package, *filter(None, home.split("."))]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                chains = [chain(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = home_parts[: len(home_parts) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                chains = []
                for alias in node.names:
                    named = chain(f"{base}.{alias.name}")
                    submodule = named and named[-1] == f"{base}.{alias.name}".split(".", 1)[1]
                    chains.append(named if submodule else chain(base))
            else:
                continue
            for imported in chains:
                for target in imported:
                    # the package a module lives in is imported before it: no edge of its own
                    around = target == home or home.startswith(target + ".")
                    if target != imported[-1] and around:
                        continue
                    edges.add(target)
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


def test_sub_packages_are_nodes_and_a_module_does_not_import_its_own_package(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.a import f\n")
    (package / "sub" / "a.py").write_text("from pkg.sub import b\nfrom . import c\n")
    (package / "sub" / "b.py").write_text("import pkg.top\n")
    (package / "sub" / "c.py").write_text("from pkg.sub import f\n")  # upward
    (package / "top.py").write_text("def g():\n    from pkg.sub.b import h\n")
    graph = import_graph(package)
    assert graph == {
        "sub": {"sub.a"},
        "sub.a": {"sub.b", "sub.c"},
        "sub.b": {"top"},
        "sub.c": {"sub"},
        "top": {"sub", "sub.b"},
    }
    assert upward_imports(graph) == [("sub.c", "sub")]
    # top imports sub.b inside a function, which runs sub's __init__ first
    assert find_cycle(graph) == ["sub", "sub.a", "sub.b", "top", "sub"]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, package)`` where a module imports the ``__init__`` of a package it is in."""
    return sorted(
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if name.startswith(target + ".")
    )


def test_no_import_cycle():
    _assert_acyclic(import_graph(PACKAGE))


def test_no_module_imports_the_package_it_is_in():
    graph = import_graph(PACKAGE)
    assert {"data", "data.tfds", "evaluation", "evaluation.knn"} <= set(graph)
    assert upward_imports(graph) == []
