"""Sweeps (train/sweep.py): comma lists -> one process per run, local pool or Ray.

Runs are tiny (HalfCheetah 2x3, 2 envs x 50 steps, one iteration); each subprocess takes
a few seconds. The local 2x2 sweep takes about 20 s on 2 cores, the Ray one about 35 s
(most of it starting Ray).
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("mujoco")

from train.config import load_config  # noqa: E402
from train.sweep import main as sweep_main, plan  # noqa: E402
from train.train import main as train_main  # noqa: E402

TINY = ["--n_rollout_threads", "2", "--episode_length", "50", "--num_env_steps", "100", "--hidden_sizes", "16",
        "--ppo_epoch", "1", "--critic_epoch", "1", "--eval_episodes", "1", "--n_eval_rollout_threads", "1",
        "--device", "cpu", "--no-tensorboard"]
ALGOS, SEEDS = ("happo", "hatrpo"), (1, 2)


def run_dir(results: Path, algo: str, seed: int) -> Path:
    return results / "mamujoco" / "HalfCheetah-2x3" / algo / "default" / f"seed-{seed}"


def check_2x2(results: Path, rc: int, out: str) -> None:
    assert rc == 0, out
    for algo in ALGOS:
        for seed in SEEDS:
            directory = run_dir(results, algo, seed)
            summary = json.loads((directory / "summary.json").read_text())
            assert summary["algo"] == algo and summary["seed"] == seed
            assert summary["eval_return_mean"] is not None
            assert f"ok      {directory}  eval_return_mean" in out
            log = results / "sweep-logs" / f"mamujoco_HalfCheetah-2x3_{algo}_default_seed{seed}.log"
            text = log.read_text()
            assert "--torch_threads 1" in text.splitlines()[0] and "--no-progress" in text.splitlines()[0]
            assert f"run dir {directory}" in text
    assert "4/4 run(s) succeeded" in out


def test_plan_expands_the_product_and_passes_other_flags(tmp_path, capsys):
    sweep = plan([*TINY, "--results_dir", str(tmp_path), "--algo", "happo,hatrpo", "--seeds", "1,2,3",
                  "--agent_conf=2x3,6x1", "--max_parallel", "3"])
    assert sweep.max_parallel == 3 and sweep.ray_address is None
    assert len(sweep.runs) == 12
    assert len({run.run_dir for run in sweep.runs}) == 12
    for run in sweep.runs:
        argv = run.argv
        assert "--seeds" not in argv and "--max_parallel" not in argv
        assert all("," not in argv[k + 1] for k, t in enumerate(argv) if t in ("--algo", "--seed", "--agent_conf"))
        assert argv[argv.index("--hidden_sizes") + 1] == "16" and argv[-1] == "--no-progress"
        assert argv[argv.index("--torch_threads") + 1] == "1"
        # --ppo_epoch goes to the runs that read it, without a warning.
        assert ("--ppo_epoch" in argv) == (argv[argv.index("--algo") + 1] == "happo")
    # Every task flag of every family sweeps; one the run directory does not name goes into
    # the experiment name.
    maps = plan([*TINY, "--results_dir", str(tmp_path), "--env", "smax", "--map-name", "3m,2s3z"])
    assert [run.run_dir.parts[-4] for run in maps.runs] == ["3m", "2s3z"]
    obsk = plan([*TINY, "--results_dir", str(tmp_path), "--exp_name", "abl", "--obs_mode", "local",
                 "--agent_obsk", "0,1"])
    assert [run.run_dir.parts[-2] for run in obsk.runs] == ["abl-agent_obsk0", "abl-agent_obsk1"]
    assert [run.argv[run.argv.index("--agent_obsk") + 1] for run in obsk.runs] == ["0", "1"]
    capsys.readouterr()
    hatrpo = plan([*TINY, "--results_dir", str(tmp_path), "--algo", "hatrpo", "--seeds", "1,2"])
    assert not any("--ppo_epoch" in run.argv for run in hatrpo.runs)
    assert capsys.readouterr().err.count("warning: --ppo_epoch has no effect in any run of this sweep") == 1
    given = plan([*TINY, "--results_dir", str(tmp_path), "--seed", "1,2", "--torch_threads", "2"])
    assert [r.argv.count("--torch_threads") for r in given.runs] == [1, 1]
    assert all(r.argv[r.argv.index("--torch_threads") + 1] == "2" for r in given.runs)


def test_each_run_gets_the_config_its_sweep_planned(tmp_path, monkeypatch):
    """The sweep parses its command line once and resolves one Config per run; the flags a
    run is started with resolve to that same Config in the run's own process."""
    import train.config

    user = tmp_path / "user.yaml"
    user.write_text("common:\n  lr: 0.001\n  kl_threshold: 0.02\n")
    calls = []
    build = train.config.build_parser
    monkeypatch.setattr(train.config, "build_parser", lambda: calls.append(1) or build())
    sweep = plan([*TINY, "--results_dir", str(tmp_path), "--algo", "happo,hatrpo,mappo", "--seeds", "1,2",
                  "--config", str(user), "--agent_obsk", "0,1", "--obs_mode", "local", "--clip_param", "0.1"])
    assert len(calls) == 1 and len(sweep.runs) == 12
    for run in sweep.runs:
        assert load_config(run.argv) == run.config, run.label
        assert (run.config.torch_threads, run.config.progress) == (1, False)
    hatrpo = next(run for run in sweep.runs if run.config.algo == "hatrpo")
    assert hatrpo.config.kl_threshold == 0.02 and hatrpo.config.value_clip == 0.1


