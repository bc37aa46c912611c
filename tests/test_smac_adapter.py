"""SMAC adapter (envs/smac.py) without StarCraft II.

The game cannot be installed or run on the project's machines, so the adapter is tested
against ``FakeStarCraft2Env``, a small stand-in implementing the documented
``smac.env.StarCraft2Env`` methods (``reset``, ``step``, ``get_obs``, ``get_state``,
``get_avail_actions``, ``get_env_info``, ``close``) with scripted episodes. It is injected
through the adapter's ``env_factory`` constructor hook; the missing-StarCraft error is
checked with ``smac`` made unimportable (it is not installed here anyway).
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from envs import registry
from envs import smac as smac_env
from envs.base import EnvError
from envs.smac import SMACVecEnv
from train.config import Config, ConfigError, load_config

N_AGENTS, N_ACTIONS, OBS_DIM, STATE_DIM, LIMIT = 3, 7, 4, 6, 5


class FakeStarCraft2Env:
    """Scripted stand-in for ``smac.env.StarCraft2Env`` (3 agents, 7 actions, limit 5).

    Actions as in SMAC: 0 no-op (dead agents only), 1 stop, 2-5 move, 6 attack enemy 0.
    Episode ``n`` follows ``script[(seed + n) % len(script)]``:
      "win":     agent 2 dies at step 2, the battle is won at step 3 (reward +10)
      "timeout": the time limit (5 steps) is hit
      "lose":    every agent dies at step 4
      "crash":   the game dies at step 2: SMAC relaunches it and returns (0, True, {})
    obs of agent i = [episode, t, i, 1] (zeros when dead); state = [episode, t, alive, 0, 0, 0].
    """

    def __init__(self, map_name="3m", seed=None, continuing_episode=False,
                 script=("win", "timeout", "lose")):
        self.map_name, self.seed, self.continuing_episode = map_name, seed, continuing_episode
        self.script = script
        self.episode = -1
        self.t = 0
        self.alive = np.ones(N_AGENTS, bool)
        self.closed = False

    @property
    def kind(self) -> str:
        return self.script[(self.seed + self.episode) % len(self.script)]

    def get_env_info(self):
        return {"state_shape": STATE_DIM, "obs_shape": OBS_DIM, "n_actions": N_ACTIONS,
                "n_agents": N_AGENTS, "episode_limit": LIMIT}

    def reset(self):
        self.episode += 1
        self.t = 0
        self.alive[:] = True
        return self.get_obs(), self.get_state()

    def get_avail_agent_actions(self, i):
        if not self.alive[i]:
            return [1] + [0] * (N_ACTIONS - 1)
        return [0, 1, 1, 1, 1, 1, int(self.t >= 1)]  # enemy in range after one step

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(i) for i in range(N_AGENTS)]

    def get_obs(self):
        return [np.array([self.episode, self.t, i, 1], np.float32) * self.alive[i]
                for i in range(N_AGENTS)]

    def get_state(self):
        return np.array([self.episode, self.t, self.alive.sum(), 0, 0, 0], np.float32)

    def step(self, actions):
        for i, a in enumerate(actions):
            assert self.get_avail_agent_actions(i)[int(a)] == 1, \
                f"Agent {i} cannot perform action {a}"
        self.t += 1
        kind = self.kind
        if kind == "crash" and self.t == 2:
            return 0, True, {}
        reward, info, done = 1.0, {"battle_won": False}, False
        if kind == "win" and self.t >= 2:
            self.alive[2] = False
        if kind == "win" and self.t == 3:
            reward, done, info["battle_won"] = 11.0, True, True
        elif kind == "lose" and self.t == 4:
            self.alive[:] = False
            done = True
        elif self.t >= LIMIT:
            done = True
            if self.continuing_episode:
                info["episode_limit"] = True
        return reward, done, info

    def close(self):
        self.closed = True


def policy(step) -> list[np.ndarray]:
    """Highest-numbered available action of each agent (no-op for the dead): [E] int64."""
    return [(m * np.arange(N_ACTIONS)).argmax(axis=1).astype(np.int64)
            for m in step.avail_actions]


def make(n_envs=3, seed=0, **kwargs) -> SMACVecEnv:
    return SMACVecEnv("3m", n_envs=n_envs, seed=seed, env_factory=FakeStarCraft2Env, **kwargs)


def test_spec_and_reset():
    env = make()
    spec = env.spec
    assert spec.name == "smac/3m" and spec.n_agents == N_AGENTS and spec.discrete
    assert spec.state_dim == STATE_DIM and spec.episode_limit == LIMIT
    assert spec.episode_metrics == ("win_rate",)
    assert all(a.obs_dim == OBS_DIM and a.action_dim == N_ACTIONS for a in spec.agents)
    assert [e.seed for e in env._envs] == [0, 1, 2]
    assert all(e.continuing_episode for e in env._envs)  # so SMAC reports timeouts
    step = env.reset(seed=0)
    assert [o.shape for o in step.obs] == [(3, OBS_DIM)] * N_AGENTS
    assert step.obs[0].dtype == np.float32 and step.state.shape == (3, STATE_DIM)
    assert [m.shape for m in step.avail_actions] == [(3, N_ACTIONS)] * N_AGENTS
    assert step.avail_actions[0].dtype == bool and step.active.all()
    assert not step.terminated.any() and not step.truncated.any()


def test_win_timeout_loss_and_auto_reset():
    env = make(n_envs=3, seed=0)  # copy k starts with script[k]: win, timeout, lose
    step = env.reset()
    seen = {}
    for t in range(1, 6):
        step = env.step(policy(step))
        for c in step.completed:
            seen[c["env"]] = (t, c, bool(step.terminated[c["env"]]),
                              bool(step.truncated[c["env"]]))
        done = step.terminated | step.truncated
        for k in np.flatnonzero(done):
            # Auto-reset: obs/state are the new episode's first; final_* the last ones.
            assert step.state[k, 0] == 1 and step.state[k, 1] == 0
            assert step.final_state[k, 1] == t
            assert step.active[k].all()
    win, timeout, lose = seen[0], seen[1], seen[2]
    assert win[0] == 3 and win[1]["win_rate"] == 1.0 and win[2] and not win[3]
    assert win[1]["return"] == 13.0 and win[1]["length"] == 3
    assert timeout[0] == LIMIT and timeout[1]["win_rate"] == 0.0 and timeout[3] and not timeout[2]
    assert lose[0] == 4 and lose[1]["win_rate"] == 0.0 and lose[2] and not lose[3]
    # The next episodes run on: copy 0 (now "timeout") has been stepping since t=3.
    assert env._elapsed.tolist() == [2, 0, 1]


def test_dead_agents_inactive():
    env = make(n_envs=1, seed=0)  # "win": agent 2 dies at step 2
    step = env.reset()
    step = env.step(policy(step))
    assert step.active.all()
    step = env.step(policy(step))
    np.testing.assert_array_equal(step.active[0], [True, True, False])
    assert not step.obs[2][0].any()
    np.testing.assert_array_equal(step.avail_actions[2][0], [1, 0, 0, 0, 0, 0, 0])
    actions = policy(step)
    assert actions[2][0] == 0  # the no-op


def test_pymarl_convention_without_continuing_episode():
    env = make(n_envs=1, seed=1, continuing_episode=False)  # "timeout" first
    step = env.reset()
    for _ in range(LIMIT):
        step = env.step(policy(step))
    assert step.terminated[0] and not step.truncated[0]


def test_crash_is_truncated_and_not_reported():
    env = make(n_envs=2, seed=0, script=("crash", "win"))
    step = env.reset()
    step = env.step(policy(step))
    step = env.step(policy(step))
    assert step.truncated[0] and not step.terminated[0]
    assert [c["env"] for c in step.completed] == [] and env.game_restarts == 1
    assert step.state[0, 1] == 0  # copy 0 restarted


def test_unavailable_action_raises_env_error():
    env = make(n_envs=2)
    env.reset()
    bad = [np.array([1, 1]), np.array([1, 6]), np.array([1, 1])]  # attack not yet in range
    with pytest.raises(EnvError) as err:
        env.step(bad)
    assert err.value.env_index == 1 and "cannot perform" in str(err.value)


def test_get_state_is_none_and_set_state_restarts_episodes():
    env = make(n_envs=2)
    step = env.reset()
    for _ in range(2):
        step = env.step(policy(step))
    assert env.get_state() is None
    step = env.set_state(None)
    assert (step.state[:, 1] == 0).all() and env._elapsed.tolist() == [0, 0]


def test_reset_with_new_seed_rebuilds_and_restart():
    env = make(n_envs=2, seed=0)
    old = list(env._envs)
    env.reset(seed=10)
    assert [e.seed for e in env._envs] == [10, 11] and all(e.closed for e in old)
    env.restart(1)
    assert env._envs[1].seed == 10 + 7919 + 1


def test_evaluation_envs_keep_their_games_across_evaluations():
    """The runner passes a new seed before every evaluation; relaunching every evaluation
    game each time costs ~10 s per copy on StarCraft II, so evaluation envs keep theirs."""
    config = Config(env="smac", map_name="3m")
    env = registry.make_vec_env(config, n_envs=2, seed=3, evaluation=True, env_factory=FakeStarCraft2Env)
    games = list(env._envs)
    env.reset(seed=3)
    env.reset(seed=12345)
    assert env._envs == games and not any(e.closed for e in games)
    assert [e.episode for e in games] == [1, 1]  # each evaluation still starts new episodes
    env.close()


def test_registry_builds_with_factory_hook():
    config = Config(env="smac", map_name="3m")
    env = registry.make_vec_env(config, n_envs=2, seed=3, env_factory=FakeStarCraft2Env)
    assert isinstance(env, SMACVecEnv) and env.n_envs == 2
    assert registry.task_name({"env": "smac", "map_name": "3m"}) == "3m"
    env.close()
    assert all(e.closed for e in env._envs)


def _assert_install_hint(message: str) -> None:
    assert "\n" not in message
    assert "install_sc2.sh" in message and "--env smax" in message


def test_missing_smac_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "smac", None)  # import smac -> ImportError
    with pytest.raises(ConfigError) as err:
        smac_env.check_task({"map_name": "3m"})
    _assert_install_hint(str(err.value))
    with pytest.raises(ConfigError) as err:
        load_config(["--env", "smac", "--map_name", "3m"])
    _assert_install_hint(str(err.value))
    with pytest.raises(ConfigError):
        SMACVecEnv("3m", n_envs=1, seed=0)  # no factory: needs the real package


def test_missing_starcraft_game(monkeypatch, tmp_path):
    fake_smac = types.ModuleType("smac")
    fake_env = types.ModuleType("smac.env")
    fake_env.StarCraft2Env = FakeStarCraft2Env
    fake_smac.env = fake_env
    monkeypatch.setitem(sys.modules, "smac", fake_smac)
    monkeypatch.setitem(sys.modules, "smac.env", fake_env)
    monkeypatch.setenv("SC2PATH", str(tmp_path / "StarCraftII"))
    with pytest.raises(ConfigError) as err:
        smac_env.check_task({"map_name": "3m"})
    _assert_install_hint(str(err.value))
    assert "StarCraftII" in str(err.value)
    (tmp_path / "StarCraftII" / "Versions").mkdir(parents=True)
    smac_env.check_task({"map_name": "3m"})  # game found (map list not checkable here)


def test_resumed_run_seeds_new_games_from_its_iteration(monkeypatch, tmp_path):
    """SMAC has no snapshots, so a resumed run starts fresh games seeded env_seed + iteration;
    the iteration must be the checkpoint's (it was still 0 when the games were re-seeded, so
    a resume replayed the run's opening seeds)."""
    import torch

    import envs.smac as smac_module
    from runners.evaluate import env_seed
    from runners.runner import Runner

    monkeypatch.setattr(smac_module, "starcraft_env_class", lambda: FakeStarCraft2Env)
    config = Config(env="smac", map_name="3m", n_rollout_threads=2, episode_length=10, hidden_sizes=[8],
                    torch_threads=1, tensorboard=False).validate()
    first = Runner(config, tmp_path, torch.device("cpu"))
    first.iteration = 7
    checkpoint = {"config": config.to_dict(), "algorithm": first.algo.state_dict(), **first.resume_point()}
    first.env.close()
    first.logger.close()
    resumed = Runner(config, tmp_path, torch.device("cpu"), checkpoint=checkpoint)
    try:
        assert resumed.iteration == 7
        assert [e.seed for e in resumed.env._envs] == [env_seed(config) + 7, env_seed(config) + 8]
    finally:
        resumed.env.close()
        resumed.logger.close()


