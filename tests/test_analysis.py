"""Tests for utils/analysis.py, train/plot.py and scripts/plot.sh on synthetic runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from train import plot
from utils import analysis

REPO = Path(__file__).resolve().parent.parent
SLOPE = 0.01  # known curve of every seed: value = SLOPE * env_steps + offset


def make_run(root: Path, env: str, task: str, algo: str, seed: int, steps, values,
             exp_name: str = "default", summary: dict | None = None, extra: dict | None = None,
             win_rate=None, config: dict | None = None) -> Path:
    """Write one synthetic run directory; ``values`` may contain None (blank cell);
    ``config`` adds to / overrides the config.yaml entries."""
    run_dir = root / env / task / algo / exp_name / f"seed-{seed}"
    run_dir.mkdir(parents=True)
    cols = {"env_steps": list(steps), "wall_seconds": [s / 100 for s in steps],
            "sps": [100.0] * len(steps), "train_episode_return": [1.0] * len(steps),
            "eval_return": list(values), "eval_return_std": [0.5] * len(steps),
            "agent0/clip_fraction": [0.1] * len(steps), "agent1/clip_fraction": [0.1] * len(steps)}
    if win_rate is not None:
        cols["eval_win_rate"] = list(win_rate)
        cols["train_win_rate"] = list(win_rate)
    cols.update(extra or {})
    header = ",".join(cols)
    lines = [",".join("" if v is None else str(v) for v in row) for row in zip(*cols.values())]
    (run_dir / "metrics.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    config = {"algo": algo, "env": env, "seed": seed, "exp_name": exp_name,
              "scenario": task.split("-")[0], "agent_conf": "2x3", "map_name": task,
              **(config or {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def linear_seed(root, seed, offset, start, stop, step, algo="happo", task="HalfCheetah-2x3",
                **kw) -> Path:
    steps = list(range(start, stop + 1, step))
    return make_run(root, "mamujoco", task, algo, seed, steps,
                    [SLOPE * s + offset for s in steps], **kw)


# ------------------------------------------------------------------ discovery and curves


def test_discover_derives_identity_from_path(tmp_path):
    make_run(tmp_path, "mamujoco", "HalfCheetah-2x3", "happo", 1, [0, 10], [1, 2])
    make_run(tmp_path, "smax", "3m", "hatrpo", 2, [0, 10], [1, 2], exp_name="lr1e-3")
    runs = analysis.discover_runs(tmp_path)
    idents = {(r.env, r.task, r.algo, r.exp_name, r.seed) for r in runs}
    assert idents == {("mamujoco", "HalfCheetah-2x3", "happo", "default", 1),
                      ("smax", "3m", "hatrpo", "lr1e-3", 2)}


def test_short_path_falls_back_to_config(tmp_path):
    run_dir = tmp_path / "x" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("env_steps,eval_win_rate\n10,0.5\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"algo": "mappo", "env": "smax", "map_name": "2s3z", "exp_name": "e", "seed": 7,
         "scenario": "HalfCheetah", "agent_conf": "2x3"}))
    (run,) = analysis.discover_runs(run_dir)  # root is the run directory itself
    assert (run.env, run.task, run.algo, run.exp_name, run.seed) == ("smax", "2s3z", "mappo", "e", 7)
    # root two levels up: the path gives only the last two components, config the rest
    (run,) = analysis.discover_runs(tmp_path)
    assert (run.env, run.task, run.algo, run.exp_name, run.seed) == ("smax", "2s3z", "mappo", "x", 7)


def test_a_family_the_analysis_does_not_know_takes_its_task_from_summary_or_path(tmp_path):
    """config.yaml holds every family's default task flags (scenario HalfCheetah, ...): for a
    new family they say nothing. summary.json's task (the family's own name) or the path does."""
    run_dir = make_run(tmp_path, "toy", "match2", "happo", 1, [0, 10], [1, 2],
                       config={"scenario": "HalfCheetah", "agent_conf": "2x3", "map_name": "3m"})
    (run,) = analysis.discover_runs(run_dir)  # only the absolute path and the files can tell
    assert run.task == "match2"
    (run_dir / "summary.json").write_text(json.dumps({"task": "match2"}))
    (run,) = analysis.discover_runs(run_dir)
    assert run.task == "match2"


def test_task_from_config_is_the_registrys_name(tmp_path):
    """Outside the <env>/<task>/... layout and before summary.json exists, the task comes from
    config.yaml, spelt as the trainers spell it (envs.registry): Humanoid's agent_conf 9|8
    is the folder name Humanoid-9_8, so the run and its finished seeds share one table row."""
    run_dir = tmp_path / "x" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("env_steps,eval_return\n10,0.5\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"algo": "happo", "env": "mamujoco", "scenario": "Humanoid", "agent_conf": "9|8",
         "map_name": "3m", "exp_name": "e", "seed": 1}))
    (run,) = analysis.discover_runs(run_dir)
    assert (run.env, run.task) == ("mamujoco", "Humanoid-9_8")


def test_win_rate_is_the_default_metric_of_any_family_that_logs_one(tmp_path):
    make_run(tmp_path, "toy", "match2", "happo", 1, [0, 100], [1.0, 2.0], win_rate=[0.0, 0.5])
    assert analysis.default_metric(analysis.discover_runs(tmp_path)) == "eval_win_rate"


def test_a_seed_found_twice_and_an_unfinished_seed_are_warned_about(tmp_path, capsys):
    """Both used to pass silently: a copy of seed 1 elsewhere under the results folder (e.g.
    chaos/) counted as a fourth seed, and a seed stopped at 100 steps was averaged with the
    others' finals at 200 while every curve ended at 100."""
    for seed in (1, 2):
        make_run(tmp_path, "mamujoco", "Hopper-3x1", "happo", seed, [0, 100, 200], [1.0, 2.0, 3.0])
    make_run(tmp_path / "chaos", "mamujoco", "Hopper-3x1", "happo", 1, [0, 100, 200], [1.0, 2.0, 3.0])
    make_run(tmp_path, "mamujoco", "Hopper-3x1", "happo", 3, [0, 100], [1.0, 2.0])
    lines = analysis.seed_warnings(analysis.discover_runs(tmp_path))
    assert len(lines) == 2, lines
    assert "seed 1 is 2 runs" in lines[0] and "chaos" in lines[0]
    assert "between 100 and 200 env steps" in lines[1] and "seed(s) 3 short" in lines[1]
    capsys.readouterr()
    assert plot.main([str(tmp_path), "--table-only"]) == 0
    err = capsys.readouterr().err
    assert sum(line.startswith("warning: ") for line in err.splitlines()) == 2, err
    shutil.rmtree(tmp_path / "chaos")
    shutil.rmtree(tmp_path / "mamujoco" / "Hopper-3x1" / "happo" / "default" / "seed-3")
    assert analysis.seed_warnings(analysis.discover_runs(tmp_path)) == []


