"""Fault injection: every fault is made to happen for real, then we check what was kept.

1. hard kills (SIGKILL of a real training process at random moments, and in the middle
   of a checkpoint write) -> every resume continues exactly: metrics.csv has no gaps
   and no duplicates and its learning columns equal an uninterrupted run's;
2. a failing environment copy (tests/faulty_env.py) -> exit 1 with a checkpoint that
   resumes, or a restart of that copy within --max_env_restarts;
3. NaN in observations / rewards / losses / gradients / parameters -> exit 1 naming the
   quantity, and the last good checkpoint is byte-for-byte untouched;
4. a full disk while checkpointing and an unwritable --results_dir;
5. determinism: same seed -> same metrics, other seed -> other metrics, resume from a
   mid-run checkpoint -> the uninterrupted run's metrics (HAPPO, HATRPO, SMAX 3m).

Runs are tiny (2 envs x 50 steps per iteration, 16-unit networks) and in-process except
the kills, which need real processes. Set TEST_FAULTS_SEED to replay the kill moments.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("mujoco")

import envs.registry  # noqa: E402
from train.chaos import file_id  # (inode, mtime) of a file, None if absent
import runners.runner  # noqa: E402
import utils.checkpoint  # noqa: E402
from tests import faulty_env  # noqa: E402
from train.train import main  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.logger import varies_by_machine  # noqa: E402

pytestmark = pytest.mark.slow  # every test trains for real, with a fault made to happen

REPO = Path(__file__).resolve().parent.parent
E, T = 2, 50
STEPS_PER_ITER = E * T  # with --log_interval 1 every iteration is one row
TINY = ["--n_rollout_threads", str(E), "--episode_length", str(T), "--hidden_sizes", "16,16",
        "--ppo_epoch", "2", "--critic_epoch", "2", "--eval_episodes", "1", "--n_eval_rollout_threads", "1",
        "--log_interval", "1", "--device", "cpu", "--torch_threads", "1", "--no-progress", "--no-tensorboard"]
TASK = "HalfCheetah-2x3"
KILL_SEED = int(os.environ.get("TEST_FAULTS_SEED", time.time_ns() % 2**31))


# -- helpers -------------------------------------------------------------------------------------
def run_dir(results: Path, algo: str = "happo", seed: int = 1, env: str = "mamujoco", task: str = TASK) -> Path:
    return Path(results) / env / task / algo / "default" / f"seed-{seed}"


def read_rows(directory: Path) -> list[dict[str, str]]:
    with open(Path(directory) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))




def learning(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every column that depends on what was learned (not on how long it took)."""
    return [{k: v for k, v in r.items() if not varies_by_machine(k)} for r in rows]


def steps_of(rows) -> list[int]:
    return [int(r["env_steps"]) for r in rows]


def assert_no_gaps(rows, budget: int) -> None:
    steps = steps_of(rows)
    assert steps == list(range(STEPS_PER_ITER, budget + 1, STEPS_PER_ITER)), steps


def assert_same_learning(rows, reference, start_after: int = -1) -> None:
    got = [r for r in learning(rows) if int(r["env_steps"]) > start_after]
    want = [r for r in learning(reference) if int(r["env_steps"]) > start_after]
    assert steps_of(got) == steps_of(want)
    for a, b in zip(got, want):
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert not diff, f"env_steps {a['env_steps']}: {diff}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def run_main(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out
    return lines[0]


class SaveRecorder:
    """Wraps the runner's save_checkpoint: after every save, record the checkpoint's
    sha256 and counters and keep a copy of the run directory (a mid-run snapshot)."""

    def __init__(self, snapshots: Path):
        self.snapshots = Path(snapshots)
        self.saves: list[dict] = []
        self._save = utils.checkpoint.save_checkpoint

    def __call__(self, run: Path, payload: dict) -> Path:
        path = self._save(run, payload)
        iteration = payload["counters"]["iteration"]
        copy = self.snapshots / f"{Path(run).name}-it{iteration}-{len(self.saves)}"
        shutil.copytree(run, copy)
        self.saves.append({"iteration": iteration, "env_steps": payload["counters"]["env_steps"],
                           "sha256": sha256(path), "run": Path(run), "copy": copy})
        return path

    def snapshot(self, iteration: int) -> Path:
        return next(s["copy"] for s in self.saves if s["iteration"] == iteration)


@pytest.fixture
def saves(monkeypatch, tmp_path) -> SaveRecorder:
    recorder = SaveRecorder(tmp_path / "snapshots")
    monkeypatch.setattr(runners.runner, "save_checkpoint", recorder)
    return recorder


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setitem(envs.registry.FAMILIES, "faulty", "tests.faulty_env")
    faulty_env.reset_faults()
    yield faulty_env
    faulty_env.reset_faults()


_REFERENCES: dict[tuple, list[dict[str, str]]] = {}


