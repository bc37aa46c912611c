"""run_info.json: every start and resume records the code revision, packages, machine and
command (utils/provenance.py). git is exercised on throw-away repositories; the record of
a real run is checked against what this process sees."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from train.train import main
from utils import provenance

TINY = ["--n_rollout_threads", "2", "--episode_length", "50", "--hidden_sizes", "16,16",
        "--ppo_epoch", "1", "--critic_epoch", "1", "--eval_episodes", "1", "--n_eval_rollout_threads",
        "1", "--device", "cpu", "--torch_threads", "1", "--no-progress", "--no-tensorboard"]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                           *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A repository with a code file, a doc and a file whose name has a space."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never an enclosing repo
    path = tmp_path / "repo"
    (path / "algorithms").mkdir(parents=True)
    git(path, "init", "-q")
    (path / "algorithms" / "a.py").write_text("x = 1\n")
    (path / "README.md").write_text("words\n")
    (path / "my notes.txt").write_text("n\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "one")
    return path


@needs_git
def test_git_revision_names_the_commit_and_what_changed(repo):
    clean = provenance.git_revision(repo)
    assert clean["commit"] == git(repo, "rev-parse", "HEAD") and len(clean["code_sha256"]) == 64
    assert (clean["dirty"], clean["n_changed"], clean["changed"], clean["diff_sha256"]) == (False, 0, [], None)
    (repo / "results.csv").write_text("untracked files (results, venvs) do not count\n")
    assert provenance.git_revision(repo)["dirty"] is False
    (repo / "algorithms" / "a.py").write_text("x = 2\n")
    (repo / "my notes.txt").write_text("m\n")
    dirty = provenance.git_revision(repo)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True
    assert sorted(dirty["changed"]) == ["algorithms/a.py", "my notes.txt"] and dirty["n_changed"] == 2
    (repo / "algorithms" / "a.py").write_text("x = 3\n")
    other = provenance.git_revision(repo)
    assert len(dirty["diff_sha256"]) == 64 and other["diff_sha256"] != dirty["diff_sha256"]
    assert len({clean["code_sha256"], dirty["code_sha256"], other["code_sha256"]}) == 3


@needs_git
def test_the_code_identity_ignores_docs_and_git_settings(repo):
    before = provenance.git_revision(repo)
    (repo / "README.md").write_text("more words\n")  # uncommitted, then committed: not code
    assert provenance.git_revision(repo)["code_sha256"] == before["code_sha256"]
    git(repo, "commit", "-q", "-am", "docs")
    after = provenance.git_revision(repo)
    assert after["commit"] != before["commit"] and after["code_sha256"] == before["code_sha256"]
    (repo / "algorithms" / "a.py").write_text("x = 2\n")
    plain = provenance.git_revision(repo)
    git(repo, "config", "diff.noprefix", "true")  # a user's setting must not change the hashes
    git(repo, "config", "diff.external", "false")
    configured = provenance.git_revision(repo)
    assert configured == plain


@needs_git
def test_a_vendored_copy_reports_only_its_own_changes(repo):
    """The project inside someone else's repository: the commit is theirs (it holds the
    code), the changes listed are those under the project's folder."""
    project = repo / "algorithms"
    (repo / "README.md").write_text("changed outside the project\n")
    assert provenance.git_revision(project)["dirty"] is False
    (project / "a.py").write_text("x = 5\n")
    assert provenance.git_revision(project)["changed"] == ["algorithms/a.py"]  # from the top


def test_git_revision_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_revision(tmp_path) is None


def test_a_note_only_when_the_code_differs():
    def session(commit, diff=None, code=None):
        return {"git": {"commit": commit, "dirty": diff is not None, "diff_sha256": diff,
                        "code_sha256": code}}
    a, b = "a" * 40, "b" * 40
    assert provenance.code_change_note([], session(a)) is None  # a new run
    assert provenance.code_change_note([session(a)], session(a)) is None
    assert provenance.code_change_note([{"git": None}], session(a)) is None  # unknown before
    assert provenance.code_change_note(["not a session"], session(a)) is None  # hand-edited file
    note = provenance.code_change_note([session(a), session(a)], session(b))
    assert note.startswith("note: ") and "a" * 10 in note and "b" * 10 in note
    note = provenance.code_change_note([session(a)], session(a, diff="c" * 64))
    assert f"runs {'a' * 10}+cccccccc, with other code" in note
    assert provenance.code_change_note([session(a, "c" * 64)], session(a, "c" * 64)) is None
    assert provenance.code_change_note([session(a, "c" * 64)], session(a, "d" * 64)) is not None
    # Other commits with the same code (a docs-only commit): no note.
    assert provenance.code_change_note([session(a, code="e" * 64)], session(b, code="e" * 64)) is None
    assert provenance.code_change_note([session(a, code="e" * 64)], session(a, code="f" * 64)) is not None


@pytest.mark.slow
def test_a_run_records_each_session(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gymnasium_robotics")
    assert main([*TINY, "--results_dir", str(tmp_path), "--num_env_steps", "100", "--seed", "3"]) == 0
    run = tmp_path / "mamujoco" / "HalfCheetah-2x3" / "happo" / "default" / "seed-3"
    assert main(["--resume", str(run), "--num_env_steps", "200"]) == 0
    first, second = json.loads((run / provenance.RUN_INFO).read_text())["sessions"]
    assert "--seed 3" in first["command"] and "--resume" in second["command"]
    assert first["packages"]["torch"] == torch.__version__
    assert first["device"] == "cpu" and first["torch_threads"] == 1
    assert first["git"] == provenance.git_revision()  # this checkout's, or None outside one
    assert "note:" not in capsys.readouterr().err  # same code both times
    if first["git"] is None:
        pytest.skip("not a git checkout: the code-change note needs a revision to compare")
    other = {**first["git"], "commit": "f" * 40, "code_sha256": "0" * 64}
    monkeypatch.setattr(provenance, "git_revision", lambda root=None: other)
    assert main(["--resume", str(run), "--num_env_steps", "300"]) == 0
    assert "this one runs ffffffffff" in capsys.readouterr().err
    assert len(json.loads((run / provenance.RUN_INFO).read_text())["sessions"]) == 3
