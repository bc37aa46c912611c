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
import os
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
# What decides a run's numbers: a change elsewhere (README, docs/, tests/) is not new code.
CODE_PATHS = ("algorithms", "envs", "runners", "utils", "train", "configs", "requirements.txt",
              "constraints.txt")
# The same bytes whatever the user's git configuration (external diff tools, prefixes, colour).
_DIFF = ("diff", "HEAD", "--binary", "--no-ext-diff", "--no-textconv", "--no-color",
         "--src-prefix=a/", "--dst-prefix=b/", "--relative")


def git_revision(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """The revision of the code at ``root``:

    * ``commit``: HEAD of the checkout holding ``root`` (of an enclosing repository too,
      when the project is vendored into one);
    * ``dirty``, ``n_changed``, ``changed`` (paths from the repository's top, at most
      MAX_LISTED_CHANGES): tracked files under ``root`` that differ from HEAD; untracked files (results, venvs) do not
      count; ``diff_sha256``: sha256 of that diff, None when clean;
    * ``code_sha256``: sha256 of CODE_PATHS as committed plus their uncommitted diff: two
      sessions ran the same code when these are equal, whatever else changed.

    None where ``root`` is not in a git checkout with a commit, or git is missing (a copied
    tree). If git answers the commit but not the rest, the rest is None.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take index.lock beside the user's git

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-c", "core.quotepath=off", *args], cwd=root, env=env,
                              capture_output=True, timeout=10, check=True).stdout
    failures = (OSError, subprocess.SubprocessError, UnicodeDecodeError)
    try:
        commit = git("rev-parse", "HEAD").decode().strip()
    except failures:
        return None
    unknown = {"commit": commit, "dirty": None, "n_changed": None, "changed": None,
               "diff_sha256": None, "code_sha256": None}
    try:
        status = git("status", "--porcelain", "-z", "--untracked-files=no", "--", ".")
        changed = _porcelain_paths(status.decode())
        diff = hashlib.sha256(git(*_DIFF, "--", ".")).hexdigest() if changed else None
        committed = git("ls-tree", "-r", "HEAD", "--", *CODE_PATHS)
        code_diff = git(*_DIFF, "--", *CODE_PATHS) if changed else b""
    except failures:
        return unknown
    return {**unknown, "dirty": bool(changed), "n_changed": len(changed),
            "changed": changed[:MAX_LISTED_CHANGES], "diff_sha256": diff,
            "code_sha256": hashlib.sha256(committed + b"\0" + code_diff).hexdigest()}


def _porcelain_paths(status: str) -> list[str]:
    """Paths in ``git status --porcelain -z`` output ("XY path" entries; a rename or copy
    is followed by an entry holding its original path)."""
    entries, paths, skip = status.split("\0"), [], False
    for entry in entries:
        if skip:
            skip = False
        elif len(entry) > 3:
            paths.append(entry[3:])
            skip = entry[0] in "RC"
    return paths


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
        "cwd": os.getcwd(),  # relative --config / --results_dir paths are relative to it
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
    return [x for x in sessions if isinstance(x, dict)] if isinstance(sessions, list) else []


def revision_label(rev: dict[str, Any] | None) -> str:
    """"<commit[:10]>", "<commit[:10]>+<diff_sha256[:8]>" for uncommitted changes, or "?"
    where the revision is unknown."""
    if not isinstance(rev, dict) or not rev.get("commit"):
        return "?"
    diff = rev.get("diff_sha256")
    return str(rev["commit"])[:10] + (f"+{str(diff)[:8]}" if diff else "")


def code_identity(rev: dict[str, Any] | None) -> str | None:
    """What two sessions must share to have run the same code: ``code_sha256`` where
    recorded, else the revision label; None where unknown."""
    if isinstance(rev, dict) and rev.get("code_sha256"):
        return str(rev["code_sha256"])
    label = revision_label(rev)
    return None if label == "?" else label


def code_change_note(previous: list[dict[str, Any]], record: dict[str, Any]) -> str | None:
    """One line when this session runs other code (CODE_PATHS) than the run's last session."""
    if not previous:
        return None
    last = previous[-1] if isinstance(previous[-1], dict) else {}
    before, now = last.get("git"), record.get("git")
    identities = code_identity(before), code_identity(now)
    if None in identities or identities[0] == identities[1]:
        return None
    return (f"note: this run's last session ran {revision_label(before)}; this one runs "
            f"{revision_label(now)}, with other code (+: uncommitted changes, by diff hash; see "
            f"{RUN_INFO})")


def append_session(run_dir: Path, record: dict[str, Any]) -> None:
    sessions = read_sessions(run_dir) + [record]
    text = json.dumps({"sessions": sessions}, indent=1)
    atomic_write_bytes(Path(run_dir) / RUN_INFO, (text + "\n").encode())