def test_metric_curve_skips_blanks_sorts_and_dedupes(tmp_path):
    make_run(tmp_path, "mamujoco", "Hopper-3x1", "ippo", 1, [20, 0, 10, 30, 20],
             [4.0, 1.0, 2.0, None, 5.0])
    (run,) = analysis.discover_runs(tmp_path)
    steps, values = analysis.metric_curve(run, "eval_return")
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [1.0, 2.0, 5.0])  # repeated step 20 keeps last row


def test_common_grid_is_overlap_and_interpolation_exact(tmp_path):
    offsets = [-2.0, 0.0, 5.0]
    linear_seed(tmp_path, 1, offsets[0], 0, 1000, 100)
    linear_seed(tmp_path, 2, offsets[1], 50, 900, 50)   # different grid, later start
    linear_seed(tmp_path, 3, offsets[2], 0, 1200, 150)  # ends at 1050 (> 900)
    runs = analysis.discover_runs(tmp_path)
    curves = [analysis.metric_curve(r, "eval_return") for r in runs]
    grid = analysis.common_grid(curves, n_points=37)
    assert grid.shape == (37,)
    assert grid[0] == 50 and grid[-1] == 900  # overlap: max start, min end; no extrapolation
    values = analysis.interpolate_seeds(curves, grid)
    assert values.shape == (3, 37)
    for row, off in zip(values, offsets):
        np.testing.assert_allclose(row, SLOPE * grid + off)  # piecewise-linear of a line
    (curve,), _ = analysis.aggregate_curves(runs, "eval_return", n_points=37)
    np.testing.assert_allclose(curve.mean, SLOPE * grid + np.mean(offsets))