def reference_rows(tmp_path_factory, *flags: str) -> list[dict[str, str]]:
    """metrics.csv of one uninterrupted in-process run (memoised per flag set)."""
    key = tuple(flags)
    if key not in _REFERENCES:
        results = tmp_path_factory.mktemp("reference")
        assert main([*TINY, "--results_dir", str(results), *flags]) == 0
        given = dict(zip(flags[::2], flags[1::2]))
        _REFERENCES[key] = read_rows(run_dir(results, given.get("--algo", "happo"), int(given.get("--seed", 1)),
                                             given.get("--env", "mamujoco")))
    return _REFERENCES[key]


# -- 1. hard kills -------------------------------------------------------------------------------
# A child that trains like `python -m train.train` but stalls half-way through its N-th
# checkpoint write (after writing and fsyncing half of the temporary file), so the parent
# can SIGKILL it exactly there.
SLOW_WRITER = r"""
import builtins, os, sys, time
import utils.checkpoint as ck
marker, nth, count = os.environ["SLOW_CKPT_MARKER"], int(os.environ["SLOW_CKPT_NTH"]), [0]
class Stall:
    def __init__(self, fh): self.fh = fh
    def __enter__(self): return self
    def __exit__(self, *exc): return self.fh.__exit__(*exc)
    def __getattr__(self, name): return getattr(self.fh, name)
    def write(self, data):
        self.fh.write(data[: len(data) // 2]); self.fh.flush(); os.fsync(self.fh.fileno())
        open(marker, "w").close()
        time.sleep(600)
def stalling_open(path, mode="r", *args, **kwargs):
    fh = builtins.open(path, mode, *args, **kwargs)
    if ".last.pt.tmp-" in str(path):
        count[0] += 1
        if count[0] == nth:
            return Stall(fh)
    return fh
ck.open = stalling_open
from train.train import main
sys.exit(main(sys.argv[1:]))
"""


class Child:
    def __init__(self, args: list[str], log: Path, code: str | None = None, env: dict | None = None):
        self.log = log
        cmd = [sys.executable, "-m", "train.train", *args] if code is None else [sys.executable, "-c", code, *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited ({self.proc.returncode}) before {what} "
                                     f"(TEST_FAULTS_SEED={KILL_SEED}):\n{self.output()}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(0.01)

    def sigkill(self) -> None:
        assert self.proc.poll() is None, f"finished before the kill (TEST_FAULTS_SEED={KILL_SEED}):\n{self.output()}"
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL


@pytest.fixture
def spawn():
    """Start Child processes; any still running when the test ends (a failed check) is killed."""
    started: list[Child] = []

    def _spawn(*args, **kwargs) -> Child:
        started.append(Child(*args, **kwargs))
        return started[-1]

    yield _spawn
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def test_sigkill_anywhere_then_resume_matches_uninterrupted(spawn, tmp_path, tmp_path_factory):
    """SIGKILL at random moments (twice) and once half-way through a checkpoint write; resume
    each time with --resume; the finished run's metrics.csv equals the uninterrupted one's."""
    rng = random.Random(KILL_SEED)
    budget = 3000
    flags = ["--num_env_steps", str(budget), "--save_interval", "2", "--eval_interval", "15", "--seed", "4"]
    results = tmp_path / "results"
    run = run_dir(results, seed=4)
    last = run / "checkpoints" / "last.pt"
    history = []  # (what, checkpoint iteration) after every kill

    def check_after_kill(what: str) -> None:
        ckpt = load_checkpoint(run)  # never a half-written file
        iteration = ckpt["counters"]["iteration"]
        assert ckpt["counters"]["env_steps"] == iteration * STEPS_PER_ITER and iteration % 2 == 0
        assert all_finite(ckpt["algorithm"])
        if history:
            assert iteration >= history[-1][1]
        history.append((what, iteration))

    # kill 1: a random moment after the first checkpoint exists
    child = spawn([*TINY, "--results_dir", str(results), *flags], tmp_path / "log1.txt")
    child.wait_for(last.exists, "the first checkpoint")
    time.sleep(rng.uniform(0.0, 0.4))
    child.sigkill()
    check_after_kill("random")

    # kill 2: half-way through the resumed process's second checkpoint write
    resumed_at = load_checkpoint(run)["counters"]["iteration"]
    marker = tmp_path / "writing"
    child = spawn(["--resume", str(run)], tmp_path / "log2.txt", code=SLOW_WRITER,
                  env={"SLOW_CKPT_MARKER": str(marker), "SLOW_CKPT_NTH": "2"})
    child.wait_for(marker.exists, "the stalled checkpoint write")
    temps = [p for p in last.parent.glob(f".last.pt.tmp-{child.proc.pid}")]
    assert len(temps) == 1 and 0 < temps[0].stat().st_size  # the kill really lands mid-write
    child.sigkill()
    check_after_kill("mid-write")
    assert history[-1][1] == resumed_at + 2  # the first save of that process, not the half one

    # kill 3: a random moment after the resumed process wrote a checkpoint of its own
    before = file_id(last)
    child = spawn(["--resume", str(run)], tmp_path / "log3.txt")
    child.wait_for(lambda: file_id(last) != before, "a new checkpoint")
    time.sleep(rng.uniform(0.0, 0.4))
    child.sigkill()
    check_after_kill("random")

    child = spawn(["--resume", str(run)], tmp_path / "log4.txt")
    assert child.proc.wait(120) == 0, child.output()
    assert [w for w, _ in history] == ["random", "mid-write", "random"], history
    rows = read_rows(run)
    assert_no_gaps(rows, budget)
    assert_same_learning(rows, reference_rows(tmp_path_factory, *flags))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == budget and summary["env_restarts"] == 0


# -- 2. environment failures -----------------------------------------------------------------
FAULT_FLAGS = ["--num_env_steps", "600", "--save_interval", "2", "--no-use_eval"]


def test_env_crash_without_restarts_stops_with_a_checkpoint_that_resumes(faulty, saves, capsys, tmp_path,
                                                                      tmp_path_factory):
    # step() call 130 is t = 29 of iteration 3 (50 calls per iteration); copy 1 of seed 1 has seed 10008
    faulty.reset_faults({"kind": "raise", "step": 130, "env": 1})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *FAULT_FLAGS,
                                     "--max_env_restarts", "0"])
    assert rc == 1, out + err
    line = error_line(out)
    for needle in ("env 1", "seed 10008", "injected simulator crash", "--max_env_restarts 0", "checkpoint"):
        assert needle in line, (needle, line)
    run = run_dir(results, env="faulty")
    ckpt = load_checkpoint(run)  # the resume point of the failed iteration
    assert ckpt["counters"]["iteration"] == 2 and ckpt["counters"]["env_steps"] == 200
    assert [s["iteration"] for s in saves.saves] == [2, 2]

    faulty.reset_faults()  # the fault is gone: resume and finish
    rc, out, err = run_main(capsys, ["--resume", run])
    assert rc == 0, out + err
    rows = read_rows(run)
    assert_no_gaps(rows, 600)
    # the crash left no trace in what was learned: same as a run that never failed
    assert_same_learning(rows, reference_rows(tmp_path_factory, "--env", "faulty", *FAULT_FLAGS))


