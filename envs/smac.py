"""SMAC (StarCraft II, oxwhirl's ``smac`` package): a thin in-process adapter.

``n_envs`` ``smac.env.StarCraft2Env(map_name=..., seed=...)`` instances are stepped one
after the other in this process (each one drives its own StarCraft II game process).
Nothing here imports ``smac`` until an env is built, and ``check_task`` says, in one
line, how to install the game (``bash install_sc2.sh``) when it is missing.

How SMAC's API maps onto ``envs.base.EnvStep``:

* ``step(actions) -> (reward, terminated, info)``; ``info["battle_won"]`` becomes the
  ``win_rate`` episode metric (1.0 / 0.0).
* Time limit: SMAC reports ``info["episode_limit"] = True`` only when the env was built
  with ``continuing_episode=True``; otherwise a timeout looks like a real termination.
  This adapter therefore builds its envs with ``continuing_episode=True`` (the flag only
  changes that info key) and marks such episodes ``truncated`` (bootstrap), not
  ``terminated``. Pass ``continuing_episode=False`` to get pymarl's convention back.
* Dead agents: SMAC makes only the no-op (action 0) available to them and zeroes their
  observation; ``active`` is False for an agent whose only available action is 0.
* SMAC answers a crashed game with ``(0, True, {})`` after relaunching it: that episode
  is cut (``truncated``), left out of ``completed`` and counted in ``self.game_restarts``.
* Auto-reset: a finished copy is reset at once; ``final_obs`` / ``final_state`` hold the
  last observation of the finished episode.
* Resume: StarCraft II cannot snapshot a running game, so ``get_state()`` returns None
  and ``set_state()`` resets every copy: a resumed SMAC run restarts its episodes.
* Seeding: copy ``k`` gets ``seed + k`` (the game's random seed, used when it launches);
  SC2 itself is not bit-reproducible across machines. A new seed therefore means new
  games (``reset(seed)`` relaunches every copy). Evaluation envs (``evaluation=True``)
  keep their games instead: the runner asks for a new seed before every evaluation, and
  relaunching ``n_eval_rollout_threads`` games one after another each time would cost
  minutes per evaluation. A SMAC evaluation plays the running games' next episodes, so
  unlike MaMuJoCo and SMAX, ``--eval_only`` does not replay a run's own evaluations.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from envs.base import AgentSpec, EnvError, EnvSpec, EnvStep, StepBuffers, VecEnv
from utils.errors import ConfigError


def task_name(values: dict[str, Any]) -> str:
    return str(values["map_name"])


def sc2_path() -> Path:
    """Where StarCraft II is looked for: $SC2PATH, default ~/StarCraftII."""
    return Path(os.environ.get("SC2PATH") or "~/StarCraftII").expanduser()


def _install_hint(problem: str) -> str:
    return (f"SMAC needs StarCraft II and oxwhirl's smac package: {problem}; run "
            "`bash install_sc2.sh` (then export SC2PATH), or use SMAX (--env smax), which runs "
            "without StarCraft II")


def starcraft_env_class() -> Callable[..., Any]:
    """``smac.env.StarCraft2Env``, imported on use (raises ConfigError when missing)."""
    try:
        from smac.env import StarCraft2Env
    except Exception as exc:  # not installed, or the unrelated PyPI "smac" (SMAC3)
        raise ConfigError(_install_hint(f"`from smac.env import StarCraft2Env` failed "
                                        f"({type(exc).__name__})"), field="env", value="smac") from None
    return StarCraft2Env


def check_task(values: dict[str, Any]) -> None:
    starcraft_env_class()
    path = sc2_path()
    if not (path / "Versions").is_dir():
        raise ConfigError(_install_hint(f"StarCraft II not found at {path} (no Versions/ "
                                        "folder; set SC2PATH)"), field="env", value="smac")
    map_name = values["map_name"]
    try:
        from smac.env.starcraft2.maps import smac_maps

        known = smac_maps.get_smac_map_registry()
    except Exception:  # an older / newer smac layout: let the env itself complain
        return
    if map_name not in known:
        raise ConfigError(f"unknown SMAC map {map_name!r} (known: {', '.join(sorted(known))})",
                          field="map_name")


class SMACVecEnv(VecEnv):
    """``n_envs`` StarCraft2Env copies in this process. See ``envs.base`` and the module doc.

    ``env_factory(map_name=..., seed=..., **env_kwargs)`` builds one copy; it defaults to
    ``smac.env.StarCraft2Env`` (tests pass a stand-in). Buffers, E = n_envs, N = agents:
        _obs, _final_obs [N, E, obs_dim] float32; _avail [N, E, n_actions] bool;
        _state, _final_state [E, state_dim] float32; _active [E, N] bool.
    """

    def __init__(self, map_name: str, n_envs: int, seed: int,
                 env_factory: Callable[..., Any] | None = None, relaunch_on_new_seed: bool = True,
                 **env_kwargs):
        self.map_name = map_name
        self.n_envs = int(n_envs)
        self._seed = int(seed)
        self._relaunch_on_new_seed = relaunch_on_new_seed  # False: reset(seed) keeps the games
        self._factory = env_factory or starcraft_env_class()
        env_kwargs.setdefault("continuing_episode", True)  # so SMAC reports timeouts
        self._env_kwargs = env_kwargs
        self._restarts = np.zeros(self.n_envs, np.int64)
        self._envs = [self._make(k) for k in range(self.n_envs)]
        info = self._envs[0].get_env_info()
        N, A = int(info["n_agents"]), int(info["n_actions"])
        D, S = int(info["obs_shape"]), int(info["state_shape"])
        self.n_agents = N
        self.spec = EnvSpec(name=f"smac/{map_name}",
                            agents=tuple(AgentSpec(D, "discrete", A) for _ in range(N)),
                            state_dim=S, episode_limit=int(info["episode_limit"]),
                            episode_metrics=("win_rate",))
        E = self.n_envs
        self._buf = StepBuffers(self.spec, E)  # EnvStep arrays (views)
        self._actions = np.zeros((E, N), np.int64)
        self._elapsed = np.zeros(E, np.int64)
        self._episode_return = np.zeros(E, np.float64)
        self.game_restarts = 0  # games SMAC relaunched after a crash (episodes cut)

    def _env_seed(self, k: int) -> int:
        return int(self._seed + 7919 * int(self._restarts[k]) + k)

    def _make(self, k: int):
        return self._factory(map_name=self.map_name, seed=self._env_seed(k), **self._env_kwargs)

    def _read(self, k: int, obs: np.ndarray, state: np.ndarray) -> None:
        """Copy copy ``k``'s current observations (into ``obs``/``state``) and masks."""
        env = self._envs[k]
        obs[:, k] = np.asarray(env.get_obs(), np.float32)
        state[k] = np.asarray(env.get_state(), np.float32)
        self._buf.avail_block[:, k] = np.asarray(env.get_avail_actions(), bool)
        avail = self._buf.avail_block[:, k]
        # SMAC: a dead agent's only available action is the no-op (0).
        self._buf.active[k] = ~(avail[:, 0] & ~avail[:, 1:].any(axis=1))

    def _call(self, k: int, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            raise EnvError(f"SMAC env {k} ({self.map_name}, seed {self._env_seed(k)}) failed "
                           f"in {what}: {type(exc).__name__}: {exc}", env_index=k,
                           seed=self._env_seed(k)) from exc

    def _env_step(self, completed=None) -> EnvStep:
        return self._buf.step(completed)

    # -- VecEnv --------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> EnvStep:
        if seed is not None and int(seed) != self._seed and self._relaunch_on_new_seed:
            # The seed is given to the game when it launches: rebuild the copies.
            self._seed = int(seed)
            for k, env in enumerate(self._envs):
                self._call(k, "close", env.close)
                self._envs[k] = self._make(k)
        for k, env in enumerate(self._envs):
            self._call(k, "reset", env.reset)
            self._read(k, self._buf.obs_block, self._buf.state)
        self._elapsed[:] = 0
        self._episode_return[:] = 0
        self._buf.clear_flags()
        return self._env_step()

    def step(self, actions: list[np.ndarray]) -> EnvStep:
        """actions[i]: [E] integer array; must be available (SMAC asserts it)."""
        for i, a in enumerate(actions):
            self._actions[:, i] = a
        completed = []
        for k, env in enumerate(self._envs):
            reward, done, info = self._call(k, "step", env.step, self._actions[k])
            self._elapsed[k] += 1
            self._episode_return[k] += reward
            self._buf.reward[k] = reward
            crashed = bool(done) and not info  # SMAC relaunched the game: episode cut
            truncated = bool(done) and (bool(info.get("episode_limit", False)) or crashed)
            self._buf.terminated[k] = bool(done) and not truncated
            self._buf.truncated[k] = truncated
            if not done:
                self._read(k, self._buf.obs_block, self._buf.state)
                continue
            self._read(k, self._buf.final_obs_block, self._buf.final_state)
            if crashed:
                self.game_restarts += 1
            else:
                completed.append({"env": k, "return": float(self._episode_return[k]),
                                  "length": int(self._elapsed[k]),
                                  "win_rate": 1.0 if info.get("battle_won", False) else 0.0})
            self._elapsed[k] = 0
            self._episode_return[k] = 0.0
            self._call(k, "reset", env.reset)
            self._read(k, self._buf.obs_block, self._buf.state)
        return self._env_step(completed)

    def get_state(self) -> None:
        """StarCraft II cannot snapshot a game: nothing to save (see set_state)."""
        return None

    def set_state(self, snapshot: Any) -> EnvStep:
        """Cannot restore a game: every copy starts a fresh episode instead."""
        return self.reset()

    def restart(self, env_index: int) -> EnvStep:
        k = env_index
        try:
            self._envs[k].close()
        except Exception:
            pass
        self._restarts[k] += 1
        self._envs[k] = self._make(k)
        self._call(k, "reset", self._envs[k].reset)
        self._read(k, self._buf.obs_block, self._buf.state)
        self._elapsed[k] = 0
        self._episode_return[k] = 0.0
        return self._env_step()

    def render(self, env_index: int = 0) -> np.ndarray:
        try:
            frame = self._envs[env_index].render(mode="rgb_array")
        except TypeError:
            frame = None
        if frame is None:
            raise NotImplementedError("this smac version does not render RGB frames")
        return np.asarray(frame, np.uint8)

    def close(self) -> None:
        for env in self._envs:
            try:
                env.close()
            except Exception:
                pass


def make_vec_env(config, n_envs: int, seed: int, evaluation: bool = False,
                 render_mode: str | None = None, env_factory=None, **env_kwargs) -> VecEnv:
    """``env_kwargs`` go to ``StarCraft2Env`` (e.g. ``difficulty``, ``obs_last_action``).

    Evaluation envs keep their games across ``reset(seed)`` (see the module doc)."""
    return SMACVecEnv(config.map_name, n_envs=n_envs, seed=seed, env_factory=env_factory,
                      relaunch_on_new_seed=not evaluation, **env_kwargs)