def test_common_grid_edge_cases():
    a = (np.array([0.0, 10.0]), np.array([0.0, 1.0]))
    b = (np.array([20.0, 30.0]), np.array([0.0, 1.0]))
    c = (np.array([10.0, 40.0]), np.array([0.0, 1.0]))
    assert analysis.common_grid([a, b]).size == 0          # no overlap
    np.testing.assert_array_equal(analysis.common_grid([a, c]), [10.0])  # touching
    assert analysis.common_grid([a, (np.empty(0), np.empty(0))]).size == 0


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_band_contains_mean_and_scales_with_spread():
    truth = np.linspace(0.0, 10.0, 20)
    offsets = np.array([-3.0, -1.0, 1.0, 3.0])
    values = truth + offsets[:, None]  # (4 seeds, 20 points), mean over seeds == truth
    low, high = analysis.bootstrap_ci(values)
    assert np.all(low < truth) and np.all(truth < high)
    width = high - low
    assert np.all(width > 0) and np.all(width < offsets.max() - offsets.min())
    low2, high2 = analysis.bootstrap_ci(truth + 2 * offsets[:, None])
    np.testing.assert_allclose(high2 - low2, 2 * width)  # same resamples, double spread
    # more seeds with the same spread -> narrower band
    many = truth + np.tile(offsets, 8)[:, None]
    low_m, high_m = analysis.bootstrap_ci(many)
    assert np.all(high_m - low_m < 0.75 * width)
    # reproducible (fixed RNG seed)
    np.testing.assert_array_equal(analysis.bootstrap_ci(values)[0], low)


def test_bootstrap_is_the_percentile_bootstrap_of_the_mean_over_seeds():
    """rliable's percentile interval for one task, written out the plain way: resample the
    seeds (one draw for every point), take each resample's mean, read off the quantiles."""
    values = np.random.default_rng(3).normal(size=(5, 7)) * np.arange(1, 8)
    picks = np.random.default_rng(11).integers(0, 5, size=(500, 5))
    means = values[picks].mean(axis=1)  # (500 resamples, 7 points)
    low, high = analysis.bootstrap_ci(values, n_resamples=500, confidence=0.9, seed=11)
    np.testing.assert_allclose(low, np.percentile(means, 5.0, axis=0))
    np.testing.assert_allclose(high, np.percentile(means, 95.0, axis=0))


def test_bootstrap_degenerate_cases():
    same = np.tile(np.arange(5.0), (3, 1))
    low, high = analysis.bootstrap_ci(same)
    np.testing.assert_allclose(low, np.arange(5.0))
    np.testing.assert_allclose(high, np.arange(5.0))
    assert analysis.bootstrap_ci(np.arange(5.0)[None, :]) is None  # one seed: no band


def test_single_seed_curve_has_no_band(tmp_path):
    linear_seed(tmp_path, 1, 0.0, 0, 500, 100)
    (curve,), _ = analysis.aggregate_curves(analysis.discover_runs(tmp_path), "eval_return")
    assert curve.low is None and curve.high is None and curve.n_seeds == 1


# ------------------------------------------------------------------ table


