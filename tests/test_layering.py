"""The project's imports run one way: entry points (train/) on top, then runners/, then
algorithms/, envs/ and utils/; utils/errors.py at the bottom imports nothing of the project.

Read from the source with ``ast`` (nothing is imported), so a violation is named by file
and line whatever it would cost to import.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("algorithms", "envs", "utils", "runners", "train")
LIBRARY = ("algorithms", "envs", "utils", "runners")  # below the entry points

# Imports of project modules inside a function, each with why it cannot sit at the top of
# its module: (importing module, imported module) -> reason.
_TORCH = "imports torch, which `--help` and a rejected flag answer without (a second or two)"
LOCAL_IMPORTS_ALLOWED = {
    ("train.render", "runners.evaluate"): _TORCH,
    ("train.render", "utils.device"): _TORCH,
    ("train.train", "runners.evaluate"): _TORCH,
    ("train.train", "utils.device"): _TORCH,
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the file holding the statement
    imported: str  # dotted name of the project module it loads
    line: int
    local: bool  # inside a function body


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` loads: itself, or for ``package.attribute`` the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, importer: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = importer.split(".")
            if not modules[importer].name == "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        # ``from package import name``: ``name`` may be a submodule, else an attribute
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return [target for target in (_resolve(n, modules) for n in names) if target is not None]


@functools.cache  # the files are read once per session
def project_imports() -> tuple[Import, ...]:
    modules = project_modules()
    found: set[Import] = set()  # ``from m import a, b``: one import of m
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        inside_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for imported in _targets(node, importer, modules):
                    if imported != importer:
                        found.add(Import(importer, imported, node.lineno, id(node) in inside_function))
    return tuple(sorted(found, key=lambda i: (i.importer, i.line, i.imported)))


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each listed
    as one cycle through its modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
    return [_cycle_through(component, edges) for component in sorted(components)]


def _cycle_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One cycle from the component's first module back to it (a shortest one, by BFS)."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(edges.get(node, set()) & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if nxt not in parents:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return component


def test_the_scan_sees_the_project():
    """The checks below would pass vacuously on an empty graph or a parser that misses imports."""
    imports = project_imports()
    pairs = {(i.importer, i.imported) for i in imports}
    assert ("runners.runner", "algorithms") in pairs or ("runners.runner", "algorithms.registry") in pairs
    assert ("algorithms.happo", "algorithms.base") in pairs
    assert ("train.train", "train.config") in pairs
    assert len(project_modules()) > 30


def test_library_does_not_import_the_entry_points():
    wrong = [f"{i.importer} (line {i.line}) imports {i.imported}" for i in project_imports()
             if i.importer.split(".")[0] in LIBRARY and i.imported.split(".")[0] == "train"]
    assert not wrong, "algorithms/, envs/, utils/ and runners/ must not import train/: " + "; ".join(wrong)


def test_errors_module_is_the_bottom_layer():
    assert not [i for i in project_imports() if i.importer == "utils.errors"]


def test_no_import_cycles():
    """Function-local imports count too: a cycle dodged by importing inside a function is
    still two modules that each need the other."""
    edges: dict[str, set[str]] = {}
    for i in project_imports():
        edges.setdefault(i.importer, set()).add(i.imported)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_function_local_imports_of_project_modules():
    local = [i for i in project_imports() if i.local]
    unexplained = sorted({f"{i.importer} (line {i.line}) imports {i.imported}" for i in local
                          if (i.importer, i.imported) not in LOCAL_IMPORTS_ALLOWED})
    assert not unexplained, ("import project modules at the top of the module (or add the pair to "
                             "LOCAL_IMPORTS_ALLOWED with the reason): " + "; ".join(unexplained))
    stale = sorted(set(LOCAL_IMPORTS_ALLOWED) - {(i.importer, i.imported) for i in local})
    assert not stale, f"LOCAL_IMPORTS_ALLOWED lists imports that are no longer local: {stale}"


@pytest.mark.parametrize("edges,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b", "a"], ["c", "d", "c"]]),
], ids=["acyclic", "pair", "triangle", "two"])
def test_find_cycles(edges, expected):
    assert find_cycles(edges) == expected
