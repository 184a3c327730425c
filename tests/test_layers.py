"""Static checks of the package's import graph: no import cycles, imports only down the layers of docs/DESIGN.md, no private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "c2vkd_hf"

#: The rows of the layer table in docs/DESIGN.md, bottom first: a module may import from its own row and the rows
#: before it. Entries are paths relative to c2vkd_hf/ (a folder ends in "/"); the longest matching entry wins, so
#: ``data/decoded.py`` sits in its own row above the rest of ``data/``.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("constants", ("constants.py", "errors.py", "images.py")),
    ("config", ("config.py",)),
    ("validation", ("validation.py",)),
    ("data", ("data/",)),
    ("models", ("models/", "__init__.py")),  # the package's __init__ imports models/ to register them
    ("losses", ("losses/",)),
    ("text", ("text.py", "vocabulary.py", "vocab/")),
    ("text head", ("text_head.py", "text_query.py")),
    ("decoded cache", ("data/decoded.py", "files.py")),
    ("teacher cache", ("cache/",)),
    ("teacher", ("teacher.py",)),
    ("locks and recipes", ("locks.py", "recipes/")),
    ("trainer and runs", ("trainer/", "console.py", "runs.py", "metrics.py")),
    ("inference", ("inference.py",)),
    ("jobs and CLI", ("jobs/", "cli/")),
    ("publish", ("model_card.py", "templates/", "jobs/publish.py")),
    ("benchmarks", ("benchmark/", "speed/", "cli/benchmark.py")),  # cli/benchmark.py: the c2vkd-benchmark command
]

#: Imports that go up the table on purpose: (importer, imported module) -> why. Each must still exist.
UPWARD_ALLOWED: dict[tuple[str, str], str] = {
    ("c2vkd_hf.jobs", "c2vkd_hf.jobs.publish"): "c2vkd_hf.jobs re-exports push_student_to_hub",
    ("c2vkd_hf.jobs.distill", "c2vkd_hf.model_card"): "the distillation job writes the student's card",
}


def _module_name(path: Path) -> str:
    """The dotted name of a module file of the package (``c2vkd_hf.data`` for ``data/__init__.py``)."""
    parts = ("c2vkd_hf",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` of every import of a package module in module ``name``,
    at module level or inside functions; a name that is itself a module counts as that module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.split(".")[0] == "c2vkd_hf"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "c2vkd_hf":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule, "", node.lineno) if submodule in MODULES
                             else (source, alias.name, node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package (the module itself left out)."""
    return {name: {target for target, _, _ in _imports(name) if target in MODULES and target != name}
            for name in MODULES}


def _rank(name: str) -> tuple[int, str]:
    """(row index, row name) of a module in :data:`LAYERS`, by the longest matching entry."""
    relative = MODULES[name].relative_to(PACKAGE).as_posix()
    best = None
    for index, (row, entries) in enumerate(LAYERS):
        for entry in entries:
            if relative == entry or (entry.endswith("/") and relative.startswith(entry)):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index, row)
    if best is None:
        raise AssertionError(f"{relative} is in no row of LAYERS (tests/test_layers.py): add it to the row of "
                             f"docs/DESIGN.md's layer table it belongs to")
    return best[1], best[2]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_every_module_has_a_layer():
    """Every module of the package is in a row of the layer table."""
    for name in MODULES:
        _rank(name)


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it (lazy imports count too)."""
    edges = _edges()
    cycles = _cycles(edges)
    described = ["; ".join(f"{a} -> {b}" for a in cycle for b in sorted(edges[a] & set(cycle))) for cycle in cycles]
    assert not cycles, "import cycles:\n  " + "\n  ".join(described)


def test_imports_go_down_the_layers():
    """A module imports only from its own row of docs/DESIGN.md's layer table or the rows below it."""
    upward = []
    for name in MODULES:
        rank, row = _rank(name)
        for target, _, line in _imports(name):
            if target not in MODULES or target == name:
                continue
            target_rank, target_row = _rank(target)
            if target_rank > rank and (name, target) not in UPWARD_ALLOWED:
                upward.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} ({row}) imports "
                              f"{target} ({target_row})")
    assert not upward, "imports up the layers:\n  " + "\n  ".join(sorted(set(upward)))


def test_allowed_upward_imports_still_exist():
    """Each entry of :data:`UPWARD_ALLOWED` is still an import (remove the ones that are gone)."""
    edges = _edges()
    stale = [f"{a} -> {b}" for a, b in UPWARD_ALLOWED if b not in edges.get(a, set())]
    assert not stale, "UPWARD_ALLOWED entries without an import: " + ", ".join(stale)


@pytest.mark.parametrize("lower, higher", [
    ("data/", ("cache/", "trainer/", "jobs/", "cli/", "teacher.py", "inference.py")),
    ("losses/", ("trainer/", "jobs/", "cli/", "data/", "cache/")),
    ("validation.py", ("data/", "models/", "losses/", "cache/", "trainer/", "jobs/", "cli/")),
    ("models/", ("data/", "losses/", "cache/", "trainer/", "jobs/", "cli/")),
    ("cache/", ("trainer/", "jobs/", "cli/", "teacher.py")),
])
def test_lower_layers_never_import_higher_ones(lower, higher):
    """The boundaries most likely to be crossed, spelled out (a subset of the layer check, with plainer failures)."""
    def under(name: str, entry: str) -> bool:
        relative = MODULES[name].relative_to(PACKAGE).as_posix()
        return relative == entry or (entry.endswith("/") and relative.startswith(entry))

    crossings = [f"{name} imports {target}" for name in MODULES if under(name, lower)
                 for target, _, _ in _imports(name) if target in MODULES
                 and any(under(target, entry) for entry in higher)]
    assert not crossings, "\n".join(crossings)


def test_no_private_names_imported_across_modules():
    """No module imports another module's ``_private`` name (make it public or move it where it is used)."""
    private = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} imports {source}.{imported}"
               for name in MODULES for source, imported, line in _imports(name)
               if imported.startswith("_") and not imported.startswith("__") and source != name]
    assert not private, "private names imported from other modules:\n  " + "\n  ".join(private)