def test_final_table_matches_numpy(tmp_path):
    finals = [10.0, 40.0, 20.0, 30.0, 100.0]
    for seed, final in enumerate(finals, start=1):
        # seeds 1-3 finished (summary.json wins over the csv); seeds 4-5 still running
        summary = ({"env_steps": 1000 + seed, "eval_return_mean": final, "eval_return_std": 1.0,
                    "wall_seconds": 1.0, "sps": 1.0} if seed <= 3 else None)
        csv_last = -999.0 if seed <= 3 else final
        make_run(tmp_path, "mamujoco", "Ant-2x4", "happo", seed, [0, 500, 900, 1000],
                 [0.0, 1.0, csv_last, None], summary=summary)
    make_run(tmp_path, "mamujoco", "Ant-2x4", "mappo", 1, [0, 800], [0.0, 7.0])
    rows = analysis.final_table(analysis.discover_runs(tmp_path), "eval_return")
    happo, mappo = rows
    assert (happo.task, happo.algo, mappo.algo) == ("Ant-2x4", "happo", "mappo")
    np.testing.assert_allclose(np.sort(happo.finals), np.sort(finals))
    assert happo.mean == pytest.approx(np.mean(finals))
    assert happo.std == pytest.approx(np.std(finals, ddof=1))  # sample std: seeds are a sample
    sorted_f = np.sort(finals)
    assert happo.iqm == pytest.approx(np.mean(sorted_f[1:4]))  # drop 1 from each end of 5
    assert happo.env_steps == np.median([1001, 1002, 1003, 1000, 1000])
    assert mappo.iqm is None and mappo.std is None and mappo.env_steps == 800
    table = analysis.markdown_table(rows, "eval_return")
    lines = table.strip().splitlines()
    assert lines[0].startswith("| task | algo | eval_return (mean ± std) | seeds | env steps | IQM")
    assert lines[2] == (f"| Ant-2x4 | happo | {np.mean(finals):.4g} ± {np.std(finals, ddof=1):.4g} | 5 | "
                        f"1001 | {np.mean(sorted_f[1:4]):.4g} |")
    assert lines[3] == "| Ant-2x4 | mappo | 7 | 1 | 800 | – |"  # one seed: no spread to show


def test_iqm_matches_trimmed_mean():
    x = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 100.0, -50.0, 4.0])  # n=8: drop 2 each end
    assert analysis.iqm(x) == pytest.approx(np.mean(np.sort(x)[2:6]))
    assert analysis.iqm(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2.5)


@pytest.mark.parametrize("n", range(1, 13))
def test_iqm_is_rliables_trimmed_mean(n):
    """rliable's ``aggregate_iqm`` is ``scipy.stats.trim_mean(scores, 0.25)``; scipy comes with
    jax here, so the comparison runs wherever the project's requirements are installed."""
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(n).normal(size=n) * 10
    assert analysis.iqm(x) == pytest.approx(stats.trim_mean(x, 0.25), rel=1e-12)


def test_win_rate_default_metric_and_summary_key(tmp_path):
    make_run(tmp_path, "smax", "3m", "hatrpo", 1, [0, 100], [1.0, 2.0], win_rate=[0.0, 0.25],
             summary={"env_steps": 100, "eval_return_mean": 2.0, "eval_win_rate": 0.75})
    make_run(tmp_path, "smac", "8m", "hatrpo", 1, [0, 100], [1.0, 2.0], win_rate=[0.0, 0.5])
    runs = analysis.discover_runs(tmp_path)
    assert analysis.default_metric(runs) == "eval_win_rate"
    rows = analysis.final_table(runs, "eval_win_rate")
    assert [(r.task, r.mean) for r in rows] == [("3m", 0.75), ("8m", 0.5)]
    make_run(tmp_path, "mamujoco", "Hopper-3x1", "happo", 1, [0, 100], [1.0, 2.0])
    assert analysis.default_metric(analysis.discover_runs(tmp_path)) == "eval_return"