def test_env_failure_outside_the_rollout_stops_with_one_line(faulty, capsys, tmp_path, monkeypatch):
    """Saving the envs' state (every iteration's resume point) can fail too, e.g. a worker
    that hangs there (--env_worker_timeout): one line and exit 1, not a traceback."""
    from envs.base import EnvError

    calls = []
    original = faulty.FaultyVecEnv.get_state

    def get_state(self):
        calls.append(1)
        if len(calls) == 3:
            raise EnvError("env worker 0 (copies 0..1, seed 1) did not answer within 2 s "
                           "(--env_worker_timeout) and was killed", env_index=0, seed=1)
        return original(self)
    monkeypatch.setattr(faulty.FaultyVecEnv, "get_state", get_state)
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", tmp_path / "results",
                                     *FAULT_FLAGS])
    assert rc == 1 and "Traceback" not in out + err
    [line] = [line for line in out.splitlines() if line.startswith("error: ")]
    assert "did not answer within 2 s" in line and "the last checkpoint is kept" in line


def test_env_crash_with_a_restart_allowed_restarts_that_copy_and_finishes(faulty, capsys, tmp_path):
    faulty.reset_faults({"kind": "raise", "step": 130, "env": 1})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *FAULT_FLAGS,
                                     "--max_env_restarts", "1"])
    assert rc == 0, out + err
    assert [f["at"] for f in faulty.FIRED] == [130]
    warning = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "env 1" in warning[0] and "restarting env 1 (1/1)" in warning[0], out
    run = run_dir(results, env="faulty")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_restarts"] == 1 and summary["env_steps"] == 600
    rows = read_rows(run)
    assert_no_gaps(rows, 600)
    assert [r["env_restarts"] for r in rows] == ["0", "0", "1", "1", "1", "1"]
    assert all(math.isfinite(float(r["critic/value_loss"])) for r in rows)
    assert load_checkpoint(run)["counters"]["env_restarts"] == 1


def test_a_restart_that_fails_saves_the_iteration_start_and_stops(faulty, saves, capsys, tmp_path, monkeypatch):
    """Rebuilding the copy can fail too (a worker that cannot start, a game that does not
    launch): the resume point of the failed iteration is saved, not lost."""
    from envs.base import EnvError

    def restart(self, env_index):
        raise EnvError(f"env {env_index} could not be rebuilt", env_index=env_index)
    monkeypatch.setattr(faulty.FaultyVecEnv, "restart", restart)
    faulty.reset_faults({"kind": "raise", "step": 130, "env": 1})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *FAULT_FLAGS,
                                     "--max_env_restarts", "1"])
    assert rc == 1 and "Traceback" not in out + err
    line = error_line(out)
    assert "restarting env 1 failed" in line and "could not be rebuilt" in line and "saved to" in line, line
    ckpt = load_checkpoint(run_dir(results, env="faulty"))
    assert ckpt["counters"]["iteration"] == 2 and ckpt["counters"]["env_steps"] == 200
    assert [s["iteration"] for s in saves.saves] == [2, 2]


