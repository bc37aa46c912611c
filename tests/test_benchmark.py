"""Reproduction suites (train/benchmark.py): the suite file, the archive and the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from train import benchmark
from utils import analysis
from utils.errors import ConfigError

SUITE = benchmark.REPO_ROOT / "configs" / "benchmarks" / "mamujoco-10m.yaml"


def write_suite(path: Path, root: Path, **changes) -> Path:
    data = {"name": "tiny", "title": "Tiny suite", "env": "mamujoco", "num_env_steps": 1000,
            "results_dir": str(root / "results"), "archive_dir": str(root / "archive"),
            "figure": str(root / "docs" / "tiny.png"), "metric": "eval_return",
            "experiments": [{"exp_name": "global", "tasks": [{"scenario": "HalfCheetah", "agent_conf": "2x3"}],
                             "algos": ["happo", "mappo"], "seeds": [1, 2, 3]}],
            "published": [{"source": "paper", "exp_name": "global",
                           "values": {"HalfCheetah-2x3": {"happo": 7000}}}]}
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def fake_run(run_dir: Path, algo: str, seed: int, env_steps: int, final: float, commit: str = "a" * 40) -> None:
    run_dir.mkdir(parents=True)
    rows = ["env_steps,eval_return"] + [f"{env_steps * k // 4},{final * k / 4}" for k in range(1, 5)]
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"env": "mamujoco", "scenario": "HalfCheetah",
                                                         "agent_conf": "2x3", "algo": algo, "seed": seed,
                                                         "exp_name": "global"}))
    (run_dir / "summary.json").write_text(json.dumps({"env_steps": env_steps, "eval_return_mean": final,
                                                      "task": "HalfCheetah-2x3"}))
    (run_dir / "run_info.json").write_text(json.dumps(
        {"sessions": [{"started": "2026-12-07T10:00:00+00:00", "git": {"commit": commit, "dirty": False}}]}))


def test_the_shipped_suite_plans_the_issue_runs():
    suite = benchmark.load_suite(SUITE)
    runs = list(suite.runs())
    assert len(runs) == 3 * 3 * 3 + 2 * 2 + 3
    labels = {(suite.task_label(task), algo, experiment.exp_name) for experiment, task, algo, _ in runs}
    assert ("Humanoid-17x1", "happo", "global") in labels and ("HalfCheetah-2x3", "happo", "local") in labels
    for experiment in suite.experiments:  # every task has its task file
        for task in experiment.tasks:
            assert (benchmark.REPO_ROOT / "configs" / "mamujoco" / f"{suite.task_label(task)}.yaml").exists()


def test_sweep_argv_of_an_experiment():
    suite = benchmark.load_suite(SUITE)
    local = suite.experiments[-1]
    argv = benchmark.sweep_argv(suite, local, local.tasks[0])
    assert argv == ["--env", "mamujoco", "--scenario", "HalfCheetah", "--agent_conf", "2x3", "--algo", "happo",
                    "--seeds", "1,2,3", "--exp_name", "local", "--num_env_steps", "10000000",
                    "--obs_mode", "local", "--agent_obsk", "0"]


@pytest.mark.parametrize("changes, message", [
    ({"experimentz": []}, "unknown key 'experimentz'"),
    ({"experiments": [{"exp_name": "x", "tasks": [{"scenario": "HalfCheetah", "agent_conf": "3x3"}],
                       "algos": ["happo"], "seeds": [1]}]}, "3x3"),
    ({"experiments": [{"exp_name": "x", "tasks": [], "algos": ["happo"], "seeds": [1]}]}, "tasks must be"),
    ({"num_env_steps": "many"}, "num_env_steps must be a int"),
])
def test_bad_suite_files_are_one_line_errors(tmp_path, capsys, changes, message):
    path = write_suite(tmp_path / "suite.yaml", tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        benchmark.load_suite(path)
    assert benchmark.main([str(path), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_archive_and_report_from_finished_runs_only(tmp_path):
    suite = benchmark.load_suite(write_suite(tmp_path / "suite.yaml", tmp_path))
    experiment = suite.experiments[0]
    task = experiment.tasks[0]
    for seed, final in ((1, 6000.0), (2, 7000.0), (3, 8000.0)):
        fake_run(suite.run_dir(suite.results_dir, experiment, task, "happo", seed), "happo", seed, 1000, final)
    # an unfinished run (its summary says 500 of 1000 steps) is neither archived nor counted
    fake_run(suite.run_dir(suite.results_dir, experiment, task, "mappo", 1), "mappo", 1, 500, 1.0)
    copied = benchmark.archive(suite)
    assert len(copied) == 3
    assert sorted(p.name for p in copied[0].iterdir()) == sorted(benchmark.ARCHIVED_FILES)
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nWritten by hand.\n\n<!-- suite:tiny -->\nold\n<!-- /suite:tiny -->\n\nAfter.\n")
    benchmark.report(suite, doc)
    benchmark.report(suite, doc)  # twice: still one section
    text = doc.read_text()
    assert text.count("<!-- suite:tiny -->") == 1 and "old" not in text
    assert text.startswith("# Results\n\nWritten by hand.") and text.rstrip().endswith("After.")
    happo = next(line for line in text.splitlines() if line.startswith("| HalfCheetah-2x3 | global | happo"))
    assert "| 3/3 | 7,000 ± 1,000 | 7,000 | 7,000 |" in happo  # mean ± sample std, IQM, published
    mappo = next(line for line in text.splitlines() if line.startswith("| HalfCheetah-2x3 | global | mappo"))
    assert "| 0/3 | not yet run |" in mappo
    assert "Runs at commit aaaaaaa: HalfCheetah-2x3 happo [global] seeds 1 (2026-12-07), 2 (2026-12-07), 3 " in text
    assert suite.figure.exists() and "](../tiny.png)" not in text and "(tiny.png)" in text
    # the figure marks the published value beside the curve it compares with (mappo has no runs)
    rows = benchmark.collect_rows(suite)
    marks = benchmark.published_marks(rows, [run for row in rows for run in row.runs])
    assert marks == [analysis.Mark("HalfCheetah-2x3", "happo", "paper", 7000)]
    # each row's command trains the suite's budget, not the task file's
    assert "--algo happo --seeds 1,2,3 --exp_name global --num_env_steps 1000`" in text
    # the report regenerates from the archive alone
    import shutil

    shutil.rmtree(suite.results_dir)
    benchmark.report(suite, doc)
    assert "| 3/3 | 7,000 ± 1,000 |" in doc.read_text()


def test_a_row_of_one_seed_shows_no_spread(tmp_path):
    suite = benchmark.load_suite(write_suite(tmp_path / "suite.yaml", tmp_path))
    experiment, task = suite.experiments[0], suite.experiments[0].tasks[0]
    fake_run(suite.run_dir(suite.results_dir, experiment, task, "happo", 2), "happo", 2, 1000, 5909.0)
    benchmark.archive(suite)
    doc = tmp_path / "results.md"
    benchmark.report(suite, doc)
    happo = next(line for line in doc.read_text().splitlines() if line.startswith("| HalfCheetah-2x3 | global | happo"))
    assert "| 1/3 | 5,909 | 5,909 | 7,000 |" in happo


def test_status_lists_every_planned_run_and_the_time_left(tmp_path, capsys):
    import os

    from utils.dirlock import try_lock

    suite = benchmark.load_suite(write_suite(tmp_path / "suite.yaml", tmp_path))
    experiment, task = suite.experiments[0], suite.experiments[0].tasks[0]

    def partial_run(seed: int, rows: list[tuple[int, float, float | str]]) -> Path:
        run_dir = suite.run_dir(suite.results_dir, experiment, task, "happo", seed)
        run_dir.mkdir(parents=True)
        lines = ["env_steps,wall_seconds,eval_return"] + [",".join(map(str, row)) for row in rows]
        (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
        return run_dir

    # seed 1 finished and archived (its checkpoint directory gone); seed 2 stopped at 500 of
    # 1,000 steps after 50 s (10 steps/s); seed 3 trains now (another descriptor holds its lock)
    fake_run(suite.run_dir(suite.archive_dir, experiment, task, "happo", 1), "happo", 1, 1000, 6500.0)
    partial_run(2, [(250, 25.0, 10.0), (500, 50.0, "")])
    training = partial_run(3, [(200, 40.0, 20.0)])
    fd = try_lock(training)
    try:
        assert benchmark.main([str(tmp_path / "suite.yaml"), "--status"]) == 0
    finally:
        if fd is not None:
            os.close(fd)
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0].strip(): line.split() for line in out[1:7]}
    assert len(rows) == 6  # every planned run, finished or not
    assert rows["HalfCheetah-2x3 happo [global] seed 1"][5:8] == ["finished", "1k", "6,500"]
    assert rows["HalfCheetah-2x3 happo [global] seed 2"][5:9] == ["stopped", "500", "10", "10"]
    assert rows["HalfCheetah-2x3 happo [global] seed 2"][-2:] == ["50", "s"]  # 500 steps at 10/s
    assert rows["HalfCheetah-2x3 happo [global] seed 3"][5:9] == ["training", "200", "20", "5"]
    assert rows["HalfCheetah-2x3 happo [global] seed 3"][-2:] == ["3", "min"]  # 800 steps at 5/s
    # mappo has no run yet: it goes at the task's median pace (5 and 10 steps/s: 7.5)
    assert rows["HalfCheetah-2x3 mappo [global] seed 1"][5:7] == ["not", "started"]
    assert rows["HalfCheetah-2x3 mappo [global] seed 1"][-2:] == ["2", "min"]  # 1,000 at 7.5/s
    summary = "\n".join(out[-2:])
    assert "6 runs planned: 1 finished, 1 training, 1 stopped, 3 not started." in summary
    assert "Left: 4.3k env steps, 10 min of run time" in summary  # 50 + 160 + 3 x 133.3 s
    assert not suite.figure.exists()  # --status changes nothing


@pytest.mark.slow
def test_a_tiny_suite_trains_archives_and_reports(tmp_path):
    path = write_suite(tmp_path / "suite.yaml", tmp_path, num_env_steps=400,
                       experiments=[{"exp_name": "global", "tasks": [{"scenario": "HalfCheetah", "agent_conf": "2x3"}],
                                     "algos": ["happo"], "seeds": [1],
                                     "flags": {"n_rollout_threads": 2, "episode_length": 100, "eval_episodes": 1,
                                               "n_eval_rollout_threads": 1, "hidden_sizes": [8], "ppo_epoch": 1,
                                               "critic_epoch": 1}}])
    doc = benchmark.REPO_ROOT / "docs" / "results.md"
    before = doc.read_text()
    try:
        assert benchmark.main([str(path), "--max_parallel", "1"]) == 0
        assert "| HalfCheetah-2x3 | global | happo | 1/1 |" in doc.read_text()
        assert (tmp_path / "archive" / "mamujoco" / "HalfCheetah-2x3" / "happo" / "global" / "seed-1"
                / "summary.json").exists()
        assert benchmark.main([str(path), "--max_parallel", "1"]) == 0  # again: nothing left to train
    finally:
        doc.write_text(before)