def test_summary_of_a_run_resumed_to_train_further_is_not_its_final_value(tmp_path):
    """A run resumed with a larger --num_env_steps keeps its old summary.json until it
    finishes again: while it trains (or after it stopped early) metrics.csv is newer."""
    summary = {"env_steps": 200, "eval_return_mean": 2.0}
    make_run(tmp_path, "mamujoco", "HalfCheetah-2x3", "happo", 1, [100, 200, 300, 400],
             [1.0, 2.0, 3.0, 4.0], summary=summary)
    make_run(tmp_path, "mamujoco", "HalfCheetah-2x3", "happo", 2, [100, 200], [1.0, 2.5],
             summary={**summary, "eval_return_mean": 2.5})
    extended, finished = analysis.discover_runs(tmp_path)
    assert extended.summary is None and finished.summary is not None
    assert analysis.final_value(extended, "eval_return") == 4.0
    assert analysis.final_env_steps(extended) == 400.0
    assert analysis.final_value(finished, "eval_return") == 2.5


def test_different_exp_names_are_not_averaged(tmp_path):
    linear_seed(tmp_path, 1, 0.0, 0, 100, 50, exp_name="a")
    linear_seed(tmp_path, 1, 5.0, 0, 100, 50, exp_name="b")
    groups = analysis.group_runs(analysis.discover_runs(tmp_path))
    assert set(groups) == {("HalfCheetah-2x3", "happo [a]"), ("HalfCheetah-2x3", "happo [b]")}


# ------------------------------------------------------------------ CLI and figure


def _png_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and \
        path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_png_and_table(tmp_path, capsys):
    for algo in ("happo", "mappo"):
        for task in ("HalfCheetah-2x3", "Walker2d-2x3"):
            for seed in (1, 2, 3):
                linear_seed(tmp_path, seed, seed, 0, 4000, 1000, algo=algo, task=task)
    assert plot.main([str(tmp_path), "--points", "20"]) == 0
    out = capsys.readouterr().out
    assert _png_ok(tmp_path / "curves.png")
    md = (tmp_path / "curves.md").read_text()
    assert md == out and md.count("\n") == 2 + 4
    assert "| Walker2d-2x3 | mappo | 42 ± 1 | 3 | 4000 | – |" in md

    other = tmp_path / "figs" / "train.png"
    assert plot.main([str(tmp_path), "--metric", "train_episode_return", "--out", str(other),
                      "--title", "custom"]) == 0
    assert _png_ok(other) and (tmp_path / "figs" / "train.md").is_file()


def test_cli_table_only_writes_no_png(tmp_path, capsys):
    linear_seed(tmp_path, 1, 0.0, 0, 100, 50)
    assert plot.main([str(tmp_path), "--table-only"]) == 0
    assert "| HalfCheetah-2x3 | happo |" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()


def test_default_title_uses_step_budget(tmp_path):
    linear_seed(tmp_path, 1, 0.0, 0, 400_000, 100_000)
    runs = analysis.discover_runs(tmp_path)
    assert analysis.default_title(runs, "eval_return") == "eval_return (up to 400k env steps)"
    assert analysis.format_steps(10_000_000) == "10M"
    assert analysis.format_steps(1_500_000) == "1.5M"


