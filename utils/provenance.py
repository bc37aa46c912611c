"""What produced a run: the code revision, the packages, the machine and the command.

Every start and every ``--resume`` appends one record to ``<run dir>/run_info.json``
(``{"sessions": [record, ...]}``), so a figure can be traced to the code that made it,
and a run resumed on other code says so. Nothing here imports the packages it names
(versions come from their installed metadata), and the git calls run before JAX starts
its threads (forking a process that runs JAX's threads draws a warning).
"""
from __future__ import annotations

import hashlib
import json
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from utils.checkpoint import atomic_write_bytes

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUN_INFO = "run_info.json"
# The distributions whose versions decide the numbers (simulators, autodiff, arrays).
PACKAGES = ("torch", "numpy", "gymnasium", "gymnasium-robotics", "mujoco", "pettingzoo",
            "jax", "jaxlib", "jaxmarl", "smac", "pysc2")
MAX_LISTED_CHANGES = 50  # changed files listed for a dirty tree (the count is always given)


def git_revision(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """{"commit", "dirty", "n_changed", "changed": [paths], "diff_sha256"} of the checkout
    at ``root``; ``diff_sha256`` (of ``git diff HEAD``, None when clean) tells two dirty
    sessions on one commit apart. None where ``root`` is not a git checkout or git is
    missing (a copied tree). Untracked files are not counted: results directories and
    venvs live in the tree.
    """
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=10,
                              check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").decode().strip()
        status = git("status", "--porcelain", "--untracked-files=no").decode().splitlines()
        changed = [line[3:] for line in status if line.strip()]
        diff = hashlib.sha256(git("diff", "HEAD", "--binary")).hexdigest() if changed else None
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None
    return {"commit": commit, "dirty": bool(changed), "n_changed": len(changed),
            "changed": changed[:MAX_LISTED_CHANGES], "diff_sha256": diff}


def package_versions() -> dict[str, str]:
    """Installed versions of PACKAGES; packages not installed are left out."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def session_record(argv: list[str]) -> dict[str, Any]:
    """This process's record; the runner adds ``device`` and ``torch_threads`` once known."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "train.train", *argv]),
        "git": git_revision(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "host": platform.node(),
        "platform": platform.platform(),
    }


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The records already in ``run_dir``; [] for a run made before run_info.json existed."""
    path = Path(run_dir) / RUN_INFO
    try:
        sessions = json.loads(path.read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):
        return []
    return sessions if isinstance(sessions, list) else []


def revision_label(rev: dict[str, Any] | None) -> str:
    """"<commit[:10]>", "<commit[:10]>+<diff_sha256[:8]>" for uncommitted changes, or "?"
    where the revision is unknown."""
    if not isinstance(rev, dict) or not rev.get("commit"):
        return "?"
    diff = rev.get("diff_sha256")
    return str(rev["commit"])[:10] + (f"+{str(diff)[:8]}" if diff else "")


def code_change_note(previous: list[dict[str, Any]], record: dict[str, Any]) -> str | None:
    """One line when this session runs other code than the run's last session did."""
    if not previous:
        return None
    before, now = revision_label(previous[-1].get("git")), revision_label(record.get("git"))
    if before == now or "?" in (before, now):
        return None
    return (f"note: this run's last session ran {before}; this one runs {now} (+: uncommitted "
            f"changes, by diff hash; see {RUN_INFO})")


def append_session(run_dir: Path, record: dict[str, Any]) -> None:
    sessions = read_sessions(run_dir) + [record]
    text = json.dumps({"sessions": sessions}, indent=1)
    atomic_write_bytes(Path(run_dir) / RUN_INFO, (text + "\n").encode())
