"""Multi-Agent MuJoCo (Farama ``gymnasium-robotics`` ``mamujoco_v1``), vectorised in-process.

The PettingZoo wrapper is used to build each task and its agent factorisation; stepping
goes straight to the underlying single-agent MuJoCo env: for HalfCheetah, Walker2d, Ant and
Humanoid, gymnasium's step computed for all copies at once (``envs/mujoco_step.py``), for
other bodies (or with ``batched_step=False``) gymnasium's own ``step`` per copy.

Two observation settings (``obs_mode``):

* ``local``: each agent sees its own joints and those up to ``agent_obsk`` hops away,
  gathered from the simulator's observation with one fancy-index per agent over all envs
  at once (``observation_factorization``). Where that index map does not reproduce the
  wrapper's observations exactly (checked at construction, e.g. Walker2d clips
  velocities), the wrapper's own per-agent observation builder is used instead.
* ``global``: the setting of every published HAPPO / HATRPO MaMuJoCo curve: each agent sees
  the simulator's full observation followed by a one-hot agent id; with ``standardise``,
  each agent's vector (and the critic's state) is standardised by its own mean and
  standard deviation over its entries, as the published code does.

Besides the library's partitions, ``<n>x1`` with ``n`` the number of actuators (Humanoid
17x1, Walker2d 6x1, Ant 8x1) gives one agent per actuator, built from the library's own
joint graph (``per_actuator_factorization``).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np

from envs import mujoco_step
from envs.base import AgentSpec, EnvError, EnvSpec, EnvStep, StepBuffers, VecEnv
from utils.errors import ConfigError

SCENARIOS = ("Ant", "HalfCheetah", "Hopper", "HumanoidStandup", "Humanoid", "Reacher", "Swimmer",
             "Pusher", "Walker2d", "ManySegmentSwimmer", "ManySegmentAnt")
# Offered by gymnasium-robotics 1.4.2 but not here: CoupledHalfCheetah fails to build with
# mujoco 4 (an IndexError inside the library); the inverted pendulums have no partition
# into agents (they run only as one agent).
BROKEN = {"CoupledHalfCheetah": "gymnasium-robotics 1.4.2's CoupledHalfCheetah fails to build with mujoco 4",
          "InvertedPendulum": "MaMuJoCo defines no partition of it into agents",
          "InvertedDoublePendulum": "MaMuJoCo defines no partition of it into agents",
          # Three of its nodes share the label "r_wrist_roll_joint", and the library orders
          # nodes by label (ties in set order, i.e. by memory address): an agent's
          # observation columns differ between copies and processes (measured: one seed gave
          # eval returns -58.44 / -58.47 / -58.79).
          "Pusher": "gymnasium-robotics 1.4.2 orders its agents' observations differently in "
                    "every process, so a seed does not reproduce"}


def task_name(values: dict[str, Any]) -> str:
    return f"{values['scenario']}-{str(values['agent_conf']).replace('|', '_')}"


def _mujoco_warning(message: str) -> None:
    # The v5 XML files use a compiler attribute mujoco 4 deprecates; that notice is
    # printed once per env built and says nothing about the run. Others still show.
    if "settotalmass" not in message:
        print(f"mujoco warning: {message.strip()}", file=sys.stderr)


def _import_mamujoco():
    os.environ.setdefault("MUJOCO_GL", "egl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # an unrelated notice about Adroit hand envs, printed on import
            from farama_notifications import notifications

            notifications.pop("gymnasium_robotics", None)
        except ImportError:
            pass
        import mujoco
        from gymnasium_robotics import mamujoco_v1  # heavy: imported on first use

    mujoco.set_mju_user_warning(_mujoco_warning)
    return mamujoco_v1


OBS_MODES = ("local", "global")
# Partitions tried when listing what the library knows for a body (it keeps no list).
LIBRARY_PARTITIONS = ("2x1", "2x3", "6x1", "2x4", "2x4d", "4x2", "3x1", "9|8", "3p")


def _library_partition(scenario: str, agent_conf: str):
    """The library's (partition, edges, globals) for a partition name, or None."""
    from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges

    try:
        return get_parts_and_edges(scenario, agent_conf)
    except Exception:  # the library raises bare Exceptions for unknown partitions
        return None


