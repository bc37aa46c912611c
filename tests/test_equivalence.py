"""Fast paths compute the same thing as the plain ones: batched multi-agent inference
equals one forward per agent; env worker processes equal in-process stepping."""
import dataclasses
import threading

import numpy as np
import pytest
import torch

from algorithms.registry import make_algorithm
from envs.base import AgentSpec, EnvSpec
from train.config import Config


@pytest.mark.parametrize("kind,dim", [("continuous", 3), ("discrete", 6)])
def test_stacked_actors_match_per_agent_forward(kind, dim):
    torch.manual_seed(0)
    spec = EnvSpec("test", tuple(AgentSpec(11, kind, dim) for _ in range(3)), 17, 100)
    algo = make_algorithm(Config(hidden_sizes=[32, 32]), spec, torch.device("cpu"))
    assert algo.stackable
    obs = [torch.randn(5, 11) for _ in range(3)]
    avail = None
    if kind == "discrete":
        avail = [torch.rand(5, dim) > 0.5 for _ in range(3)]
        for a in avail:
            a[:, 0] = True
    greedy, greedy_lp, _ = algo.act(obs, avail, None, None, deterministic=True)
    algo.stackable = False
    loop, loop_lp, _ = algo.act(obs, avail, None, None, deterministic=True)
    for x, y in zip(greedy, loop):
        assert torch.allclose(x.float(), y.float(), atol=1e-5)
    assert torch.allclose(greedy_lp, loop_lp, atol=1e-5)
    algo.stackable = True
    sampled, sampled_lp, _ = algo.act(obs, avail, None, None)
    for i in range(3):  # stochastic samples carry the log-prob the training path computes
        lp, _, _ = algo.actors[i].evaluate(obs[i][None], sampled[i][None],
                                           avail=None if avail is None else avail[i][None])
        assert torch.allclose(lp[0], sampled_lp[:, i], atol=1e-5)
        if avail is not None:
            assert avail[i].gather(1, sampled[i][:, None]).all()


def test_stacked_actors_rebuilt_after_update():
    spec = EnvSpec("test", tuple(AgentSpec(4, "continuous", 2) for _ in range(2)), 8, 10)
    algo = make_algorithm(Config(hidden_sizes=[8]), spec, torch.device("cpu"))
    obs = [torch.randn(3, 4) for _ in range(2)]
    before, _, _ = algo.act(obs, None, None, None, deterministic=True)
    with torch.no_grad():
        algo.actors[1].head.mean.bias.add_(1.0)
    algo._stacked = None  # what train() and load_state_dict() do after changing parameters
    after, _, _ = algo.act(obs, None, None, None, deterministic=True)
    assert torch.allclose(after[0], before[0]) and torch.allclose(after[1], before[1] + 1.0, atol=1e-6)


@pytest.mark.slow
def test_worker_processes_match_in_process_envs():
    from envs.registry import make_vec_env

    config = Config(n_rollout_threads=4, n_env_workers=2)
    workers = make_vec_env(config, 4, seed=3)
    local = make_vec_env(dataclasses.replace(config, n_env_workers=1), 4, seed=3)
    try:
        a, b = workers.reset(3), local.reset(3)
        assert all(np.array_equal(x, y) for x, y in zip(a.obs, b.obs))
        rng = np.random.default_rng(0)
        actions = [[rng.uniform(-1, 1, (4, 3)).astype(np.float32) for _ in range(2)] for _ in range(30)]
        states = []
        for t in range(30):
            if t == 10:
                snapshot = workers.get_state()
            a, b = workers.step(actions[t]), local.step(actions[t])
            assert np.array_equal(a.state, b.state) and np.array_equal(a.reward, b.reward)
            assert all(np.array_equal(x, y) for x, y in zip(a.obs, b.obs))
            states.append(a.state.copy())
        workers.set_state(snapshot)  # restoring replays the same trajectory exactly
        for t in range(10, 30):
            assert np.array_equal(workers.step(actions[t]).state, states[t])
    finally:
        workers.close()
        local.close()