def test_envs_that_fail_to_start_give_one_line_and_leave_no_run_directory(faulty, capsys, tmp_path,
                                                                         monkeypatch):
    from envs.base import EnvError

    def reset(self, seed):
        raise EnvError("StarCraft II did not launch (stand-in)")
    monkeypatch.setattr(faulty.FaultyVecEnv, "reset", reset)
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *FAULT_FLAGS])
    assert rc == 1 and "Traceback" not in out + err
    # (TINY's evaluation flags get their no-effect warnings under FAULT_FLAGS' --no-use_eval)
    assert [line for line in err.splitlines() if not line.startswith("warning: ")] == [
        "error: the environments failed to start: StarCraft II did not launch (stand-in)"]
    assert not results.exists() or list(results.iterdir()) == []


def test_a_restarted_copy_starts_its_recurrent_state_over(faulty, capsys, tmp_path, monkeypatch):
    """The rebuilt copy begins a fresh episode, so its GRU state must be reset there."""
    from runners.runner import Runner

    starts_at_collect = []
    original = Runner.collect

    def collect(self):
        starts_at_collect.append(self.starts.tolist())
        return original(self)
    monkeypatch.setattr(Runner, "collect", collect)
    faulty.reset_faults({"kind": "raise", "step": 130, "env": 1})
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", tmp_path / "results",
                                     *FAULT_FLAGS, "--max_env_restarts", "1", "--use_recurrent_policy",
                                     "--data_chunk_length", "10"])
    assert rc == 0, out + err
    # collect calls: iterations 1, 2, 3 (fails at its step 29), 3 again, 4, 5, 6. HalfCheetah
    # episodes last 1000 steps, so no copy starts an episode at an iteration boundary here.
    assert len(starts_at_collect) == 7
    assert starts_at_collect[2] == [False, False] and starts_at_collect[3] == [False, True]


EVAL_FAULT_FLAGS = ["--num_env_steps", "400", "--save_interval", "10", "--eval_interval", "2"]


def test_a_failing_evaluation_env_is_rebuilt_within_max_env_restarts(faulty, capsys, tmp_path, tmp_path_factory):
    """The evaluation env's copy raises during the first evaluation (iteration 2): it is
    rebuilt and the evaluation replayed, so the run ends as one that never failed."""
    faulty.reset_faults({"kind": "raise", "step": 5, "eval": "only"})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *EVAL_FAULT_FLAGS,
                                     "--max_env_restarts", "1"])
    assert rc == 0, out + err
    assert [f["at"] for f in faulty.FIRED] == [5]
    warning = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "evaluation env" in warning[0] and "(1/1)" in warning[0], out
    run = run_dir(results, env="faulty")
    assert json.loads((run / "summary.json").read_text())["env_restarts"] == 1
    reference = reference_rows(tmp_path_factory, "--env", "faulty", *EVAL_FAULT_FLAGS)
    learned = [{k: v for k, v in r.items() if k != "env_restarts"} for r in read_rows(run)]
    assert_same_learning(learned, [{k: v for k, v in r.items() if k != "env_restarts"} for r in reference])


def test_a_failing_evaluation_env_without_restarts_saves_the_update_and_stops(faulty, saves, capsys, tmp_path):
    """Without restarts left the run stops with one line naming the evaluation env, and
    the iteration just trained is saved (it used to stop without saving, losing it)."""
    faulty.reset_faults({"kind": "raise", "step": 5, "eval": "only"})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *EVAL_FAULT_FLAGS,
                                     "--max_env_restarts", "0"])
    assert rc == 1 and "Traceback" not in out + err, out + err
    line = error_line(out)
    for needle in ("evaluation env", "injected simulator crash", "--max_env_restarts 0",
                   "checkpoint at 200 env steps saved"):
        assert needle in line, (needle, line)
    run = run_dir(results, env="faulty")
    assert load_checkpoint(run)["counters"]["iteration"] == 2
    faulty.reset_faults()
    rc, out, err = run_main(capsys, ["--resume", run])
    assert rc == 0, out + err
    assert steps_of(read_rows(run))[-1] == 400


def test_env_crash_beyond_max_env_restarts_stops(faulty, capsys, tmp_path):
    faulty.reset_faults({"kind": "raise", "step": 30, "env": 0}, {"kind": "raise", "step": 230, "env": 1})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *FAULT_FLAGS,
                                     "--max_env_restarts", "1"])
    assert rc == 1, out + err
    assert "restarting env 0 (1/1)" in out
    line = error_line(out)
    assert "env 1" in line and "seed 10008" in line and "no env restarts left" in line, line
    ckpt = load_checkpoint(run_dir(results, env="faulty"))
    # step() call 230 is in iteration 4 (the first iteration took 100 calls: 30 + its redo)
    assert ckpt["counters"]["iteration"] == 3 and ckpt["counters"]["env_restarts"] == 1


# -- 3. numerical faults ---------------------------------------------------------------------
# save_interval 3: the only checkpoint before the fault is written after update 3; the
# fault happens while collecting (or updating) update 4.
NUM_FLAGS = ["--num_env_steps", "600", "--save_interval", "3", "--eval_interval", "100"]