@pytest.mark.slow
def test_a_sweep_that_dropped_a_flag_from_a_run_continues_it(tmp_path, capsys):
    """--lr is dropped from the HATRPO run; running the same sweep again must recognise that
    run's saved settings as its own, not refuse it as 'other settings'."""
    argv = [*TINY, "--results_dir", str(tmp_path), "--algo", "happo,hatrpo", "--lr", "0.001"]
    first = plan(argv)
    hatrpo = next(run for run in first.runs if "hatrpo" in run.label)
    assert "--lr" not in hatrpo.argv
    assert train_main(hatrpo.argv) == 0
    again = plan(argv)
    assert [run.resumed for run in again.runs] == [False, True]


@pytest.mark.slow
def test_local_sweep_2_seeds_x_2_algorithms(tmp_path, capsys):
    results = tmp_path / "results"
    rc = train_main([*TINY, "--results_dir", str(results), "--algo", ",".join(ALGOS),
                     "--seeds", "1,2", "--max_parallel", "2"])
    out = capsys.readouterr().out
    check_2x2(results, rc, out)
    assert "at most 2 at a time, on this machine" in out


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_others_finish(tmp_path, capsys):
    results = tmp_path / "results"
    taken = run_dir(results, "happo", 2)
    taken.mkdir(parents=True)
    (taken / "metrics.csv").write_text("env_steps\n")  # not a run it can continue: that run exits 2
    rc = sweep_main([*TINY, "--results_dir", str(results), "--algo", "happo", "--seeds", "1,2",
                     "--max_parallel", "2"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert (run_dir(results, "happo", 1) / "summary.json").is_file()
    assert not (taken / "summary.json").exists()
    assert f"FAILED  HalfCheetah-2x3 happo default seed 2: exit 2; error: --resume {taken}: " in out
    assert f"failed  {taken}  exit 2: error: --resume {taken}: " in out
    assert f"ok      {run_dir(results, 'happo', 1)}  eval_return_mean" in out
    assert "1/2 run(s) succeeded" in out


@pytest.mark.slow
def test_a_run_directory_with_other_settings_stops_the_sweep_before_it_starts(tmp_path, capsys):
    results = tmp_path / "results"
    assert train_main([*TINY, "--results_dir", str(results), "--seed", "2", "--lr", "0.001"]) == 0
    capsys.readouterr()
    rc = sweep_main([*TINY, "--results_dir", str(results), "--algo", "happo", "--seeds", "1,2"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{run_dir(results, 'happo', 2)} holds a run with other settings (lr: 0.001 -> 0.0005)" in err
    assert not run_dir(results, "happo", 1).exists()


@pytest.mark.slow
def test_the_same_sweep_again_continues_it(tmp_path, capsys):
    results = tmp_path / "results"
    sweep = [*TINY, "--results_dir", str(results), "--algo", "happo", "--seeds", "1,2", "--max_parallel", "2"]
    assert sweep_main(sweep) == 0
    assert sweep_main([*sweep, "--num_env_steps", "200"]) == 0  # a larger budget: both train on
    out = capsys.readouterr().out
    assert "2 run(s) already started here continue from their run directories" in out
    for seed in SEEDS:
        summary = json.loads((run_dir(results, "happo", seed) / "summary.json").read_text())
        assert summary["env_steps"] == 200 and summary["iterations"] == 2
    assert sweep_main([*sweep, "--num_env_steps", "200"]) == 0  # finished: nothing to do
    log = (results / "sweep-logs" / "mamujoco_HalfCheetah-2x3_happo_default_seed1.log").read_text()
    assert "already at 200 env steps" in log and "--resume" in log.splitlines()[-2]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_interrupted_sweep_exits_130_and_the_same_command_finishes_it(tmp_path, stop):
    """The sweep passes the signal on to its runs (each in a session of its own): they save a
    checkpoint and stop. A hangup used to stop the sweep alone, and its runs trained on."""
    import subprocess

    from tests.processes import interrupt_when

    results = tmp_path / "results"
    sweep = [sys.executable, "-m", "train.train", *TINY, "--results_dir", str(results), "--algo", "happo",
             "--seeds", "1,2", "--max_parallel", "1"]
    repo = Path(__file__).resolve().parent.parent
    proc, out, _ = interrupt_when([*sweep, "--num_env_steps", "100000000"],
                                  lambda: (run_dir(results, "happo", 1) / "metrics.csv").exists(),
                                  stop=stop, cwd=repo, stderr=subprocess.STDOUT)
    assert proc.returncode == 130, out
    assert "run the same command again to continue it" in out
    assert (run_dir(results, "happo", 1) / "checkpoints" / "last.pt").is_file()
    assert not run_dir(results, "happo", 2).exists()  # not started
    from utils.checkpoint import load_checkpoint

    saved = load_checkpoint(run_dir(results, "happo", 1))["counters"]["env_steps"]
    done = subprocess.run([*sweep, "--num_env_steps", str(saved + 100)], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 run(s) already started here continue" in done.stdout
    for seed in SEEDS:
        assert (run_dir(results, "happo", seed) / "summary.json").is_file()


@pytest.mark.slow
def test_interrupted_ray_sweep_saves_its_runs(tmp_path):
    """Ctrl-C of a sweep on a local Ray cluster: its runs save a checkpoint and stop, as a
    local sweep's do. Cancelling the Ray tasks and shutting Ray down had killed them unsaved
    (and a Ray worker's blocked SIGINT, inherited by the run, hid the signal from it)."""
    pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    import subprocess

    from tests.processes import interrupt_when

    results = tmp_path / "results"
    sweep = [sys.executable, "-m", "train.train", *TINY, "--results_dir", str(results), "--algo", "happo",
             "--seeds", "1,2", "--max_parallel", "2", "--ray_address", "local", "--save_interval", "1000",
             "--num_env_steps", "100000000"]
    repo = Path(__file__).resolve().parent.parent
    proc, out, _ = interrupt_when(sweep, lambda: all((run_dir(results, "happo", s) / "metrics.csv").exists()
                                                     for s in SEEDS), cwd=repo, stderr=subprocess.STDOUT)
    if "could not start or reach Ray" in out:
        pytest.skip(f"a local Ray instance cannot start here: {out.strip()[-300:]}")
    assert proc.returncode == 130, out
    for seed in SEEDS:  # --save_interval 1000: only the interrupt saves
        assert (run_dir(results, "happo", seed) / "checkpoints" / "last.pt").is_file(), out


@pytest.mark.slow
def test_ray_sweep_2_seeds_x_2_algorithms(tmp_path, capsys):
    pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    results = tmp_path / "results"
    rc = sweep_main([*TINY, "--results_dir", str(results), "--algo", ",".join(ALGOS),
                     "--seeds", "1,2", "--max_parallel", "2", "--ray_address", "local"])
    captured = capsys.readouterr()
    if rc == 2 and "could not start or reach Ray" in captured.err:
        pytest.skip(f"a local Ray instance cannot start here: {captured.err.strip()}")
    check_2x2(results, rc, captured.out)
    assert "on Ray (local)" in captured.out


def test_bad_flags_are_rejected_before_anything_starts(tmp_path, capsys):
    results = tmp_path / "results"
    rc = train_main([*TINY, "--results_dir", str(results), "--algo", "happo,nosuch", "--seeds", "1,2"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.count("\n") == 1 and "nosuch" in captured.err and "--algo must be one of" in captured.err
    assert "sweep:" not in captured.out
    assert not results.exists()  # no run dir, no log


@pytest.mark.parametrize("flags, message", [
    (["--seed", "1", "--seeds", "2,3"], "not both"),
    (["--seeds", "1,,2"], "empty item"),
    (["--seeds", "1,2", "--max_parallel", "0"], "--max_parallel must be a positive integer"),
    (["--map_name", "3m,8m"], "--map_name does not apply to --env mamujoco"),
    (["--seeds", "1,2", "--resume", "somewhere"], "cannot be part of a sweep"),
    (["--seed", "1,x"], "seed expects int; got 'x'"),
    (["--seeds", "1,2", "--ray_address", " "], "--ray_address needs a value"),
])
def test_other_sweep_errors(tmp_path, capsys, flags, message):
    assert sweep_main([*TINY, "--results_dir", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_ray_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert sweep_main([*TINY, "--results_dir", str(tmp_path / "r"), "--ray_address", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install ray" in err
    assert not (tmp_path / "r").exists()