def per_actuator_factorization(scenario: str, agent_conf: str) -> dict[str, Any] | None:
    """``agent_factorization`` with one agent per actuator when ``agent_conf`` is
    ``<actuators>x1`` and the library has no partition of that name; else None.

    The joint graph (nodes, hyper-edges, global nodes) is the library's own, taken from
    any partition it defines for the body; agents are ordered by actuator index."""
    if scenario.startswith("ManySegment") or not agent_conf.endswith("x1"):
        return None
    if _library_partition(scenario, agent_conf) is not None:
        return None
    for name in LIBRARY_PARTITIONS:
        graph = _library_partition(scenario, name)
        if graph is not None:
            break
    else:
        return None
    parts, edges, global_nodes = graph
    nodes = sorted((node for part in parts for node in part), key=lambda node: node.act_ids)
    if agent_conf != f"{len(nodes)}x1":
        return None
    return {"partition": [(node,) for node in nodes], "edges": edges, "globals": global_nodes}


def check_task(values: dict[str, Any]) -> None:
    scenario, agent_conf = values["scenario"], str(values["agent_conf"])
    if scenario in BROKEN:
        raise ConfigError(f"{scenario} is not supported: {BROKEN[scenario]}", field="scenario", value=scenario)
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown MaMuJoCo scenario {scenario!r} (known: {', '.join(SCENARIOS)})",
                          field="scenario")
    if scenario.startswith("ManySegment"):
        parts = agent_conf.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"{scenario}'s partitions look like <agents>x<segments>, e.g. 10x2; "
                              f"got {agent_conf!r}", field="agent_conf")
        if int(parts[0]) * int(parts[1]) < 2:  # the library's XML then repeats a joint name
            raise ConfigError(f"{scenario} needs at least 2 segments in all (agents x segments); "
                              f"got {agent_conf!r}", field="agent_conf")
        return
    _import_mamujoco()

    def known(conf: str) -> bool:
        return _library_partition(scenario, conf) is not None

    if not known(agent_conf) and per_actuator_factorization(scenario, agent_conf) is None:
        # The library has no list of partitions: try the ones it defines for some body.
        # (Every scenario offered has one of them; those without a partition are in BROKEN.)
        valid = [c for c in LIBRARY_PARTITIONS if known(c)]
        actuators = sum(len(part) for part in _library_partition(scenario, valid[0])[0])
        if f"{actuators}x1" not in valid:  # one agent per actuator
            valid.append(f"{actuators}x1")
        raise ConfigError(f"{scenario} has no partition {agent_conf!r} (known: {', '.join(valid)})",
                          field="agent_conf")