def test_install_sc2_fails_clearly_and_installs_into_the_project_venv(tmp_path):
    """install_sc2.sh cannot reach its downloads here, so it is run against sources that
    fail fast (a missing file URL, a missing pip source): a one-line error each, nothing
    left behind, and smac goes into the .venv the launch scripts use (not python3's)."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "SC2PATH")}
    dest = tmp_path / "games" / "StarCraftII"
    proc = subprocess.run(["bash", str(repo / "install_sc2.sh"), str(dest)], capture_output=True, text=True,
                          env={**env, "SC2_URL": "file:///nonexistent/SC2.4.10.zip"}, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "install_sc2.sh: could not download StarCraft II 4.10 (~4 GB) from file:///nonexistent/SC2.4.10.zip")
    assert list((tmp_path / "games").iterdir()) == []  # no partial install, no temp files
    # Game and maps present: only smac is left to install, into the project's .venv.
    (dest / "Versions").mkdir(parents=True)
    (dest / "Maps" / "SMAC_Maps").mkdir(parents=True)
    proc = subprocess.run(["bash", str(repo / "install_sc2.sh"), str(dest)], capture_output=True, text=True,
                          env={**env, "SMAC_PIP": str(tmp_path / "no-such-smac")}, timeout=300)
    assert proc.returncode == 1
    assert f"Installing oxwhirl's smac into {repo / '.venv'}" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == \
        f"install_sc2.sh: pip install {tmp_path / 'no-such-smac'} failed"
