"""End-to-end training runs on real Multi-Agent MuJoCo tasks (``train.train.main``).

Every run is tiny (2 envs x 50 steps per iteration, 16-unit networks, one epoch, one
evaluation episode) and runs in-process, except the SIGINT and wandb checks, which need
their own process. The whole file takes well under 90 s on 2 CPU cores.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("mujoco")

from tests.processes import interrupt_when  # noqa: E402
from train.train import main  # noqa: E402
from utils.logger import varies_by_machine  # noqa: E402

pytestmark = pytest.mark.slow  # real MaMuJoCo training runs

REPO = Path(__file__).resolve().parent.parent
E, T = 2, 50  # rollout threads x episode length: 100 env steps per iteration
TINY = ["--n_rollout_threads", str(E), "--episode_length", str(T), "--hidden_sizes", "16,16",
        "--ppo_epoch", "1", "--critic_epoch", "1", "--eval_episodes", "1", "--n_eval_rollout_threads", "1",
        "--log_interval", "1", "--device", "cpu", "--torch_threads", "1", "--no-progress", "--no-tensorboard"]
ALGOS = ("happo", "hatrpo", "mappo", "ippo")


def run_dir(results: Path, algo: str, task: str = "HalfCheetah-2x3", exp: str = "default", seed: int = 1) -> Path:
    return results / "mamujoco" / task / algo / exp / f"seed-{seed}"


def train(results: Path, *flags: str) -> int:
    return main([*TINY, "--results_dir", str(results), *flags])


def read_metrics(directory: Path) -> list[dict[str, str]]:
    with open(directory / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def env_steps(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["env_steps"]) for r in rows]


def rounded_up(budget: int) -> int:
    return -(-budget // (E * T)) * (E * T)


def check_run_files(directory: Path, budget: int, n_agents: int, algo: str) -> list[dict[str, str]]:
    """The files every finished run leaves, with the columns every tool reads."""
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.pt", "summary.json"):
        assert (directory / name).is_file(), name
    saved = yaml.safe_load((directory / "config.yaml").read_text())
    assert saved["algo"] == algo and saved["num_env_steps"] == budget
    rows = read_metrics(directory)
    steps = env_steps(rows)
    assert steps and all(a < b for a, b in zip(steps, steps[1:])), steps
    assert steps[-1] == rounded_up(budget)
    header = rows[0].keys()
    for column in ("env_steps", "wall_seconds", "sps", "train_episode_return", "eval_return"):
        assert column in header, column
    assert all(100 < float(r["rss_mb"]) < 20_000 for r in rows)  # torch alone is > 100 MB
    per_agent = {"happo": ("clip_fraction", "M_mean", "M_std", "M_min", "M_max"),
                 "hatrpo": ("kl", "accepted", "ls_steps")}.get(algo, ())
    for i in range(n_agents):
        for key in per_agent:
            assert f"agent{i}/{key}" in header, f"agent{i}/{key}"
            assert all(r[f"agent{i}/{key}"] != "" for r in rows), f"agent{i}/{key} empty"
    assert not any(k.startswith(f"agent{n_agents}/") for k in header)  # no phantom agents
    if algo == "hatrpo":  # a step is only taken inside the trust region
        for row in rows:
            for i in range(n_agents):
                kl, accepted = float(row[f"agent{i}/kl"]), float(row[f"agent{i}/accepted"])
                assert accepted in (0.0, 1.0)
                assert kl < saved["kl_threshold"] or accepted == 0.0, (row["env_steps"], i, kl, accepted)
                assert 1 <= float(row[f"agent{i}/ls_steps"]) <= saved["ls_step"]
    assert math.isfinite(float(rows[-1]["eval_return"]))  # the last iteration always evaluates
    summary = json.loads((directory / "summary.json").read_text())
    for key in ("env_steps", "eval_return_mean", "eval_return_std", "wall_seconds", "sps"):
        assert summary.get(key) is not None, key
    assert summary["env_steps"] == steps[-1]
    assert summary["eval_return_mean"] == pytest.approx(float(rows[-1]["eval_return"]), rel=1e-5, abs=1e-5)
    return rows


# -- every algorithm on HalfCheetah 2x3 -----------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_halfcheetah_2x3_every_algorithm(tmp_path, algo):
    budget = 250  # not a multiple of 100: runs 3 whole iterations
    assert train(tmp_path, "--algo", algo, "--num_env_steps", str(budget)) == 0
    directory = run_dir(tmp_path, algo)
    rows = check_run_files(directory, budget, n_agents=2, algo=algo)
    assert env_steps(rows) == [100, 200, 300]


# -- heterogeneous agents ----------------------------------------------------------------------
HETEROGENEOUS = [
    ("Hopper", "3x1", ["--agent_obsk", "1"], "Hopper-3x1", 3, "obs [8, 9, 8], actions [1, 1, 1]"),
    ("Humanoid", "9|8", [], "Humanoid-9_8", 2, "obs [236, 167], actions [9, 8]"),
    # No node-based observation map in the wrapper (observation_factorization is None).
    ("Reacher", "2x1", [], "Reacher-2x1", 2, "obs [5, 8], actions [1, 1]"),
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("scenario,conf,extra,task,n_agents,spaces", HETEROGENEOUS,
                         ids=["Hopper-3x1-k1", "Humanoid-9|8", "Reacher-2x1"])
def test_heterogeneous_agents(tmp_path, capsys, algo, scenario, conf, extra, task, n_agents, spaces):
    no_share = ["--no-share_param"] if algo in ("mappo", "ippo") else []
    rc = train(tmp_path, "--algo", algo, "--scenario", scenario, "--agent_conf", conf, *extra, *no_share,
               "--num_env_steps", "100")
    assert rc == 0
    assert spaces in capsys.readouterr().out
    check_run_files(run_dir(tmp_path, algo, task), 100, n_agents=n_agents, algo=algo)
    if algo in ("mappo", "ippo"):  # one actor per agent: per-agent columns, no shared ones
        header = read_metrics(run_dir(tmp_path, algo, task))[0].keys()
        assert all(any(k.startswith(f"agent{i}/") for k in header) for i in range(n_agents))
        assert not any(k.startswith("shared/") for k in header)


@pytest.mark.parametrize("scenario,conf,extra", [("Humanoid", "9|8", []), ("Hopper", "3x1", ["--agent_obsk", "1"])])
def test_share_param_on_heterogeneous_task_exits_2(tmp_path, capsys, scenario, conf, extra):
    results = tmp_path / "new" / "results"  # created by this start, so removed with the run dir
    rc = train(results, "--algo", "mappo", "--scenario", scenario, "--agent_conf", conf, *extra,
               "--share_param", "--num_env_steps", "100")
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "share_param" in err, err
    assert not list(tmp_path.rglob("metrics.csv")) and not list(tmp_path.rglob("last.pt"))
    assert not list(tmp_path.iterdir()), "an empty run or results directory was left behind"


def test_halfcheetah_6x1_six_agents(tmp_path, capsys):
    assert train(tmp_path, "--algo", "happo", "--agent_conf", "6x1", "--num_env_steps", "100") == 0
    assert "6 agents" in capsys.readouterr().out
    check_run_files(run_dir(tmp_path, "happo", "HalfCheetah-6x1"), 100, n_agents=6, algo="happo")


# -- resume and determinism -----------------------------------------------------------------
def comparable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not varies_by_machine(k)} for r in rows]


def assert_same_rows(a: list[dict[str, str]], b: list[dict[str, str]], ignore=frozenset()) -> None:
    """Equal up to 1e-6, except volatile columns and the (env_steps, column) pairs in ``ignore``."""
    assert env_steps(a) == env_steps(b)
    for ra, rb in zip(comparable(a), comparable(b)):
        assert ra.keys() == rb.keys()
        for key in ra:
            if ra[key] == rb[key] or (int(ra["env_steps"]), key) in ignore:
                continue
            assert ra[key] != "" and rb[key] != "", (ra["env_steps"], key, ra[key], rb[key])
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6, abs=1e-6), \
                (ra["env_steps"], key, ra[key], rb[key])


@pytest.mark.parametrize("algo,eval_interval", [("happo", 2), ("hatrpo", 25)])
def test_resume_continues_exactly_and_matches_a_straight_run(tmp_path, algo, eval_interval):
    """n = two iterations. With --eval_interval 2 both runs evaluate at n and 2n and every
    row must match; with 25 only the split run evaluates at n (its last iteration), and
    apart from that row's eval columns nothing may differ: evaluating must not disturb
    training (RNG streams, env states)."""
    n = 200
    common = ["--algo", algo, "--eval_interval", str(eval_interval), "--seed", "3"]
    assert train(tmp_path, *common, "--exp_name", "split", "--num_env_steps", str(n)) == 0
    split = run_dir(tmp_path, algo, exp="split", seed=3)
    before = read_metrics(split)
    assert env_steps(before)[-1] == n
    old_text = (split / "metrics.csv").read_text()

    assert main(["--resume", str(split), "--num_env_steps", str(2 * n), "--no-progress"]) == 0
    after = read_metrics(split)
    assert (split / "metrics.csv").read_text().startswith(old_text)  # old rows kept verbatim
    assert after[:len(before)] == before
    steps = env_steps(after)
    assert steps == [100, 200, 300, 400] and len(set(steps)) == len(steps)
    assert json.loads((split / "summary.json").read_text())["env_steps"] == 2 * n
    assert yaml.safe_load((split / "config.yaml").read_text())["num_env_steps"] == 2 * n  # the latest session's

    assert train(tmp_path, *common, "--exp_name", "straight", "--num_env_steps", str(2 * n)) == 0
    straight = read_metrics(run_dir(tmp_path, algo, exp="straight", seed=3))
    ignore = set() if eval_interval == 2 else {(n, "eval_return"), (n, "eval_return_std")}
    if ignore:
        assert straight[1]["eval_return"] == "" and after[1]["eval_return"] != ""
    assert_same_rows(after, straight, ignore)


def test_eval_only_prints_json(tmp_path, capsys, monkeypatch):
    assert train(tmp_path, "--algo", "mappo", "--num_env_steps", "100") == 0
    directory = run_dir(tmp_path, "mappo")
    # the last line of a finished run, with or without the progress line
    assert "done: 100 env steps in" in capsys.readouterr().out.strip().splitlines()[-1]
    import train.train as train_module

    def resolve_for_training(argv):  # the run's config comes from its checkpoint instead
        raise AssertionError("--eval_only resolved a training config (and checked the default env)")
    monkeypatch.setattr(train_module, "load_config", resolve_for_training)
    before = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
    argv = ["--eval_only", "--model_dir", str(directory), "--eval_episodes", "1",
            "--n_eval_rollout_threads", "1", "--device", "cpu", "--torch_threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    result = json.loads(out[0])
    assert math.isfinite(result["eval_return"]) and "eval_return_std" in result
    assert result["env_steps"] == 100
    # Evaluation is seeded (its own seed, not the training run's evaluation seed): repeatable.
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()} == before  # read-only
    # Settings not given come from the run, so a bare evaluation repeats the run's own last one.
    assert main(["--eval_only", "--model_dir", str(directory)]) == 0
    summary = json.loads((directory / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_return"] == summary["eval_return_mean"]
    # A flag --eval_only would ignore is an error, not silently dropped.
    assert main(["--eval_only", "--model_dir", str(directory), "--seed", "5"]) == 2
    assert "--seed has no effect with --eval_only" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    assert train(tmp_path, "--num_env_steps", "100") == 0
    directory = run_dir(tmp_path, "happo")
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
    assert main(["--resume", str(directory)]) == 0
    assert "already at 100 env steps" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()} == before
    assert main(["--resume", str(directory), "--config", "my.yaml"]) == 2
    assert "--config cannot be used with --resume" in capsys.readouterr().err


# -- subprocesses: SIGINT and wandb ---------------------------------------------------------------
def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.mark.parametrize("stop,blocked", [(signal.SIGINT, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
                         ids=["ctrl-c", "hangup", "ctrl-c-blocked-by-the-launcher"])
def test_sigint_checkpoints_exits_130_and_resumes(tmp_path, stop, blocked):
    """Ctrl-C, and a closed terminal's SIGHUP (whose default action killed the run without a
    checkpoint), save one and exit 130; also when the launcher started the run with SIGINT
    blocked (a Ray worker does, and the mask is inherited: the run never saw it)."""
    cmd = [sys.executable, "-m", "train.train", *TINY, "--results_dir", str(tmp_path), "--algo", "happo",
           "--num_env_steps", "1000000", "--no-use_eval", "--save_interval", "1000"]
    directory = run_dir(tmp_path, "happo")
    seen_before_signal = {}

    def ready() -> bool:  # one metrics row logged, and (checked then) no checkpoint yet
        if (directory / "metrics.csv").exists() and len(read_metrics(directory)) >= 1:
            seen_before_signal["checkpoint"] = (directory / "checkpoints" / "last.pt").exists()
            return True
        return False
    launch = {"preexec_fn": lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})} if blocked else {}
    proc, out, err = interrupt_when(cmd, ready, timeout=60, stop=stop, cwd=REPO, env=subprocess_env(), **launch)
    assert seen_before_signal == {"checkpoint": False}, (out, err)  # only the interrupt saves here
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in out
    assert (directory / "checkpoints" / "last.pt").is_file()

    from utils.checkpoint import load_checkpoint

    saved_steps = load_checkpoint(directory)["counters"]["env_steps"]
    assert saved_steps >= 100 and saved_steps % 100 == 0
    assert env_steps(read_metrics(directory))[-1] >= saved_steps
    target = saved_steps + 200
    assert main(["--resume", str(directory), "--num_env_steps", str(target), "--no-progress"]) == 0
    steps = env_steps(read_metrics(directory))
    assert steps == list(range(100, target + 1, 100))  # replayed rows are not doubled
    assert json.loads((directory / "summary.json").read_text())["env_steps"] == target
    # config.yaml is the config of the latest session, runtime flags included
    assert yaml.safe_load((directory / "config.yaml").read_text())["num_env_steps"] == target


def interrupt_inside(monkeypatch, module, name: str, times: int) -> None:
    """Make the first call of ``module.name`` send this process SIGINT ``times`` times after it
    runs (a Ctrl-C at that point of the start-up, without a race against a subprocess's timing)."""
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        for _ in range(times if len(calls) == 1 else 0):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs at the next bytecode boundary
        return out
    monkeypatch.setattr(module, name, wrapped)


def test_ctrl_c_before_the_runner_starts_leaves_nothing(tmp_path, monkeypatch, capsys):
    import train.train as train_module

    interrupt_inside(monkeypatch, train_module, "ensure_writable", 1)
    assert train(tmp_path / "results", "--num_env_steps", "100") == 130
    assert "interrupted (SIGINT) before training started" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ctrl_c_while_the_runner_is_built_checkpoints_and_resumes(tmp_path, monkeypatch, capsys):
    """Env construction (and, on SMAX, JAX compiling) takes seconds before Runner.run installs
    its handlers: a Ctrl-C there is kept and the run stops with a checkpoint at 0 steps."""
    import utils.device

    interrupt_inside(monkeypatch, utils.device, "resolve_device", 1)
    assert train(tmp_path, "--num_env_steps", "200", "--no-progress") == 130
    assert "checkpoint at 0 env steps" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["--resume", str(run_dir(tmp_path, "happo")), "--no-progress"]) == 0
    assert env_steps(read_metrics(run_dir(tmp_path, "happo"))) == [100, 200]