def test_cli_unknown_metric_lists_available(tmp_path, capsys):
    linear_seed(tmp_path, 1, 0.0, 0, 100, 50)
    assert plot.main([str(tmp_path), "--metric", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown metric 'nope'" in err and "eval_return" in err
    assert "agent<i>/clip_fraction" in err and "agent0/" not in err
    assert not (tmp_path / "curves.png").exists()


def test_cli_missing_dir_is_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_cli_out_with_non_figure_extension_is_rejected_before_writing(tmp_path, capsys):
    linear_seed(tmp_path / "runs", 1, 0.0, 0, 100, 50)
    out = tmp_path / "t.md"
    assert plot.main([str(tmp_path / "runs"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"plot: error: --out {out}")
    assert "'.md'" in lines[0] and all(f in lines[0] for f in ("png", "pdf", "svg"))
    assert "--table-only" in lines[0] and captured.out == ""
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    # the table alone may go to a .md path
    assert plot.main([str(tmp_path / "runs"), "--out", str(out), "--table-only"]) == 0
    assert out.read_text().startswith("| task | algo | eval_return")
    # any format matplotlib writes is accepted, whatever the case of its extension
    assert plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "f.SVG"), "--points", "5"]) == 0
    assert (tmp_path / "f.SVG").read_text().lstrip().startswith("<?xml")


def test_cli_out_without_extension_names_the_file_written(tmp_path, capsys):
    linear_seed(tmp_path / "runs", 1, 0.0, 0, 100, 50)
    out = tmp_path / "figs" / "noext"
    assert plot.main([str(tmp_path / "runs"), "--out", str(out), "--points", "5"]) == 0
    err = capsys.readouterr().err
    assert _png_ok(out.with_suffix(".png")) and not out.exists()
    assert f"figure written to {out}.png " in err and ".png added" in err
    assert (tmp_path / "figs" / "noext.md").is_file()
    # an existing directory (or a path ending in '/') gets curves.png inside it
    assert plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "figs"), "--points", "5"]) == 0
    assert _png_ok(tmp_path / "figs" / "curves.png") and (tmp_path / "figs" / "curves.md").is_file()
    assert f"figure written to {tmp_path / 'figs' / 'curves.png'}" in capsys.readouterr().err


@pytest.mark.slow
def test_suptitle_clears_panel_titles_with_several_rows(tmp_path, monkeypatch):
    import matplotlib.figure

    gaps = []  # pixels between the suptitle's bottom and the top of the highest panel title
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        original(fig, *args, **kwargs)  # draws the figure, so the layout is final
        renderer = fig.canvas.get_renderer()
        title_bottom = fig._suptitle.get_window_extent(renderer).y0
        gaps.append(title_bottom - max(ax.get_tightbbox(renderer).y1
                                       for ax in fig.axes if ax.get_visible()))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    grid = np.linspace(0.0, 4e5, 5)
    for n_tasks in (4, 7, 12):  # 2, 3 and 4 rows of panels
        curves = [analysis.Curve(f"Task{i}-2x3", algo, grid, grid, grid - 1, grid + 1, 3)
                  for i in range(n_tasks) for algo in ("happo", "mappo")]
        analysis.plot_curves(curves, "eval_return", tmp_path / f"{n_tasks}.png",
                             "eval_return (up to 400k env steps)")
        assert _png_ok(tmp_path / f"{n_tasks}.png")
    assert len(gaps) == 3 and min(gaps) >= 2, f"suptitle touches the panel titles: {gaps}"


@pytest.mark.slow
def test_long_title_stays_inside_a_one_panel_figure(tmp_path, monkeypatch):
    import matplotlib.figure

    extents = []  # (title's left edge, right edge, figure width) in pixels
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        original(fig, *args, **kwargs)
        box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
        extents.append((box.x0, box.x1, fig.bbox.width))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    grid = np.linspace(0.0, 1e7, 5)
    title = "Multi-Agent MuJoCo, 10M env steps: eval_return (mean over seeds, 95% bootstrap band)"
    for n_tasks in (1, 2):
        curves = [analysis.Curve(f"Task{i}-2x3", "happo", grid, grid, None, None, 1)
                  for i in range(n_tasks)]
        analysis.plot_curves(curves, "eval_return", tmp_path / f"{n_tasks}.png", title)
    assert len(extents) == 2
    for left, right, width in extents:
        assert left >= 0 and right <= width, f"title runs off the figure: {extents}"


def test_cli_runs_without_eval_say_so(tmp_path, capsys):
    for seed in (1, 2):  # what --no-use_eval writes: blank eval columns, null eval in summary
        make_run(tmp_path, "mamujoco", "HalfCheetah-2x3", "happo", seed, [0, 100], [None, None],
                 config={"use_eval": False},
                 summary={"env_steps": 100, "eval_return_mean": None, "train_episode_return": 1.0})
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'eval_return'" in err and "yet" not in err
    assert "without evaluation" in err and "--metric train_episode_return" in err
    assert not (tmp_path / "curves.md").exists()
    # the suggested metric works
    assert plot.main([str(tmp_path), "--metric", "train_episode_return", "--points", "5"]) == 0
    capsys.readouterr()
    # some runs without evaluation, the others not evaluated yet
    make_run(tmp_path, "mamujoco", "HalfCheetah-2x3", "happo", 3, [0, 100], [None, None])
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 of 3 runs were trained without evaluation" in err


