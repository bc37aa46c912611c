"""The batched v5 MuJoCo step (envs/mujoco_step.py) against gymnasium's own ``step``.

Two copies of each task, one stepping every copy through gymnasium's ``step`` and one
through the batched step, take the same random actions from the same seed, across
terminations and resets: observations, critic states, flags and finished episodes must be
identical, rewards equal to rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from envs import mujoco_step  # noqa: E402
from envs.base import EnvError  # noqa: E402
from envs.mamujoco import MaMuJoCoVecEnv  # noqa: E402

N_ENVS = 3


@pytest.mark.parametrize("scenario, agent_conf, obs_mode, kwargs, steps", [
    ("HalfCheetah", "2x3", "local", {}, 150),
    ("Walker2d", "2x3", "global", {}, 150),
    ("Walker2d", "6x1", "local", {"ctrl_cost_weight": 0.01}, 150),
    ("Ant", "4x2", "global", {}, 100),
    # a narrower healthy range, so that Ant's episodes terminate within the test (and the
    # settings are seen to come from the env instance)
    ("Ant", "4x2", "local", {"healthy_z_range": (0.5, 0.9)}, 150),
    ("Humanoid", "17x1", "global", {}, 150),
    ("Humanoid", "9|8", "global", {"contact_cost_weight": 1e-6, "healthy_z_range": (1.1, 2.0)}, 100),
])
def test_batched_step_equals_gymnasiums_step(scenario, agent_conf, obs_mode, kwargs, steps):
    envs = [MaMuJoCoVecEnv(scenario, agent_conf, 0, N_ENVS, seed=3, obs_mode=obs_mode, standardise=True,
                           batched_step=batched, **kwargs) for batched in (False, True)]
    assert envs[0]._batched is None and envs[1]._batched is not None
    rng = np.random.default_rng(0)
    outs = [env.reset(seed=3) for env in envs]
    ended = 0
    for _ in range(steps):
        actions = [rng.uniform(-1, 1, (N_ENVS, a.action_dim)).astype(np.float32) for a in envs[0].spec.agents]
        gym_step, batched_step = (env.step(actions) for env in envs)
        np.testing.assert_array_equal(gym_step.state, batched_step.state)
        for a, b in zip(gym_step.obs + gym_step.final_obs, batched_step.obs + batched_step.final_obs):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(gym_step.terminated, batched_step.terminated)
        np.testing.assert_array_equal(gym_step.truncated, batched_step.truncated)
        np.testing.assert_allclose(gym_step.reward, batched_step.reward, rtol=1e-6, atol=1e-6)
        assert [c["env"] for c in gym_step.completed] == [c["env"] for c in batched_step.completed]
        for c, d in zip(gym_step.completed, batched_step.completed):
            assert c["length"] == d["length"] and c["return"] == pytest.approx(d["return"], rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(envs[0]._reward, envs[1]._reward, rtol=1e-12, atol=1e-12)
        ended += len(gym_step.completed)
    if scenario != "HalfCheetah":  # HalfCheetah never terminates
        assert ended > 0, "no episode ended: the reset path went untested"
    del outs


def test_other_bodies_keep_gymnasiums_step():
    env = MaMuJoCoVecEnv("Hopper", "3x1", 0, N_ENVS, seed=1)
    assert mujoco_step.for_env(env._raw[0], N_ENVS) is None and env._batched is None
    env.reset(seed=1)
    env.step([np.zeros((N_ENVS, a.action_dim), np.float32) for a in env.spec.agents])


def test_a_failing_simulator_names_its_copy_and_seed():
    env = MaMuJoCoVecEnv("HalfCheetah", "2x3", 0, N_ENVS, seed=4)
    env.reset(seed=4)

    def crash(*args, **kwargs):
        raise RuntimeError("mj_step blew up")

    env._raw[1].do_simulation = crash
    with pytest.raises(EnvError, match=r"MaMuJoCo env 1 \(seed 5\) failed: RuntimeError: mj_step blew up") as info:
        env.step([np.zeros((N_ENVS, a.action_dim), np.float32) for a in env.spec.agents])
    assert info.value.env_index == 1 and info.value.seed == 5