def test_second_ctrl_c_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    import utils.device

    interrupt_inside(monkeypatch, utils.device, "resolve_device", 2)
    assert train(tmp_path / "results", "--num_env_steps", "100") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "interrupted: stopped at once; the last checkpoint, if any, is kept"
    assert not list(tmp_path.iterdir()), "an empty run directory was left behind"


def test_wandb_offline_writes_run_directory(tmp_path):
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
                         WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
                         WANDB_DATA_DIR=str(home / "data"),
                         # any attempt to reach the network would fail: offline must not need it
                         HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    env.pop("WANDB_API_KEY", None)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "train.train", *TINY, "--results_dir", str(results), "--algo", "ippo",
           "--num_env_steps", "100", "--wandb"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    directory = run_dir(results, "ippo")
    assert (directory / "wandb").is_dir()
    offline_runs = list((directory / "wandb").glob("offline-run-*"))
    assert offline_runs, list((directory / "wandb").iterdir())
    assert any(p.suffix == ".wandb" for p in offline_runs[0].iterdir())
    check_run_files(directory, 100, n_agents=2, algo="ippo")


@pytest.mark.parametrize("floor", [None, 0.2])
def test_linear_lr_decay_starts_at_the_full_rate(tmp_path, monkeypatch, floor):
    """--use_linear_lr_decay: update k of K (0-based) trains at lr (1 - k/K), as in HARL: the
    first update at the full --lr, none at 0 (4 updates: 1, 3/4, 1/2, 1/4); with
    --lr_decay_floor f, at lr (f + (1 - f)(1 - k/K))."""
    from algorithms.base import OnPolicyMARL

    used = []
    original = OnPolicyMARL.train

    def recording(self, *args, **kwargs):
        used.extend([self.actor_optims[0].param_groups[0]["lr"], self.critic_optims[0].param_groups[0]["lr"]])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnPolicyMARL, "train", recording)
    extra = [] if floor is None else ["--lr_decay_floor", str(floor)]
    assert train(tmp_path, "--num_env_steps", str(4 * E * T), "--use_linear_lr_decay", "--lr", "0.004",
                 "--critic_lr", "0.002", "--no-use_eval", *extra) == 0
    f = floor or 0.0
    assert used == pytest.approx([lr * (f + (1 - f) * d) for d in (1, 0.75, 0.5, 0.25) for lr in (0.004, 0.002)])