def test_eval_metric_missing_from_csv_header_suggests_train_metric(tmp_path, capsys):
    run_dir = tmp_path / "smax" / "3m" / "mappo" / "default" / "seed-1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "env_steps,train_episode_return,train_win_rate\n0,1.0,0.0\n100,2.0,0.5\n")
    assert plot.main([str(tmp_path)]) == 2  # default metric for SMAX: eval_win_rate
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown metric 'eval_win_rate'" in err
    assert "without evaluation" in err and "--metric train_win_rate" in err
    assert "available: train_episode_return, train_win_rate" in err


def test_plot_sh_empty_dir_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "plot.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no runs" in lines[0] and "Traceback" not in proc.stderr


def test_plot_sh_without_venv_gives_hint(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "plot.sh", tmp_path / "scripts" / "plot.sh")
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "plot.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "scripts/test.sh" in lines[0]


def test_table_warns_when_a_groups_runs_ran_different_code(tmp_path, capsys):
    def sessions(run_dir, *revisions):
        (run_dir / "run_info.json").write_text(json.dumps({"sessions": [
            {"git": None if rev is None else {"commit": rev[0] * 40, "diff_sha256": rev[1]}}
            for rev in revisions]}))
    same = [linear_seed(tmp_path, s, 0.0, 0, 100, 10, algo="hatrpo") for s in (1, 2)]
    for run_dir in same:
        sessions(run_dir, ("a", None))
    mixed = [linear_seed(tmp_path, s, 0.0, 0, 100, 10) for s in (1, 2, 3)]
    sessions(mixed[0], ("a", None))
    sessions(mixed[1], ("a", None), ("a", "c" * 64))  # resumed on uncommitted changes
    sessions(mixed[2], None)  # git unknown
    assert plot.main([str(tmp_path), "--table-only"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    # The unknown revision is not counted; the hatrpo runs agree.
    assert warnings == ["warning: HalfCheetah-2x3 happo: its 3 run(s) ran 2 versions of the code "
                        "(aaaaaaaaaa, aaaaaaaaaa+cccccccc); see each run's run_info.json"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))



def test_published_marks_sit_at_the_panels_right_end_in_their_curves_colour(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        figures.append(fig)
        original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    grid = np.linspace(0.0, 1e7, 5)
    curves = [analysis.Curve("HalfCheetah-2x3", algo, grid, grid / 1e3, None, None, 1) for algo in ("happo", "mappo")]
    marks = [analysis.Mark("HalfCheetah-2x3", "happo", "reference", 7000.0),
             analysis.Mark("HalfCheetah-2x3", "happo", "paper", 4350.0),
             analysis.Mark("HalfCheetah-2x3", "hatrpo", "paper", 5100.0),  # no hatrpo curve: not drawn
             analysis.Mark("Walker2d-2x3", "happo", "paper", 2950.0)]  # no such panel
    analysis.plot_curves(curves, "eval_return", tmp_path / "f.png", "t", marks)
    (ax,) = [ax for ax in figures[0].axes if ax.get_visible()]
    colours = analysis.algo_colours(["happo", "mappo"])
    drawn = {(float(line.get_ydata()[0]), line.get_marker()): line for line in ax.lines
             if len(line.get_xdata()) == 1}
    assert set(drawn) == {(7000.0, "D"), (4350.0, "X")}  # one shape per source, in order of the marks
    for line in drawn.values():
        assert float(line.get_xdata()[0]) == 1e7 and line.get_color() == colours["happo"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["happo (n=1)", "mappo (n=1)", "published: reference", "published: paper"]