class MaMuJoCoVecEnv(VecEnv):
    """``n_envs`` MaMuJoCo copies stepped in this process. See ``envs.base``."""

    def __init__(self, scenario: str, agent_conf: str, agent_obsk: int, n_envs: int,
                 seed: int, render_mode: str | None = None, obs_mode: str = "local",
                 standardise: bool = False, batched_step: bool = True, **env_kwargs):
        mamujoco_v1 = _import_mamujoco()
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {', '.join(OBS_MODES)}; got {obs_mode!r}")
        self.n_envs = n_envs
        self._seed = seed
        self._global_obs = obs_mode == "global"
        self._standardise = standardise and self._global_obs
        agents_of_actuators = per_actuator_factorization(scenario, agent_conf)
        self._make = lambda: mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk,
                                                      agent_factorization=agents_of_actuators,
                                                      render_mode=render_mode, **env_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ma_envs = [self._make() for _ in range(n_envs)]
        self._raw = [e.single_agent_env.unwrapped for e in self._ma_envs]
        first = self._ma_envs[0]
        agents = first.possible_agents
        self.max_steps = first.single_agent_env.spec.max_episode_steps or 1000
        global_space = first.single_agent_env.action_space
        self._act_low, self._act_high = global_space.low.astype(np.float64), global_space.high.astype(np.float64)
        # Global action index of every local action dimension, in agent order.
        self._act_perm = np.concatenate([
            np.array([node.act_ids for node in part], dtype=np.int64).reshape(-1)
            for part in first.agent_action_partitions])
        # Scenarios without a node-based observation map (Reacher, Pusher: no
        # observation_structure) build local observations in the wrapper's own _get_obs.
        factorization = first.observation_factorization
        self._obs_index = None if factorization is None else [np.asarray(factorization[a]) for a in agents]
        # The global setting reads no local observations: no probe env to build and step.
        self._fast_obs = (not self._global_obs and factorization is not None
                          and self._index_map_matches(self._make))
        act_dims = [int(first.action_space(a).shape[0]) for a in agents]
        state_dim = int(first.state().shape[0])
        if self._global_obs:  # the simulator's observation, then a one-hot agent id
            obs_dims = [state_dim + len(agents)] * len(agents)
        else:
            obs_dims = [int(first.observation_space(a).shape[0]) for a in agents]
        self.spec = EnvSpec(
            name=f"mamujoco/{scenario}-{agent_conf}",
            agents=tuple(AgentSpec(o, "continuous", a, float(global_space.low[0]), float(global_space.high[0]))
                         for o, a in zip(obs_dims, act_dims)),
            state_dim=state_dim, episode_limit=self.max_steps)
        # Buffers reused every step (EnvStep arrays are views of these).
        E = n_envs
        self._buf = StepBuffers(self.spec, E)  # EnvStep arrays (views)
        # The simulator's observations. In the local setting unstandardised, they are the
        # critic's state itself; otherwise state and agent observations are made from them.
        if self._standardise:
            self._sim_obs = np.zeros_like(self._buf.state)
            self._final_sim_obs = np.zeros_like(self._buf.final_state)
        else:
            self._sim_obs, self._final_sim_obs = self._buf.state, self._buf.final_state
        self._joint_action = np.zeros((E, len(self._act_perm)), np.float64)
        self._global_action = np.zeros((E, len(self._act_perm)), np.float64)
        self._elapsed = np.zeros(E, np.int64)
        self._episode_return = np.zeros(E, np.float64)
        self._reward = np.zeros(E, np.float64)  # this step's rewards, before the buffer's float32
        # gymnasium's step for all copies at once, for the bodies it knows (envs/mujoco_step.py)
        self._batched = mujoco_step.for_env(self._raw[0], E) if batched_step else None
        self._restarts = np.zeros(E, np.int64)

    def _index_map_matches(self, make) -> bool:
        """True when state[index] reproduces the wrapper's local observations."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = make()
        probe.reset(seed=12345)
        rng = np.random.default_rng(0)
        try:
            for _ in range(30):
                actions = {a: rng.uniform(-1, 1, probe.action_space(a).shape).astype(np.float32)
                           for a in probe.possible_agents}
                obs, _, term, trunc, _ = probe.step(actions)
                state = probe.state()
                for idx, agent in zip(self._obs_index, probe.possible_agents):
                    if not np.array_equal(state[idx], obs[agent]):
                        return False
                if any(term.values()) or any(trunc.values()):
                    probe.reset(seed=1)
            return True
        finally:
            probe.close()

    # -- observation assembly -------------------------------------------------------------
    def _observe(self, final: bool = False, rows=None) -> None:
        """Fill the critic's state and the agents' observations (``final``: of the episodes
        that just ended) from the simulator's observations, for all envs or ``rows``."""
        sim_obs = self._final_sim_obs if final else self._sim_obs
        state = self._buf.final_state if final else self._buf.state
        obs = self._buf.final_obs if final else self._buf.obs
        if not self._global_obs:
            self._fill_obs(sim_obs, obs, rows=rows)
            return
        picked = sim_obs if rows is None else sim_obs[rows]
        n_agents, width = len(obs), picked.shape[1]
        body, hot, cold = picked, 1.0, 0.0
        if self._standardise:
            # Every agent's vector [sim_obs, one-hot id] has the same entries up to their
            # order (one 1 and n-1 zeros after sim_obs), hence the same mean and std.
            total = picked.sum(axis=1, dtype=np.float64)
            squares = np.einsum("ij,ij->i", picked, picked, dtype=np.float64)
            length = width + n_agents
            mean = (total + 1.0) / length
            std = np.sqrt(np.maximum((squares + 1.0) / length - mean**2, 1e-12))
            body = (picked - mean[:, None]) / std[:, None]
            hot, cold = ((1.0 - mean) / std)[:, None], (-mean / std)[:, None]
            state_mean = total / width
            state_std = np.sqrt(np.maximum(squares / width - state_mean**2, 1e-12))
            standardised_state = (picked - state_mean[:, None]) / state_std[:, None]
            if rows is None:
                state[:] = standardised_state
            else:
                state[rows] = standardised_state
        for agent, buf in enumerate(obs):
            target = buf if rows is None else np.empty((len(rows), buf.shape[1]), buf.dtype)
            target[:, :width] = body
            target[:, width:] = cold
            target[:, width + agent:width + agent + 1] = hot
            if rows is not None:
                buf[rows] = target

    def _fill_obs(self, states: np.ndarray, out: list[np.ndarray], rows=None) -> None:
        if self._fast_obs:
            for idx, buf in zip(self._obs_index, out):
                if rows is None:
                    buf[:] = states[:, idx]
                else:
                    buf[rows] = states[np.ix_(rows, idx)]
            return
        for k in (range(self.n_envs) if rows is None else rows):
            local = self._ma_envs[k]._get_obs()
            for buf, agent in zip(out, self._ma_envs[k].possible_agents):
                buf[k] = local[agent]

    def _env_step(self) -> EnvStep:
        return self._buf.step()

    # -- VecEnv --------------------------------------------------------------------------
    def _env_seed(self, k: int) -> int:
        return int(self._seed + 7919 * int(self._restarts[k]) + k)

    def reset(self, seed: int | None = None) -> EnvStep:
        if seed is not None:
            self._seed = int(seed)
        for k, env in enumerate(self._raw):
            self._sim_obs[k] = env.reset(seed=self._env_seed(k))[0]
        self._elapsed[:] = 0
        self._episode_return[:] = 0
        self._buf.clear_flags()
        self._observe()
        return self._env_step()

    def _failed(self, k: int, exc: Exception) -> EnvError:
        """The error for copy ``k``'s simulator raising ``exc``: names the copy and its seed."""
        return EnvError(f"MaMuJoCo env {k} (seed {self._env_seed(k)}) failed: {type(exc).__name__}: {exc}",
                        env_index=k, seed=self._env_seed(k))

    def _simulate(self) -> None:
        """Step every copy with its row of ``_global_action``; fill ``_sim_obs``, ``_reward``
        and the terminated flags."""
        terminated = self._buf.terminated
        if self._batched is not None:
            self._batched.step(self._raw, self._global_action, self._sim_obs, self._reward, terminated,
                               self._failed)
            return
        for k, env in enumerate(self._raw):
            try:
                self._sim_obs[k], self._reward[k], terminated[k], _, _ = env.step(self._global_action[k])
            except Exception as exc:
                raise self._failed(k, exc) from exc

    def step(self, actions: list[np.ndarray]) -> EnvStep:
        np.concatenate(actions, axis=1, out=self._joint_action)
        self._global_action[:, self._act_perm] = self._joint_action
        np.clip(self._global_action, self._act_low, self._act_high, out=self._global_action)
        self._simulate()
        self._elapsed += 1
        self._episode_return += self._reward
        self._buf.reward[:] = self._reward
        terminated, truncated = self._buf.terminated, self._buf.truncated
        np.greater_equal(self._elapsed, self.max_steps, out=truncated)
        truncated &= ~terminated
        completed = []
        for k in np.flatnonzero(terminated | truncated):
            self._final_sim_obs[k] = self._sim_obs[k]
            if not self._fast_obs and not self._global_obs:  # the wrapper's, before the reset
                self._fill_obs(None, self._buf.final_obs, rows=[k])
            completed.append({"env": int(k), "return": float(self._episode_return[k]),
                              "length": int(self._elapsed[k])})
            self._elapsed[k] = 0
            self._episode_return[k] = 0.0
            self._sim_obs[k] = self._raw[k].reset()[0]
        if completed:  # one gather for all episodes that ended
            rows = [c["env"] for c in completed]
            if self._global_obs or self._fast_obs:
                self._observe(final=True, rows=rows)
        self._observe()
        out = self._env_step()
        out.completed = completed
        return out

    def get_state(self) -> dict[str, Any]:
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = []
        for env in self._raw:
            buf = np.empty(mujoco.mj_stateSize(env.model, spec), np.float64)
            mujoco.mj_getState(env.model, env.data, buf, spec)
            physics.append(buf)
        return {"physics": physics, "rng": [env.np_random.bit_generator.state for env in self._raw],
                "elapsed": self._elapsed.copy(), "episode_return": self._episode_return.copy(),
                "restarts": self._restarts.copy(), "seed": self._seed,
                "state": self._buf.state.copy(), "sim_obs": self._sim_obs.copy(),
                "obs": [o.copy() for o in self._buf.obs]}

    def set_state(self, snapshot: dict[str, Any]) -> EnvStep:
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        if len(snapshot["physics"]) != self.n_envs:
            raise ValueError(f"snapshot holds {len(snapshot['physics'])} envs, this run has {self.n_envs}")
        self._seed = snapshot["seed"]
        for env, buf, rng in zip(self._raw, snapshot["physics"], snapshot["rng"]):
            env.np_random.bit_generator.state = rng
            mujoco.mj_setState(env.model, env.data, buf, spec)
            mujoco.mj_forward(env.model, env.data)
        self._elapsed[:] = snapshot["elapsed"]
        self._episode_return[:] = snapshot["episode_return"]
        self._restarts[:] = snapshot["restarts"]
        self._buf.state[:] = snapshot["state"]
        self._sim_obs[:] = snapshot.get("sim_obs", snapshot["state"])
        for buf, saved in zip(self._buf.obs, snapshot["obs"]):
            buf[:] = saved
        self._buf.clear_flags()
        return self._env_step()

    def restart(self, env_index: int) -> EnvStep:
        k = env_index
        try:
            self._ma_envs[k].close()
        except Exception:
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ma_envs[k] = self._make()
        self._raw[k] = self._ma_envs[k].single_agent_env.unwrapped
        self._restarts[k] += 1
        self._sim_obs[k] = self._raw[k].reset(seed=self._env_seed(k))[0]
        self._elapsed[k] = 0
        self._episode_return[k] = 0
        self._observe()
        return self._env_step()

    def render(self, env_index: int = 0) -> np.ndarray:
        # Straight to the MuJoCo env: its wrappers never saw our (unwrapped) resets.
        return self._raw[env_index].render()

    def close(self) -> None:
        for env in self._ma_envs:
            env.close()


def make_vec_env(config, n_envs: int, seed: int, evaluation: bool = False,
                 render_mode: str | None = None, **env_kwargs) -> VecEnv:
    """``env_kwargs`` go to the MuJoCo env (e.g. ``width``/``height`` for rendering)."""
    return MaMuJoCoVecEnv(config.scenario, str(config.agent_conf), config.agent_obsk, n_envs,
                          seed=seed, render_mode=render_mode, obs_mode=config.obs_mode,
                          standardise=config.obs_standardise, batched_step=config.batched_step, **env_kwargs)