def assert_last_good_checkpoint_kept(saves: SaveRecorder, run: Path) -> None:
    assert [s["iteration"] for s in saves.saves] == [3], saves.saves  # nothing saved at the fault
    assert sha256(run / "checkpoints" / "last.pt") == saves.saves[-1]["sha256"]  # byte-identical
    ckpt = load_checkpoint(run)
    assert ckpt["counters"]["iteration"] == 3 and all_finite(ckpt["algorithm"])
    assert not list((run / "checkpoints").glob(".*tmp*"))


@pytest.mark.parametrize("kind, quantity", [("nan_obs", "observation of agent 1"), ("nan_reward", "reward"),
                                            ("nan_state", "global state")])
def test_nan_from_the_env_stops_and_keeps_the_last_checkpoint(faulty, saves, capsys, tmp_path, kind, quantity):
    faulty.reset_faults({"kind": kind, "step": 170, "env": 1, "agent": 1})  # iteration 4, t = 19
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, *NUM_FLAGS])
    assert rc == 1, out + err
    line = error_line(out)
    # step() call 170 of 2 copies = env step 340, while collecting for update 4
    for needle in (f"non-finite {quantity} ", "env 1", "env step 340", "update 4", "last good checkpoint"):
        assert needle in line, (needle, line)
    assert_last_good_checkpoint_kept(saves, run_dir(results, env="faulty"))


def poison(monkeypatch, algo_cls, at_update: int, how: str, hit: list) -> None:
    """Make the first actor update of ``at_update`` produce a NaN loss, gradient or parameter."""
    original = algo_cls.actor_step

    def actor_step(self, g, batch, M):
        if self.iteration != at_update or hit or how == "critic":
            return original(self, g, batch, M)
        hit.append(self.label(g))
        name, param = next(iter(self.actors[g].named_parameters()))
        hit.append(name)
        if how == "parameter":
            stats = original(self, g, batch, M)
            with torch.no_grad():
                param.view(-1)[0] = float("nan")
            return stats
        if how == "gradient":
            handle = param.register_hook(lambda grad: grad * float("nan"))
            try:
                return original(self, g, batch, M)
            finally:
                handle.remove()
        if how == "loss":
            import algorithms.happo as happo

            real_loss = happo.happo_loss
            monkeypatch.setattr(happo, "happo_loss", lambda *a, **k: (lambda lo, info: (lo * float("nan"), info))(
                *real_loss(*a, **k)))
            try:
                return original(self, g, batch, M)
            finally:
                monkeypatch.setattr(happo, "happo_loss", real_loss)
        raise ValueError(how)

    monkeypatch.setattr(algo_cls, "actor_step", actor_step)
    if how == "critic":  # poison on the critic's own (possibly parallel) thread, before its update
        original_critics = algo_cls.fit_critics

        def fit_critics(self, batches):
            if self.iteration == at_update:
                hit[:] = ["critic0", next(iter(self.critics[0].named_parameters()))[0]]
                with torch.no_grad():
                    next(iter(self.critics[0].parameters())).fill_(float("nan"))
            return original_critics(self, batches)

        monkeypatch.setattr(algo_cls, "fit_critics", fit_critics)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # base.py:398 float(loss)
@pytest.mark.parametrize("algo, how, message", [
    ("happo", "parameter", "non-finite parameter {param} of {who} after update 4"),
    ("happo", "gradient", "non-finite gradient of the actor loss for {who} at update 4"),
    ("happo", "loss", "non-finite actor loss (nan) for {who} at update 4"),
    ("happo", "critic", "non-finite critic loss (nan) for {who} at update 4"),
    ("hatrpo", "parameter", "non-finite parameter {param} of {who} after update 4"),
    ("hatrpo", "gradient", "non-finite HATRPO gradient for {who} at update 4"),
])
def test_nan_in_an_update_stops_and_keeps_the_last_checkpoint(monkeypatch, saves, capsys, tmp_path, algo, how,
                                                             message):
    import algorithms.happo
    import algorithms.hatrpo

    cls = {"happo": algorithms.happo.HAPPO, "hatrpo": algorithms.hatrpo.HATRPO}[algo]
    hit: list[str] = []
    poison(monkeypatch, cls, 4, how, hit)
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--algo", algo, "--results_dir", results, *NUM_FLAGS])
    assert rc == 1, out + err
    line = error_line(out)
    assert message.format(who=hit[0], param=hit[1]) in line, line
    assert "last good checkpoint" in line
    assert_last_good_checkpoint_kept(saves, run_dir(results, algo))


