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
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / "a.py").write_text("x = 1\n")
    git(path, "add", "a.py")
    git(path, "commit", "-q", "-m", "one")
    return path


@needs_git
def test_git_revision_names_the_commit_and_what_changed(repo):
    clean = provenance.git_revision(repo)
    assert clean == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "n_changed": 0,
                     "changed": [], "diff_sha256": None}
    (repo / "results.csv").write_text("untracked files (results, venvs) do not count\n")
    assert provenance.git_revision(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    dirty = provenance.git_revision(repo)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True
    assert dirty["changed"] == ["a.py"] and dirty["n_changed"] == 1
    (repo / "a.py").write_text("x = 3\n")
    other = provenance.git_revision(repo)
    assert len(dirty["diff_sha256"]) == 64 and other["diff_sha256"] != dirty["diff_sha256"]


def test_git_revision_outside_a_checkout_is_none(tmp_path):
    assert provenance.git_revision(tmp_path) is None


def test_a_note_only_when_the_code_differs():
    def session(commit, diff=None):
        return {"git": {"commit": commit, "dirty": diff is not None, "diff_sha256": diff}}
    a, b = "a" * 40, "b" * 40
    assert provenance.code_change_note([], session(a)) is None  # a new run
    assert provenance.code_change_note([session(a)], session(a)) is None
    assert provenance.code_change_note([{"git": None}], session(a)) is None  # unknown before
    note = provenance.code_change_note([session(a), session(a)], session(b))
    assert note.startswith("note: ") and "a" * 10 in note and "b" * 10 in note
    note = provenance.code_change_note([session(a)], session(a, diff="c" * 64))
    assert f"runs {'a' * 10}+cccccccc (+: uncommitted changes" in note
    assert provenance.code_change_note([session(a, "c" * 64)], session(a, "c" * 64)) is None
    assert provenance.code_change_note([session(a, "c" * 64)], session(a, "d" * 64)) is not None


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
    other = {**first["git"], "commit": "f" * 40}
    monkeypatch.setattr(provenance, "git_revision", lambda root=None: other)
    assert main(["--resume", str(run), "--num_env_steps", "300"]) == 0
    assert "this one runs ffffffffff" in capsys.readouterr().err
    assert len(json.loads((run / provenance.RUN_INFO).read_text())["sessions"]) == 3