def test_resume_below_the_steps_done_evaluates_the_final_policy(tmp_path, capsys):
    """A run stopped after its last evaluation, resumed with a smaller --num_env_steps, trains
    no further: summary.json must report an evaluation of the policy it holds, and say when."""
    from utils.checkpoint import load_checkpoint, save_checkpoint

    assert train(tmp_path, "--num_env_steps", str(3 * E * T), "--eval_interval", "1") == 0
    directory = run_dir(tmp_path, "happo")
    before = json.loads((directory / "summary.json").read_text())
    assert before["eval_env_steps"] == before["env_steps"] == 3 * E * T
    # As if it had stopped (no summary.json) one iteration after its last evaluation.
    checkpoint = load_checkpoint(directory)
    checkpoint["last_eval"] = {**checkpoint["last_eval"], "env_steps": 2 * E * T, "eval_return": -1e6}
    save_checkpoint(directory, checkpoint)
    (directory / "summary.json").unlink()
    capsys.readouterr()
    assert main(["--resume", str(directory), "--num_env_steps", str(E * T)]) == 0
    assert "evaluating the final policy (300 env steps)" in capsys.readouterr().out
    after = json.loads((directory / "summary.json").read_text())
    assert after["eval_env_steps"] == 3 * E * T
    assert after["eval_return_mean"] == before["eval_return_mean"]  # the same policy, the same evaluation seeds


def read_tensorboard_tags(tb_dir: Path) -> set[str]:
    """Scalar tags in a run's event files (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in tb_dir.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            offset += 16 + length
    return tags


def test_tensorboard_panels(tmp_path):
    from utils.logger import tensorboard_tag

    assert train(tmp_path, "--num_env_steps", str(E * T), "--tensorboard") == 0
    tags = read_tensorboard_tags(run_dir(tmp_path, "happo") / "tb")
    assert {"eval/return", "eval/return_std", "run/sps", "run/iteration", "agent0/entropy",
            "critic/value_loss", "time/env_s"} <= tags
    # Every numeric column has its tag (no episode finished in 50 steps: the train_* ones are NaN).
    filled = [c for c, v in read_metrics(run_dir(tmp_path, "happo"))[0].items()
              if c != "env_steps" and v not in ("", "nan")]
    assert tags == {tensorboard_tag(c) for c in filled}
