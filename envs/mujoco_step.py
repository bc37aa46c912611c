"""Gymnasium's v5 MuJoCo ``step`` for all copies of one body at once.

Per copy, gymnasium's ``step`` spends a quarter to a third of its time in Python around the
simulator (properties re-read per term, an info dict, a dozen small numpy calls); with 20
copies per vector step that is paid 20 times. Here each copy runs only its simulator
(``do_simulation``, the copy's own method, so whatever replaces it on a copy still runs),
and the observation, reward and termination of all copies come from a handful of array
operations on the quantities gymnasium reads, in the order it combines them. The settings
(weights, ranges, observation switches) are read from the env instance, so a task built
with other keyword arguments still matches. tests/test_mujoco_step.py compares every
supported body with gymnasium's own ``step``, copy by copy, across terminations.

Supported: HalfCheetah, Walker2d, Ant and Humanoid (v5), the bodies of the published
MaMuJoCo curves; ``for_env`` returns ``None`` for any other env, which keeps gymnasium's
``step``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class BatchedStep:
    """One body's step for ``n_envs`` copies (``step``).

    Subclasses name the simulator fields their observation and reward read (``fields``), the
    quantity whose change per step is the velocity rewarded (``position``), and combine them
    (``finish``).
    """

    fields: tuple[str, ...] = ("qpos", "qvel")
    # leading qpos entries the observation leaves out: x for the bodies that move in the x-z
    # plane (HalfCheetah, Walker2d), x and y for those free on the floor (Ant, Humanoid)
    positions_left_out = 1

    def __init__(self, env, n_envs: int):
        data = env.data
        self.dt = env.dt
        self.frame_skip = env.frame_skip
        self.forward_weight = env._forward_reward_weight
        self.ctrl_weight = env._ctrl_cost_weight
        self.skip = self.positions_left_out if env._exclude_current_positions_from_observation else 0
        # The bodies that can fall (all but HalfCheetah) are healthy within a height range.
        self.healthy_reward = getattr(env, "_healthy_reward", 0.0)
        self.z_range = getattr(env, "_healthy_z_range", None)
        self.terminate_when_unhealthy = getattr(env, "_terminate_when_unhealthy", False)
        self.gathered = {name: np.zeros((n_envs, *np.shape(getattr(data, name))), np.float64)
                         for name in self.fields}
        width = np.shape(self.position(env))
        self.before = np.zeros((n_envs, *width), np.float64)
        self.after = np.zeros((n_envs, *width), np.float64)

    def position(self, env):
        return env.data.qpos[0]

    def step(self, envs, actions: np.ndarray, sim_obs: np.ndarray, reward: np.ndarray,
             terminated: np.ndarray, failed: Callable[[int, Exception], Exception]) -> None:
        """Step every copy with its row of ``actions`` and fill the rows of ``sim_obs`` (the
        env's observation), ``reward`` and ``terminated``. A copy whose simulator raises
        ends the step with ``failed(copy index, exception)``."""
        for k, env in enumerate(envs):
            self.before[k] = self.position(env)
            try:
                env.do_simulation(actions[k], self.frame_skip)
            except Exception as exc:
                raise failed(k, exc) from exc
            self.after[k] = self.position(env)
            data = env.data
            for name, out in self.gathered.items():
                out[k] = getattr(data, name)
        velocity = (self.after - self.before) / self.dt
        self.finish(velocity, actions, sim_obs, reward, terminated)

    def finish(self, velocity, actions, sim_obs, reward, terminated) -> None:
        raise NotImplementedError

    def control_cost(self, actions: np.ndarray) -> np.ndarray:
        return self.ctrl_weight * np.sum(np.square(actions), axis=1)

    def observe(self, sim_obs: np.ndarray, *parts: np.ndarray) -> None:
        """Write [qpos (after the skipped entries), qvel, parts...] into ``sim_obs``."""
        qpos, qvel = self.gathered["qpos"], self.gathered["qvel"]
        column = 0
        for part in (qpos[:, self.skip:], qvel, *parts):
            flat = part.reshape(len(part), -1)
            sim_obs[:, column:column + flat.shape[1]] = flat
            column += flat.shape[1]


class HalfCheetah(BatchedStep):
    def finish(self, velocity, actions, sim_obs, reward, terminated):
        self.observe(sim_obs)
        reward[:] = self.forward_weight * velocity - self.control_cost(actions)
        terminated[:] = False


class Walker2d(BatchedStep):
    def __init__(self, env, n_envs: int):
        super().__init__(env, n_envs)
        self.angle_range = env._healthy_angle_range

    def observe(self, sim_obs, *parts):
        qvel = self.gathered["qvel"]
        np.clip(qvel, -10, 10, out=qvel)  # gymnasium clips the velocities it observes
        super().observe(sim_obs, *parts)

    def finish(self, velocity, actions, sim_obs, reward, terminated):
        qpos = self.gathered["qpos"]
        z, angle = qpos[:, 1], qpos[:, 2]
        healthy = ((self.z_range[0] < z) & (z < self.z_range[1])
                   & (self.angle_range[0] < angle) & (angle < self.angle_range[1]))
        self.observe(sim_obs)
        reward[:] = (self.forward_weight * velocity + healthy * self.healthy_reward) - self.control_cost(actions)
        terminated[:] = ~healthy & self.terminate_when_unhealthy


class Ant(BatchedStep):
    fields = ("qpos", "qvel", "cfrc_ext")
    positions_left_out = 2

    def __init__(self, env, n_envs: int):
        self.main_body = env.model.body(env._main_body).id
        super().__init__(env, n_envs)
        self.force_range = env._contact_force_range
        self.contact_weight = env._contact_cost_weight
        self.observe_forces = env._include_cfrc_ext_in_observation

    def position(self, env):
        return env.data.xpos[self.main_body, :2]

    def finish(self, velocity, actions, sim_obs, reward, terminated):
        qpos, qvel = self.gathered["qpos"], self.gathered["qvel"]
        forces = np.clip(self.gathered["cfrc_ext"], *self.force_range)
        z = qpos[:, 2]
        healthy = (np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
                   & (self.z_range[0] <= z) & (z <= self.z_range[1]))
        self.observe(sim_obs, *((forces[:, 1:],) if self.observe_forces else ()))
        contact_cost = self.contact_weight * np.sum(np.square(forces), axis=(1, 2))
        reward[:] = ((velocity[:, 0] * self.forward_weight + healthy * self.healthy_reward)
                     - (self.control_cost(actions) + contact_cost))
        terminated[:] = ~healthy & self.terminate_when_unhealthy


class Humanoid(BatchedStep):
    positions_left_out = 2

    def __init__(self, env, n_envs: int):
        # The observation's optional parts, in gymnasium's order: (field, switch, first row kept).
        optional = (("cinert", env._include_cinert_in_observation, 1),
                    ("cvel", env._include_cvel_in_observation, 1),
                    ("qfrc_actuator", env._include_qfrc_actuator_in_observation, 6),
                    ("cfrc_ext", env._include_cfrc_ext_in_observation, 1))
        self.observed = tuple((name, start) for name, on, start in optional if on is True)
        self.fields = tuple(dict.fromkeys(("qpos", "qvel", "cfrc_ext", *(name for name, _ in self.observed))))
        self.body_mass = env.model.body_mass.copy()
        super().__init__(env, n_envs)
        self.contact_weight = env._contact_cost_weight
        self.contact_range = env._contact_cost_range

    def position(self, env):
        # gymnasium's mass_center: the mass-weighted mean of the bodies' centres of mass, x and y
        return (np.einsum("b,bj->j", self.body_mass, env.data.xipos) / self.body_mass.sum())[0:2]

    def finish(self, velocity, actions, sim_obs, reward, terminated):
        z = self.gathered["qpos"][:, 2]
        healthy = (self.z_range[0] < z) & (z < self.z_range[1])
        self.observe(sim_obs, *(self.gathered[name][:, start:] for name, start in self.observed))
        # gymnasium charges the control actually applied: data.ctrl, which is the action
        ctrl_cost = self.control_cost(actions)
        contact_cost = np.clip(self.contact_weight * np.sum(np.square(self.gathered["cfrc_ext"]), axis=(1, 2)),
                               *self.contact_range)
        reward[:] = (self.forward_weight * velocity[:, 0] + healthy * self.healthy_reward) - (ctrl_cost + contact_cost)
        terminated[:] = ~healthy & self.terminate_when_unhealthy


def _bodies():
    from gymnasium.envs.mujoco import ant_v5, half_cheetah_v5, humanoid_v5, walker2d_v5

    return {half_cheetah_v5.HalfCheetahEnv: HalfCheetah, walker2d_v5.Walker2dEnv: Walker2d,
            ant_v5.AntEnv: Ant, humanoid_v5.HumanoidEnv: Humanoid}


def for_env(env, n_envs: int) -> BatchedStep | None:
    """The batched step of ``env``'s body (an unwrapped gymnasium MuJoCo env), or None."""
    body = _bodies().get(type(env))
    if body is None or env.render_mode == "human":  # gymnasium's step draws the window
        return None
    return body(env, n_envs)
