"""requirements.txt and constraints.txt cover what the project needs.

setup_env.sh installs ``-r requirements.txt -c constraints.txt`` on a fresh machine. A
package the code imports but no requirement names arrives there only by luck (as some
other package's dependency, until that changes); a requirement whose dependencies are not
all locked floats with upstream releases; a lock that disagrees with a requirement makes
pip fail. Imports are read from the source with ``ast``; dependencies from the installed
distributions' metadata (this environment was installed from the two files).
"""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")
PROJECT_PACKAGES = ("algorithms", "envs", "utils", "runners", "train", "tests")
# Imported by the code but installed otherwise: top-level import name -> why.
NOT_FROM_REQUIREMENTS = {
    "smac": "oxwhirl's SMAC, installed by install_sc2.sh with StarCraft II (PyPI's `smac` is SMAC3)",
}
UNLOCKED = {"torch"}  # pinned in requirements.txt only: the CPU wheel's version is '2.13.0+cpu'


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _guards_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError"}
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(t, ast.Name) and t.id in names for t in types):
            return True
    return False


def imported_top_level_names() -> dict[str, str]:
    """Top-level names of the absolute imports in the project's code that it needs (an
    import inside ``try: ... except ImportError`` is optional), each with one place it is
    imported."""
    found: dict[str, str] = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            optional = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.Try) and _guards_import_error(node)
                        for stmt in node.body for sub in ast.walk(stmt)}
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def third_party(names: dict[str, str]) -> dict[str, str]:
    return {name: where for name, where in names.items()
            if name not in sys.stdlib_module_names and name not in PROJECT_PACKAGES and name != "__future__"}


def dependency_closure(roots: list[str]) -> dict[str, str]:
    """Every distribution that installing ``roots`` installs here (markers evaluated for this
    interpreter and platform, extras followed as requested), name -> installed version."""
    closure: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(extras)
        dist = metadata.distribution(name)  # PackageNotFoundError: a requirement is not installed
        closure[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = [{"extra": extra} for extra in (extras or {""})]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in wanted):
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return closure


def test_every_requirement_is_pinned_and_locked_at_the_same_version():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    unpinned = [line for line in lines if not PIN.match(line)]
    assert not unpinned, f"requirements.txt entries without an exact == pin: {unpinned}"
    required, locked = _pins(ROOT / "requirements.txt"), _pins(ROOT / "constraints.txt")
    assert not UNLOCKED & set(locked), f"constraints.txt must not pin {UNLOCKED} (local wheel versions)"
    mismatched = {name: (version, locked.get(name)) for name, version in required.items()
                  if name not in UNLOCKED and locked.get(name) != version}
    assert not mismatched, (f"constraints.txt disagrees with requirements.txt (run "
                            f"scripts/lock_requirements.sh): {mismatched}")


def test_every_imported_package_is_a_requirement():
    imported = third_party(imported_top_level_names())
    assert {"torch", "numpy", "yaml", "pytest"} <= set(imported), sorted(imported)  # the scan sees the code
    providers = metadata.packages_distributions()
    required = set(_pins(ROOT / "requirements.txt"))
    missing = []
    for name, where in sorted(imported.items()):
        if name in NOT_FROM_REQUIREMENTS:
            continue
        dists = {canonicalize_name(d) for d in providers.get(name, [])}
        if not dists & required:
            provided = f"provided here by {', '.join(sorted(dists))}" if dists else "not installed"
            missing.append(f"{name} ({where}; {provided})")
    assert not missing, "imported but not in requirements.txt: " + "; ".join(missing)


def test_the_lock_pins_every_requirement_with_everything_it_pulls_in():
    required, locked = _pins(ROOT / "requirements.txt"), _pins(ROOT / "constraints.txt")
    closure = dependency_closure(list(required))
    assert {"filelock", "sympy", "mpmath", "ml-dtypes"} <= set(closure)  # torch's and jax's, and theirs
    unlocked = sorted(set(closure) - set(locked) - UNLOCKED)
    assert not unlocked, (f"installed as dependencies of requirements.txt but not pinned in constraints.txt "
                          f"(run scripts/lock_requirements.sh): {unlocked}")
    wrong = {name: (closure[name], locked[name]) for name in closure
             if name in locked and closure[name] != locked[name]}
    assert not wrong, f"installed versions differ from constraints.txt (installed, locked): {wrong}"
    stale = sorted(set(locked) - set(closure))
    assert not stale, ("constraints.txt pins packages no requirement pulls in (run scripts/lock_requirements.sh): "
                       f"{stale}")


def test_closure_follows_markers_and_extras(tmp_path, monkeypatch):
    """dependency_closure against made-up metadata: a marker that excludes, an extra that
    only counts when requested."""
    dists = {
        "a": ["b", 'c; python_version < "3.0"', "d[fast]"],
        "b": ['e; extra == "docs"'],
        "d": ['f; extra == "fast"', 'g; extra == "slow"'],
        "f": [], "e": [], "g": [], "c": [],
    }

    class Fake:
        def __init__(self, name):
            self.requires, self.version = dists[name], "1.0"

    monkeypatch.setattr(metadata, "distribution", Fake)
    assert sorted(dependency_closure(["a"])) == ["a", "b", "d", "f"]