@pytest.mark.slow
def test_dead_worker_is_reported_and_replaced():
    import os
    import signal
    import time

    from envs.base import EnvError
    from envs.registry import make_vec_env

    env = make_vec_env(Config(n_rollout_threads=4, n_env_workers=2), 4, seed=1)
    try:
        env.reset(1)
        snapshot = env.get_state()
        os.kill(env._procs[1].pid, signal.SIGKILL)
        time.sleep(0.3)
        actions = [np.zeros((4, 3), np.float32)] * 2
        with pytest.raises(EnvError, match="worker 1 .*died") as info:
            env.step(actions)
        assert info.value.env_index == 2
        env.set_state(snapshot)  # replaces the dead worker
        assert np.isfinite(env.step(actions).state).all()
        # reset too: envs without snapshots (SMAC) restore a failed iteration by re-seeding
        os.kill(env._procs[0].pid, signal.SIGKILL)
        env._procs[0].join(10)
        step = env.reset(5)
        assert env._procs[0].is_alive() and np.isfinite(step.state).all()
        assert np.isfinite(env.step(actions).state).all()
    finally:
        env.close()


@pytest.mark.slow
def test_hung_worker_is_killed_after_the_timeout_and_replaced():
    """A worker that is alive but never answers (here: stopped with SIGSTOP) would block the
    run forever; after --env_worker_timeout it is killed and reported like a dead one."""
    import os
    import signal
    import time

    from envs.base import EnvError
    from envs.registry import make_vec_env

    env = make_vec_env(Config(n_rollout_threads=4, n_env_workers=2, env_worker_timeout=2.0), 4, seed=1)
    try:
        env.reset(1)
        hung = env._procs[1]
        os.kill(hung.pid, signal.SIGSTOP)
        actions = [np.zeros((4, 3), np.float32)] * 2
        start = time.monotonic()
        with pytest.raises(EnvError, match=r"worker 1 .*did not answer within 2 s \(--env_worker_timeout\)") as info:
            env.step(actions)
        assert 2.0 <= time.monotonic() - start < 15.0
        assert info.value.env_index == 2 and not hung.is_alive()
        env.restart(2)  # the runner's path for a failed copy: a fresh worker
        assert env._procs[1] is not hung and np.isfinite(env.step(actions).state).all()
    finally:
        env.close()