# -- 4. resource faults ----------------------------------------------------------------------
def test_disk_full_while_checkpointing(monkeypatch, saves, capsys, tmp_path):
    """ENOSPC half-way through the second checkpoint's write."""
    writes = []

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def write(self, data):
            self.fh.write(data[: len(data) // 3])
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_open(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        if ".last.pt.tmp-" in str(path):
            writes.append(path)
            if len(writes) == 2:
                return Full(fh)
        return fh

    monkeypatch.setattr(utils.checkpoint, "open", full_disk_open, raising=False)
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--results_dir", results, "--num_env_steps", "600",
                                     "--save_interval", "2", "--eval_interval", "100"])
    assert rc == 1, out + err
    line = error_line(out)
    assert "no space left on device" in line and "last.pt" in line, line
    assert "Traceback" not in out + err
    run = run_dir(results)
    assert len(writes) == 2 and [s["iteration"] for s in saves.saves] == [2]
    assert sha256(run / "checkpoints" / "last.pt") == saves.saves[0]["sha256"]
    assert load_checkpoint(run)["counters"]["iteration"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no stray temp file


def test_results_dir_under_a_regular_file(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, out, err = run_main(capsys, [*TINY, "--results_dir", blocker / "results", "--num_env_steps", "100"])
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--results_dir" in err, err
    assert f"{blocker} is a file, not a directory" in err and "Traceback" not in err
    assert out == "", out  # nothing started: no banner, no run
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 0o500 does not stop root from writing")
def test_results_dir_without_write_permission(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, out, err = run_main(capsys, [*TINY, "--results_dir", locked / "results", "--num_env_steps", "100"])
    finally:
        locked.chmod(0o700)
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--results_dir" in err and "not writable" in err, err
    assert out == ""


# -- 5. determinism ----------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["happo", "hatrpo"])
def test_same_seed_same_metrics_other_seed_other_metrics_resume_exact(saves, capsys, tmp_path, algo):
    flags = ["--algo", algo, "--num_env_steps", "600", "--save_interval", "2", "--eval_interval", "100"]
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    for results, seed in ((first, 1), (again, 1), (other, 2)):
        rc, out, err = run_main(capsys, [*TINY, "--results_dir", results, "--seed", seed, *flags])
        assert rc == 0, out + err
    rows = read_rows(run_dir(first, algo))
    assert_no_gaps(rows, 600)
    assert_same_learning(read_rows(run_dir(again, algo)), rows)
    others = learning(read_rows(run_dir(other, algo, seed=2)))
    assert len(others) == len(rows)
    for a, b in zip(others, learning(rows)):  # every row differs in what was learned
        assert {k: v for k, v in a.items() if k not in ("env_steps", "iteration")} != \
            {k: v for k, v in b.items() if k not in ("env_steps", "iteration")}

    # resume the first run from its checkpoint after update 2 (a copy taken right after the
    # save), as if killed while appending the next row to metrics.csv (a partial last line)
    mid = saves.snapshot(2)
    with open(mid / "metrics.csv", "a") as fh:
        fh.write("300,3,0.5,123.4,-1")
    rc, out, err = run_main(capsys, ["--resume", mid])
    assert rc == 0, out + err
    resumed = read_rows(mid)
    assert_no_gaps(resumed, 600)
    assert_same_learning(resumed, rows)  # the rows kept and the rows replayed



def test_smax_resume_from_a_mid_run_checkpoint_is_exact(saves, capsys, tmp_path):
    pytest.importorskip("jaxmarl")
    flags = ["--env", "smax", "--map_name", "3m", "--n_rollout_threads", "4", "--episode_length", "20",
             "--hidden_sizes", "16", "--ppo_epoch", "2", "--critic_epoch", "2", "--log_interval", "1",
             "--device", "cpu", "--torch_threads", "1", "--no-progress", "--no-tensorboard", "--no-use_eval",
             "--num_env_steps", "320", "--save_interval", "2"]
    rc, out, err = run_main(capsys, [*flags, "--results_dir", tmp_path / "results"])
    assert rc == 0, out + err
    rows = read_rows(run_dir(tmp_path / "results", env="smax", task="3m"))
    assert steps_of(rows) == [80, 160, 240, 320]
    mid = saves.snapshot(2)
    rc, out, err = run_main(capsys, ["--resume", mid])
    assert rc == 0, out + err
    assert_same_learning(read_rows(mid), rows)



# -- 6. the chaos experiment's checks (train/chaos.py; the full experiment: scripts/chaos.sh) ----
def test_chaos_comparison_catches_gaps_duplicates_and_divergence():
    from train.chaos import compare, expected_env_steps

    cfg = {"algo": "happo", "n_rollout_threads": 2, "episode_length": 50, "num_env_steps": 950,
           "log_interval": 3, "use_eval": True, "eval_interval": 4}
    assert expected_env_steps(cfg) == [300, 400, 600, 800, 900, 1000]
    # an off-policy iteration is --train_interval vector steps (--episode_length is not read)
    assert expected_env_steps({**cfg, "algo": "hatd3", "train_interval": 25}) == [150, 200, 300, 400, 450, 600,
                                                                                  750, 800, 900, 950]
    ref = [{"env_steps": str(s), "wall_seconds": "1", "sps": "5", "time/env_s": "2", "rss_mb": "700",
            "torch_threads": "2", "loss": str(s / 7)} for s in expected_env_steps(cfg)]
    # A resumed run differs in every column about the machine (utils.logger.MACHINE_COLUMNS).
    same = [{**r, "wall_seconds": "9", "sps": "6", "time/env_s": "0.1", "rss_mb": "731", "torch_threads": "1"}
            for r in ref]
    good = compare(same, ref, cfg)
    assert good["no_gaps"] and good["env_steps_strictly_increasing"] and good["final_metrics_equal"]
    assert good["all_rows_equal"] and good["rows"] == good["rows_uninterrupted"] == 6
    gap = compare(same[:2] + same[3:], ref, cfg)
    assert not gap["no_gaps"] and gap["env_steps_strictly_increasing"] and not gap["all_rows_equal"]
    dup = compare(same[:3] + same[2:], ref, cfg)
    assert not dup["no_gaps"] and not dup["env_steps_strictly_increasing"]
    diverged = compare(same[:-1] + [{**same[-1], "loss": "0"}], ref, cfg)
    assert not diverged["final_metrics_equal"] and diverged["final_differing_columns"] == ["loss"]
    assert diverged["first_differing_env_steps"] == 1000


# the last: 30 iterations with a checkpoint every 25 leave no room for 3 kills
@pytest.mark.parametrize("argv", [["--kills", "-1"], ["--resume", "x"], ["--seed", "1,2"], ["--lr", "abc"],
                                  ["--num_env_steps", "3000", "--n_rollout_threads", "2", "--episode_length", "50",
                                   "--save_interval", "25", "--kills", "3"]])
def test_chaos_bad_flags_exit_2_before_running_anything(capsys, tmp_path, argv):
    from train.chaos import main as chaos_main

    rc = chaos_main([*argv, "--chaos_dir", str(tmp_path / "chaos")])
    out, err = capsys.readouterr()
    if "--save_interval" in argv:
        assert "--kills 3 needs more than 3 checkpoints" in err
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "chaos").exists()


# -- regressions: library bugs these probes found (fixed) -------------------------------------------
def test_restart_does_not_count_episodes_of_the_discarded_rollout_twice(faulty, capsys, tmp_path):
    """HalfCheetah episodes last 1000 steps; with T = 30 the first ones end at t = 9 of
    iteration 34 (step() call 1000). Copy 1 crashes at call 1010 of that iteration, so the
    rollout is redone after episodes were already recorded from the discarded part."""
    faulty.reset_faults({"kind": "raise", "step": 1010, "env": 1})
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--env", "faulty", "--results_dir", results, "--episode_length", "30",
                                     "--num_env_steps", "2040", "--save_interval", "34", "--no-use_eval",
                                     "--max_env_restarts", "1"])
    assert rc == 0, out + err
    assert "restarting env 1 (1/1)" in out
    episodes = load_checkpoint(run_dir(results, env="faulty"))["recent_episodes"]
    keys = [(e["env"], e["return"], e["length"]) for e in episodes]
    assert len(keys) == len(set(keys)), f"an episode is counted twice: {episodes}"
    # only env 0's episode survives: env 1 was rebuilt before its episode could end
    assert [e["env"] for e in episodes] == [0], episodes


class _DiskFull:
    """``utils.checkpoint.open`` that fails atomic writes of files named ``name`` with ENOSPC."""

    def __init__(self, name: str):
        self.name, self.hits = name, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        if f".{self.name}.tmp-" in str(path):
            self.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)


