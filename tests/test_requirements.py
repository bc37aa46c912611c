"""requirements.txt and constraints.txt agree, and every installed package matches the lock.

setup_env.sh installs ``-r requirements.txt -c constraints.txt``; a lock that disagrees with
a requirement makes pip fail on a fresh machine, and a lock that misses a package leaves it
to float with upstream releases.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_every_requirement_is_pinned_and_locked_at_the_same_version():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    unpinned = [line for line in lines if not PIN.match(line)]
    assert not unpinned, f"requirements.txt entries without an exact == pin: {unpinned}"
    required, locked = _pins(ROOT / "requirements.txt"), _pins(ROOT / "constraints.txt")
    assert "torch" not in locked, "constraints.txt must not pin torch (its local wheel is '+cpu')"
    mismatched = {name: (version, locked.get(name)) for name, version in required.items()
                  if name != "torch" and locked.get(name) != version}
    assert not mismatched, (f"constraints.txt disagrees with requirements.txt (run "
                            f"scripts/lock_requirements.sh): {mismatched}")


def test_installed_packages_match_the_lock():
    locked = _pins(ROOT / "constraints.txt")
    wrong = {}
    for name, version in locked.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # locked but not needed on this platform
        if installed != version:
            wrong[name] = (installed, version)
    assert not wrong, f"installed versions differ from constraints.txt (installed, locked): {wrong}"