def _parent_of_a_sleeper(pid_file: str) -> None:
    """Stands in for a worker whose simulator runs in a process of its own."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(pid_file, "w") as fh:
        fh.write(str(child.pid))
    time.sleep(60)


@pytest.mark.slow
def test_a_killed_worker_takes_its_own_processes_with_it(tmp_path):
    import multiprocessing as mp
    import time

    import psutil

    from envs.workers import _kill_with_children

    pid_file = tmp_path / "pid"
    proc = mp.get_context("spawn").Process(target=_parent_of_a_sleeper, args=(str(pid_file),))
    proc.start()
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = psutil.Process(int(pid_file.read_text()))
    _kill_with_children(proc)
    assert not proc.is_alive()
    try:
        grandchild.wait(timeout=5)
    except psutil.TimeoutExpired:  # not reaped yet (its parent is gone): dead all the same
        assert grandchild.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_close_kills_a_hung_worker_with_its_own_processes(monkeypatch):
    """A worker that does not answer "close" is killed together with the processes it
    started (a StarCraft II game would otherwise outlive the run)."""
    import os
    import signal

    from envs import workers
    from envs.registry import make_vec_env

    killed = []
    real = workers._kill_with_children
    monkeypatch.setattr(workers, "_kill_with_children", lambda proc: (killed.append(proc), real(proc)))
    env = make_vec_env(Config(n_rollout_threads=4, n_env_workers=2), 4, seed=1)
    env.reset(1)
    hung = env._procs[1]
    os.kill(hung.pid, signal.SIGSTOP)
    env.close()
    assert killed == [hung] and not hung.is_alive() and not env._procs[0].is_alive()


def test_metrics_row_summarises_every_update_of_its_window(tmp_path):
    """A row logged every 2 updates equals the per-update rows reduced: means for most
    diagnostics, the extreme for *_max / *_min (HATRPO's kl_max bounds every accepted step)."""
    import csv

    from train.train import main

    tiny = ["--algo", "hatrpo", "--n_rollout_threads", "2", "--episode_length", "50", "--hidden_sizes", "16",
            "--critic_epoch", "1", "--num_env_steps", "400", "--no-use_eval", "--no-tensorboard", "--no-progress"]
    rows = {}
    for interval in ("1", "2"):
        assert main([*tiny, "--log_interval", interval, "--results_dir", str(tmp_path / interval)]) == 0
        path = tmp_path / interval / "mamujoco" / "HalfCheetah-2x3" / "hatrpo" / "default" / "seed-1" / "metrics.csv"
        rows[interval] = list(csv.DictReader(open(path)))
    every, pairs = rows["1"], rows["2"]
    assert [r["env_steps"] for r in pairs] == ["200", "400"]
    for k, row in enumerate(pairs):
        window = every[2 * k: 2 * k + 2]
        for key in ("agent0/kl_max", "agent1/M_max"):
            assert float(row[key]) == pytest.approx(max(float(r[key]) for r in window), rel=1e-5)
        assert float(row["agent1/M_min"]) == pytest.approx(min(float(r["agent1/M_min"]) for r in window), rel=1e-5)
        for key in ("agent0/kl", "agent0/accepted", "critic/value_loss"):
            assert float(row[key]) == pytest.approx(np.mean([float(r[key]) for r in window]), rel=1e-5, abs=1e-9)
        assert float(row["agent0/kl_max"]) < 0.01


@pytest.mark.parametrize("algo_name", ["happo", "ippo"])
def test_batched_values_and_deferred_critic_match_the_step_by_step_path(algo_name):
    """``fill_values`` (one pass after the rollout) writes what per-step ``values`` calls
    would; a critic update deferred past ``train`` (overlapping the next rollout) ends
    with the same parameters and stats as one run inside ``train``."""
    import copy

    from tests.test_algorithm_math import fill_buffer

    spec = EnvSpec("test", (AgentSpec(5, "continuous", 2), AgentSpec(4, "continuous", 3)), 9, 50)
    config = Config(algo=algo_name, hidden_sizes=[16, 16], ppo_epoch=2, critic_epoch=3, critic_num_mini_batch=2,
                    share_param=False)
    torch.manual_seed(0)
    algo = make_algorithm(config, spec, torch.device("cpu"))
    T, E = 6, 4
    buf = fill_buffer(algo, T, E, seed=7)
    g = torch.Generator().manual_seed(8)
    buf.final_state.copy_(torch.randn(buf.final_state.shape, generator=g))
    for o in buf.final_obs:
        o.copy_(torch.randn(o.shape, generator=g))
    last_state, last_obs = torch.randn(E, 9, generator=g), [torch.randn(E, d, generator=g) for d in (5, 4)]
    assert buf.truncated.any()

    stepwise = copy.deepcopy(buf)
    for t in range(T):
        stepwise.values[t] = algo.values(buf.state[t], [o[t] for o in buf.obs], None, None)[0]
        rows = buf.truncated[t]
        if rows.any():
            stepwise.final_values[t, rows] = algo.values(buf.final_state[t, rows],
                                                         [o[t, rows] for o in buf.final_obs], None, None)[0]
    stepwise.values[T] = algo.values(last_state, last_obs, None, None)[0]
    algo.fill_values(buf, last_state, last_obs)
    assert torch.allclose(buf.values, stepwise.values, atol=1e-6)
    truncated = buf.truncated
    assert torch.allclose(buf.final_values[truncated], stepwise.final_values[truncated], atol=1e-6)

    torch.manual_seed(0)
    twin = make_algorithm(config, spec, torch.device("cpu"))  # same initial parameters
    deferred_stats = algo.train(buf, defer_critic=True)  # first update: reports at once
    now_stats = twin.train(copy.deepcopy(buf))
    assert deferred_stats == now_stats
    same_data = copy.deepcopy(buf)
    gate = threading.Event()
    algo._critic_pool.submit(gate.wait)  # hold the critic thread until the buffer is overwritten
    algo.train(buf, defer_critic=True)
    assert algo._critic_job is not None and not algo._critic_job.done()
    for x in (buf.state, buf.values, buf.rewards):  # the next rollout refills the buffer...
        x.fill_(float("nan"))
    gate.set()
    algo.wait_for_critics()  # ...but the critic trained on its own copy
    twin.train(same_data)
    # (equal up to float rounding: the critic's thread runs with one intra-op thread)
    for a, b in zip(algo.critics.parameters(), twin.critics.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert algo._critic_stats == pytest.approx(twin._critic_stats, rel=1e-4)


def test_evaluations_draw_disjoint_seeds_and_repeat_exactly():
    """Each evaluation's copies (base + k) share no seed with another evaluation of the run,
    with the training copies, or with another seed's evaluations; the same (seed, iteration)
    always gives the same base, so --eval_only repeats the run's own evaluation."""
    from runners.evaluate import env_seed, eval_seed

    copies, iterations = 64, range(0, 1001, 25)
    used: dict[int, tuple[int, int]] = {}
    for seed in (-1, 0, 1, 2, 3):
        config = Config(seed=seed)
        training = {env_seed(config) + k for k in range(256)}
        for it in iterations:
            base = eval_seed(config, it)
            assert base == eval_seed(Config(seed=seed), it)
            assert 0 <= base and base + copies < 2**32
            for k in range(copies):
                assert base + k not in training
                assert base + k not in used, (seed, it, used.get(base + k))
                used[base + k] = (seed, it)


def test_runner_that_fails_to_build_closes_its_env_workers(tmp_path, monkeypatch):
    """A ConfigError raised after the envs exist (here: --share_param over agents with
    different observation sizes) must not leave env worker processes running."""
    import runners.base
    import runners.runner as runner_module
    from train.config import ConfigError

    made = []

    def recording_make_vec_env(*args, **kwargs):
        made.append(runner_module_make(*args, **kwargs))
        return made[-1]

    runner_module_make = runners.base.make_vec_env
    monkeypatch.setattr(runners.base, "make_vec_env", recording_make_vec_env)
    config = Config(agent_conf="6x1", agent_obsk=1, share_param=True, n_rollout_threads=2, n_env_workers=2,
                    hidden_sizes=[8]).validate()
    with pytest.raises(ConfigError, match="share_param"):
        runner_module.Runner(config, tmp_path, torch.device("cpu"))
    (env,) = made
    assert env._procs and not any(p.is_alive() for p in env._procs)


@pytest.mark.slow
def test_a_worker_whose_env_raised_is_replaced_by_the_restore_and_restart(monkeypatch):
    """The runner's --max_env_restarts path with env workers: restore the iteration's
    snapshot, then restart the failed copy. A worker exits after reporting its env's error;
    set_state used to see it still alive (shutting down), skip replacing it, and fail with
    "died (exit code None)"."""
    import functools
    import json

    import tests.faulty_env as faulty_env
    from envs.base import EnvError
    from envs.workers import WorkerVecEnv

    # Each worker holds 2 copies; its local copy 1 crashes on the worker's 2nd step.
    monkeypatch.setenv("FAULTY_ENV_FAULTS", json.dumps([{"kind": "raise", "step": 2, "env": 1}]))
    config = Config(n_rollout_threads=4, n_env_workers=2)
    env = WorkerVecEnv(functools.partial(faulty_env.make_vec_env, config), 4, 2, seed=1, timeout=60)
    actions = [np.zeros((4, 3), np.float32)] * 2
    try:
        env.reset(1)
        point = env.get_state()
        env.step(actions)
        with pytest.raises(EnvError, match="injected simulator crash") as failure:
            env.step(actions)
        assert failure.value.env_index == 1
        env.set_state(point)
        env.restart(failure.value.env_index)
        assert np.isfinite(env.step(actions).state).all()  # the new workers' first step
    finally:
        env.close()
