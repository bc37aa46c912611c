"""Short real MaMuJoCo runs of the off-policy family through ``OffPolicyRunner``.

Every run is tiny (2 envs, 25 vector steps = 50 env steps per iteration, [16, 16] networks,
batches of 32, a 600-transition buffer that wraps within the run, one evaluation episode),
so it learns nothing but takes every path: warm-up, updates, evaluation, logging,
incremental replay checkpoints. Exact resume is checked against an uninterrupted run:
after a shorter run continued with a longer budget, after an interruption in the middle
of an iteration's collection (``on_signal`` called from inside, as a Ctrl-C would), and
after a checkpoint write that failed half-way (the previous checkpoint must still load).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("mujoco")

import runners.off_policy_runner as runner_module  # noqa: E402
from algorithms.registry import algorithm_class  # noqa: E402
from train.config import Config  # noqa: E402
from utils.checkpoint import CheckpointError, checkpoint_path, load_checkpoint  # noqa: E402
from utils.logger import varies_by_machine  # noqa: E402

pytestmark = pytest.mark.slow

E, INTERVAL = 2, 25
PER_ITERATION = E * INTERVAL  # 50 env steps
TINY = {"n_rollout_threads": E, "train_interval": INTERVAL, "hidden_sizes": [16, 16], "batch_size": 32,
        "warmup_steps": 200, "buffer_size": 600, "eval_episodes": 1, "n_eval_rollout_threads": 1,
        "eval_interval": 10, "log_interval": 2, "save_interval": 4, "device": "cpu", "torch_threads": 1,
        "progress": False, "tensorboard": False}
BUDGET = 1000  # 20 iterations; updates from iteration 5; the ring (300 slots) wraps at 600
SUMMARY_KEYS = {"algo", "env", "task", "seed", "env_steps", "iterations", "eval_env_steps", "eval_return_mean",
                "eval_return_std", "train_episode_return", "wall_seconds", "sps", "env_restarts"}


def make_config(algo: str, **overrides) -> Config:
    return dataclasses.replace(Config(), **{**algorithm_class(algo).defaults, "algo": algo, **TINY,
                                            "num_env_steps": BUDGET, **overrides})


def train(config: Config, run_dir: Path, checkpoint: dict | None = None, patch=None) -> int:
    torch.set_num_threads(1)
    runner = runner_module.OffPolicyRunner(config, run_dir, torch.device("cpu"), checkpoint)
    if patch is not None:
        patch(runner)
    return runner.run()


def resume(config: Config, run_dir: Path, **overrides) -> int:
    return train(dataclasses.replace(config, **overrides), run_dir, load_checkpoint(run_dir))


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def learning(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not varies_by_machine(k)} for r in rows]


def assert_same_learning(rows, reference) -> None:
    got, want = learning(rows), learning(reference)
    assert [r["env_steps"] for r in got] == [r["env_steps"] for r in want]
    for a, b in zip(got, want):
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert not diff, f"env_steps {a['env_steps']}: {diff}"


_REFERENCE: dict[str, list[dict[str, str]]] = {}


def reference_rows(tmp_path_factory, algo: str = "hatd3") -> list[dict[str, str]]:
    """metrics.csv of one uninterrupted run (memoised)."""
    if algo not in _REFERENCE:
        run_dir = tmp_path_factory.mktemp("reference")
        assert train(make_config(algo), run_dir) == 0
        _REFERENCE[algo] = read_rows(run_dir)
    return _REFERENCE[algo]


def check_run_files(run_dir: Path, algo: str, budget: int, n_agents: int) -> list[dict[str, str]]:
    for name in ("metrics.csv", "summary.json", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    rows = read_rows(run_dir)
    steps = [int(r["env_steps"]) for r in rows]
    assert steps == list(range(2 * PER_ITERATION, budget + 1, 2 * PER_ITERATION)), steps
    for column in ("env_steps", "wall_seconds", "sps", "train_episode_return", "eval_return", "critic_loss",
                   "q_mean", "updates", "replay_transitions"):
        assert column in rows[0], column
    # 25 updates per iteration from the one that completes the 200 warm-up steps (the 4th) on
    assert [int(r["updates"]) for r in rows if r["updates"]] == [25 * (s // PER_ITERATION - 3) for s in steps[1:]]
    assert all(math.isfinite(float(r["critic_loss"])) for r in rows[1:])
    per_agent = [f"agent{i}/actor_loss" for i in range(n_agents)] if algorithm_class(algo).sequential \
        else ["actor_loss"]
    assert all(all(r[key] != "" for key in per_agent) for r in rows[1:]), per_agent
    assert int(rows[-1]["replay_transitions"]) == 600  # wrapped: the ring is full
    assert math.isfinite(float(rows[-1]["eval_return"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["algo"] == algo and summary["env_steps"] == budget == summary["eval_env_steps"]
    assert summary["eval_return_mean"] == pytest.approx(float(rows[-1]["eval_return"]), rel=1e-5, abs=1e-5)
    checkpoint = load_checkpoint(run_dir)
    replay_dir = checkpoint_path(run_dir).parent / runner_module.REPLAY_DIR
    assert {p.name for p in replay_dir.iterdir()} == set(checkpoint["replay"]["chunks"].values())
    assert checkpoint["counters"]["env_steps"] == budget
    return rows


@pytest.mark.parametrize("algo", ["hatd3", "haddpg", "matd3", "maddpg"])
def test_every_method_runs_on_halfcheetah_2x3(tmp_path, algo):
    assert train(make_config(algo), tmp_path) == 0
    check_run_files(tmp_path, algo, BUDGET, n_agents=2)


def test_unequal_agents_with_terminations(tmp_path):
    # Hopper 3x1 with one hop of neighbours: observations [8, 9, 8]; random hops fall over early,
    # so episodes end by termination as well.
    config = make_config("hatd3", scenario="Hopper", agent_conf="3x1", agent_obsk=1)
    assert train(config, tmp_path) == 0
    rows = check_run_files(tmp_path, "hatd3", BUDGET, n_agents=3)
    assert float(rows[-1]["train_episode_length"]) < 1000


def test_a_shorter_run_continued_matches_the_uninterrupted_one(tmp_path, tmp_path_factory):
    config = make_config("hatd3", num_env_steps=500)  # iteration 10: a row, an evaluation and a save
    assert train(config, tmp_path) == 0
    assert resume(config, tmp_path, num_env_steps=BUDGET) == 0
    assert_same_learning(read_rows(tmp_path), reference_rows(tmp_path_factory))


def interrupt_at_env_step(call: int):
    """A patch that calls ``on_signal`` (as a Ctrl-C would) during the ``call``-th env step."""

    def patch(runner):
        step, count = runner.env.step, [0]

        def stepping(actions):
            count[0] += 1
            if count[0] == call:
                runner.on_signal(signal.SIGINT, None)
            return step(actions)

        runner.env.step = stepping

    return patch


def test_an_interruption_mid_collection_resumes_exactly(tmp_path, tmp_path_factory, capsys):
    config = make_config("hatd3")
    # The 10th step of iteration 14 (env steps 650..700): past the warm-up, with the ring wrapped.
    assert train(config, tmp_path, patch=interrupt_at_env_step(13 * INTERVAL + 10)) == 130
    assert "interrupted: checkpoint at 650 env steps" in capsys.readouterr().out
    assert load_checkpoint(tmp_path)["buffer_cursor"] == (25, 300)  # the iteration's start, not its middle
    assert resume(config, tmp_path) == 0
    assert_same_learning(read_rows(tmp_path), reference_rows(tmp_path_factory))


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint_to_resume(tmp_path, tmp_path_factory,
                                                                                monkeypatch, capsys):
    config = make_config("hatd3")
    real_save, calls = runner_module.save_checkpoint, []

    def failing_save(run_dir, payload):  # the third save dies after its replay chunks were written
        calls.append(payload["counters"]["env_steps"])
        if len(calls) == 3:
            raise CheckpointError("could not write last.pt: no space left on device; the previous version is intact")
        return real_save(run_dir, payload)

    monkeypatch.setattr(runner_module, "save_checkpoint", failing_save)
    assert train(config, tmp_path) == 1
    assert calls == [200, 400, 600]
    assert "error: could not write last.pt" in capsys.readouterr().out
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["counters"]["env_steps"] == 400
    replay_dir = checkpoint_path(tmp_path).parent / runner_module.REPLAY_DIR
    assert set(checkpoint["replay"]["chunks"].values()) < {p.name for p in replay_dir.iterdir()}  # orphans left
    monkeypatch.setattr(runner_module, "save_checkpoint", real_save)
    assert resume(config, tmp_path) == 0
    assert_same_learning(read_rows(tmp_path), reference_rows(tmp_path_factory))
    final = load_checkpoint(tmp_path)
    assert {p.name for p in replay_dir.iterdir()} == set(final["replay"]["chunks"].values())  # orphans gone