@pytest.mark.parametrize("when", ["new run writes config.yaml", "resume rewrites metrics.csv"])
def test_disk_full_at_startup_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path, when):
    results = tmp_path / "results"
    flags = [*TINY, "--results_dir", results, "--num_env_steps", "200", "--save_interval", "1", "--no-use_eval"]
    if when.startswith("resume"):
        assert main([str(f) for f in flags]) == 0
        monkeypatch.setattr(utils.checkpoint, "open", _DiskFull("metrics.csv"), raising=False)
        argv = ["--resume", run_dir(results), "--num_env_steps", "300"]
    else:
        monkeypatch.setattr(utils.checkpoint, "open", _DiskFull("config.yaml"), raising=False)
        argv = flags
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except Exception as exc:  # what a real process would show as a traceback
        pytest.fail(f"{type(exc).__name__} escaped train.train.main (a traceback, not one line): {exc}")
    out, err = capsys.readouterr()
    assert rc == 1
    assert "no space left on device" in error_line(out + err)


def die_at_the_first_checkpoint(monkeypatch, flags: list[str]) -> None:
    """Run ``main(flags)`` in-process and let it 'die' (an exception no handler catches) when
    it would write its first checkpoint, as a killed process would."""
    class Died(BaseException):
        pass

    def die(run, payload):
        raise Died()

    monkeypatch.setattr(runners.runner, "save_checkpoint", die)
    with pytest.raises(Died):
        main(flags)
    monkeypatch.undo()


def test_death_before_the_first_checkpoint_can_be_recovered(monkeypatch, capsys, tmp_path):
    """A process killed before its first checkpoint leaves config.yaml and metrics.csv rows but
    no checkpoint. Starting again (or --resume, as the refusal message suggests) should work."""
    results = tmp_path / "results"
    flags = [str(f) for f in [*TINY, "--results_dir", results, "--num_env_steps", "300", "--save_interval", "2",
                              "--no-use_eval"]]
    die_at_the_first_checkpoint(monkeypatch, flags)
    run = run_dir(results)
    assert len(read_rows(run)) == 2 and not (run / "checkpoints" / "last.pt").exists()
    rc_fresh, out, err_fresh = run_main(capsys, flags)
    rc_resume, out, err_resume = (None, "", "") if rc_fresh == 0 else run_main(capsys, ["--resume", run])
    assert rc_fresh == 0 or rc_resume == 0, f"fresh start: {err_fresh.strip()} | --resume: {err_resume.strip()}"


