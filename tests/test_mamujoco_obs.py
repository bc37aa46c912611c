"""MaMuJoCo's observation settings and one-agent-per-actuator partitions, on the real envs.

--obs_mode global gives every agent the simulator's full observation followed by a one-hot
agent id (the setting of the published HAPPO / HATRPO curves); --obs_standardise
standardises each such vector, and the critic's state, by its own mean and std.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from envs.mamujoco import MaMuJoCoVecEnv, check_task  # noqa: E402
from utils.errors import ConfigError  # noqa: E402

N_ENVS = 3


def random_steps(env, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    step = env.reset(seed=5)
    for _ in range(n):
        step = env.step([rng.uniform(-1, 1, (N_ENVS, a.action_dim)).astype(np.float32) for a in env.spec.agents])
    return step


def expected_global(sim_obs: np.ndarray, agent: int, n_agents: int, standardise: bool) -> np.ndarray:
    vector = np.concatenate([sim_obs, np.tile(np.eye(n_agents)[agent], (len(sim_obs), 1))], axis=1)
    if standardise:
        vector = (vector - vector.mean(axis=1, keepdims=True)) / vector.std(axis=1, keepdims=True)
    return vector


@pytest.mark.parametrize("standardise", [False, True])
def test_global_observation_is_the_state_plus_a_one_hot_id(standardise):
    local = MaMuJoCoVecEnv("HalfCheetah", "2x3", 0, N_ENVS, seed=1)
    glob = MaMuJoCoVecEnv("HalfCheetah", "2x3", 0, N_ENVS, seed=1, obs_mode="global", standardise=standardise)
    assert [a.obs_dim for a in glob.spec.agents] == [17 + 2, 17 + 2]
    local_step, global_step = random_steps(local, 40), random_steps(glob, 40)
    sim_obs = local_step.state  # the local setting's state is the simulator's observation itself
    for agent in range(2):
        np.testing.assert_allclose(global_step.obs[agent], expected_global(sim_obs, agent, 2, standardise),
                                   rtol=1e-5, atol=1e-5)
    state = (sim_obs - sim_obs.mean(1, keepdims=True)) / sim_obs.std(1, keepdims=True) if standardise else sim_obs
    np.testing.assert_allclose(global_step.state, state, rtol=1e-5, atol=1e-5)
    if standardise:  # each vector has mean 0 and std 1
        np.testing.assert_allclose(global_step.obs[1].mean(1), 0, atol=1e-5)
        np.testing.assert_allclose(global_step.obs[1].std(1), 1, atol=1e-4)


def test_final_observation_of_a_truncated_episode_in_the_global_setting():
    env = MaMuJoCoVecEnv("HalfCheetah", "2x3", 0, N_ENVS, seed=1, obs_mode="global", standardise=True)
    env.max_steps = 5  # every episode is cut after 5 steps
    step = random_steps(env, 5)
    assert step.truncated.all() and not step.terminated.any()
    sim_final = env._final_sim_obs
    for agent in range(2):
        np.testing.assert_allclose(step.final_obs[agent], expected_global(sim_final, agent, 2, True),
                                   rtol=1e-5, atol=1e-5)
    # and the observation after the auto-reset is that of the new episode, not the final one
    assert not np.allclose(step.obs[0], step.final_obs[0])


def test_snapshot_restores_the_global_observations_exactly():
    env = MaMuJoCoVecEnv("Walker2d", "2x3", 0, N_ENVS, seed=3, obs_mode="global", standardise=True)
    random_steps(env, 20)
    snapshot = env.get_state()
    rng = np.random.default_rng(9)
    actions = [rng.uniform(-1, 1, (N_ENVS, a.action_dim)).astype(np.float32) for a in env.spec.agents]
    first = [o.copy() for o in env.step(actions).obs]
    restored = [o.copy() for o in env.set_state(snapshot).obs]
    again = env.step(actions).obs
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # A restart of one copy rebuilds every agent's observations from the simulator's: the
    # other copies' must be those of the snapshot still.
    env.set_state(snapshot)
    after_restart = env.restart(0).obs
    for a, b in zip(restored, after_restart):
        np.testing.assert_allclose(a[1:], b[1:], rtol=1e-6)


def test_humanoid_17x1_has_17_agents_with_one_action_each():
    env = MaMuJoCoVecEnv("Humanoid", "17x1", 0, N_ENVS, seed=1, obs_mode="global")
    assert env.spec.n_agents == 17
    assert [a.action_dim for a in env.spec.agents] == [1] * 17
    assert sorted(env._act_perm.tolist()) == list(range(17))  # every actuator driven by exactly one agent
    step = random_steps(env, 3)
    assert all(o.shape == (N_ENVS, env.spec.state_dim + 17) for o in step.obs)
    local = MaMuJoCoVecEnv("Humanoid", "17x1", 0, N_ENVS, seed=1)  # the local setting works too
    assert local.spec.n_agents == 17 and local._act_perm.tolist() == list(range(17))


@pytest.mark.parametrize("scenario, conf, n_agents", [("Walker2d", "6x1", 6), ("Ant", "8x1", 8)])
def test_one_agent_per_actuator_partitions_the_library_does_not_name(scenario, conf, n_agents):
    check_task({"scenario": scenario, "agent_conf": conf})
    env = MaMuJoCoVecEnv(scenario, conf, 0, 2, seed=1)
    assert env.spec.n_agents == n_agents and [a.action_dim for a in env.spec.agents] == [1] * n_agents


def test_unknown_partition_names_the_per_actuator_one():
    with pytest.raises(ConfigError, match=r"17x1") as info:
        check_task({"scenario": "Humanoid", "agent_conf": "16x1"})
    assert "\n" not in str(info.value)