def test_resume_of_a_run_whose_checkpoint_was_removed_refuses_and_keeps_its_metrics(capsys, tmp_path):
    """A run without checkpoints/last.pt is started over only when it may have died before its
    first checkpoint: one whose metrics.csv passed --save_interval (or that has a summary.json)
    did save one, and starting over would throw its metrics away."""
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*TINY, "--results_dir", results, "--num_env_steps", "400",
                                     "--save_interval", "2", "--no-use_eval"])
    assert rc == 0, out + err
    run = run_dir(results)
    before = sha256(run / "metrics.csv")
    (run / "checkpoints" / "last.pt").unlink()
    for remove_summary in (False, True):
        if remove_summary:
            (run / "summary.json").unlink()
        rc, out, err = run_main(capsys, ["--resume", run, "--num_env_steps", "800"])
        assert rc == 2, out + err
        assert len(err.strip().splitlines()) == 1 and "checkpoints/last.pt is missing" in err, err
        assert ("summary.json" if not remove_summary else "metrics.csv reaches iteration 4") in err, err
        assert sha256(run / "metrics.csv") == before


def test_a_summary_of_an_earlier_session_is_not_taken_for_the_runs_end(capsys, tmp_path, monkeypatch):
    """A run finished at 200 steps, resumed to 400, and killed after its last checkpoint but
    before writing summary.json: the old summary (200 steps) must not make --resume say
    'nothing to do'. It is removed when the resumed session starts, and the next --resume
    writes the summary of 400 steps."""
    results = tmp_path / "results"
    flags = [*TINY, "--results_dir", results, "--save_interval", "1", "--no-use_eval"]
    rc, out, err = run_main(capsys, [*flags, "--num_env_steps", "200"])
    assert rc == 0, out + err
    run = run_dir(results)
    assert json.loads((run / "summary.json").read_text())["env_steps"] == 200

    class Died(Exception):
        pass

    def die(self):
        raise Died  # as a kill -9 right after the final checkpoint
    monkeypatch.setattr(runners.runner.Runner, "write_summary", die)
    with pytest.raises(Died):
        main([str(f) for f in ["--resume", run, "--num_env_steps", "400"]])
    monkeypatch.undo()
    assert load_checkpoint(run)["counters"]["env_steps"] == 400
    assert not (run / "summary.json").exists()  # the 200-step summary went when training resumed

    (run / "summary.json").write_text(json.dumps({"env_steps": 200}))  # as left by older code
    rc, out, err = run_main(capsys, ["--resume", run, "--num_env_steps", "400"])
    assert rc == 0 and "nothing to do" not in out, out + err
    assert json.loads((run / "summary.json").read_text())["env_steps"] == 400
    rc, out, err = run_main(capsys, ["--resume", run, "--num_env_steps", "400"])
    assert rc == 0 and "nothing to do" in out, out + err


def test_starting_over_without_a_checkpoint_drops_the_old_tensorboard_events(monkeypatch, capsys, tmp_path):
    """--resume of a run killed before its first checkpoint starts it again from step 0:
    metrics.csv is rebuilt, and tb/ must not keep the discarded session's scalars."""
    results = tmp_path / "results"
    die_at_the_first_checkpoint(monkeypatch, [str(f) for f in [
        *TINY, "--tensorboard", "--results_dir", results, "--num_env_steps", "200", "--save_interval", "2",
        "--no-use_eval"]])
    tb = run_dir(results) / "tb"
    (old,) = tb.glob("events.out.tfevents.*")
    old.rename(tb / "events.out.tfevents.1000000000.old-session")  # as if written long ago
    rc, out, err = run_main(capsys, ["--resume", run_dir(results)])
    assert rc == 0, out + err
    events = sorted(p.name for p in tb.iterdir())
    assert len(events) == 1 and "old-session" not in events[0], events


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable", "holds runs"])
def test_chaos_bad_chaos_dir_exits_2_before_running_anything(capsys, tmp_path, case):
    from train.chaos import main as chaos_main

    blocker = tmp_path / "a-file"
    blocker.write_text("keep\n")
    earlier = tmp_path / "earlier"  # a finished experiment's directory, used again
    earlier_csv = run_dir(earlier / "uninterrupted") / "metrics.csv"
    earlier_csv.parent.mkdir(parents=True)
    earlier_csv.write_text("env_steps\n100\n")
    chaos_dir, needle = {"a file": (blocker, "is a file"), "under a file": (blocker / "sub", "is a file"),
                         "not writable": (Path("/proc/chaos"), "not writable"),
                         "holds runs": (earlier, "choose an empty directory")}[case]
    rc = chaos_main(["--num_env_steps", "400", "--n_rollout_threads", "2", "--episode_length", "50",
                     "--hidden_sizes", "16,16", "--chaos_dir", str(chaos_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --chaos_dir ") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert blocker.read_text() == "keep\n" and earlier_csv.read_text() == "env_steps\n100\n"
    assert sorted(p.name for p in earlier.iterdir()) == ["uninterrupted"]
