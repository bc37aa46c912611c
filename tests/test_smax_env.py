"""SMAX vectorised env (envs/smax.py): shapes, episode bookkeeping, seeding, exact resume.

Each env below is compiled once per module (module-scoped fixtures); the whole file runs
in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("jaxmarl")

from envs import smax  # noqa: E402
from envs.smax import STOP_ACTION, SMAXVecEnv  # noqa: E402
from train.config import ConfigError, load_config  # noqa: E402

N_ENVS = 8


def random_available(step, rng) -> list[np.ndarray]:
    """One uniformly random available action per agent and env: list of [E] int64."""
    return [(rng.random(av.shape) * av).argmax(axis=1).astype(np.int64)
            for av in step.avail_actions]


def copy_step(step) -> dict:
    return {"obs": np.stack(step.obs).copy(), "state": step.state.copy(),
            "avail": np.stack(step.avail_actions).copy(), "reward": step.reward.copy(),
            "terminated": step.terminated.copy(), "truncated": step.truncated.copy(),
            "active": step.active.copy(), "final_state": step.final_state.copy(),
            "final_obs": np.stack(step.final_obs).copy(), "completed": list(step.completed)}


def focus_fire(step, rng) -> list[np.ndarray]:
    """Shoot the weakest enemy in range (else stop): wins 3m now and then.

    An ally's observation lists the other allies, then the enemies, 13 features each
    (health first), then its own features.
    """
    n_allies, n_enemies, width = len(step.obs), step.avail_actions[0].shape[1] - 5, 13
    actions = []
    for obs, avail in zip(step.obs, step.avail_actions):
        start = (n_allies - 1) * width
        health = obs[:, start:start + n_enemies * width].reshape(-1, n_enemies, width)[:, :, 0]
        health = np.where(avail[:, 5:], health, np.inf)
        actions.append(np.where(avail[:, 5:].any(axis=1), 5 + health.argmin(axis=1),
                                STOP_ACTION).astype(np.int64))
    return actions


def rollout(env, first, n_steps: int, seed: int, policy=random_available) -> list[dict]:
    rng = np.random.default_rng(seed)
    step, out = first, []
    for _ in range(n_steps):
        step = env.step(policy(step, rng))
        out.append(copy_step(step))
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        for key in x:
            if key == "completed":
                assert x[key] == y[key], f"step {t}: completed differs"
            else:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"step {t}: {key}")


@pytest.fixture(scope="module")
def env3m():
    env = SMAXVecEnv("3m", n_envs=N_ENVS, seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def run3m(env3m):
    """A 3m run with random available actions, longer than the episode limit."""
    first = copy_step(env3m.reset(seed=11))
    steps = rollout(env3m, env3m.reset(seed=11), env3m.spec.episode_limit + 60, seed=5)
    return first, steps


@pytest.fixture(scope="module")
def run3m_focus(env3m):
    """A 3m run with a focus-fire policy (some episodes are won)."""
    return rollout(env3m, env3m.reset(seed=12), 150, seed=0, policy=focus_fire)


@pytest.fixture(scope="module")
def env2s3z_short():
    """Heterogeneous map with a 10-step SMAX time limit (episodes of 11 steps)."""
    env = SMAXVecEnv("2s3z", n_envs=4, seed=0, max_steps=10)
    yield env
    env.close()


def test_maps_exist_in_jaxmarl():
    from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

    assert set(smax.MAPS) <= set(MAP_NAME_TO_SCENARIO)


def test_bad_map_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        smax.check_task({"map_name": "NoSuchMap"})
    message = str(err.value)
    assert "\n" not in message and "--map_name" in message and "3m" in message
    with pytest.raises(ConfigError, match="--map_name"):
        load_config(["--env", "smax", "--map_name", "NoSuchMap"])
    assert smax.task_name({"map_name": "2s3z"}) == "2s3z"


@pytest.mark.slow
def test_spec_and_shapes_3m(env3m, run3m):
    spec = env3m.spec
    assert spec.name == "smax/3m" and spec.n_agents == 3 and spec.discrete
    assert spec.episode_metrics == ("win_rate",)
    assert all(a.obs_dim == 75 and a.action_dim == 8 and a.action_kind == "discrete"
               for a in spec.agents)
    assert spec.state_dim == 72 and spec.episode_limit == 101  # SMAX max_steps 100, +1
    first, steps = run3m
    E = N_ENVS
    for step in (first, steps[0]):
        assert step["obs"].shape == (3, E, 75) and step["obs"].dtype == np.float32
        assert step["state"].shape == (E, 72) and step["state"].dtype == np.float32
        assert step["avail"].shape == (3, E, 8) and step["avail"].dtype == bool
        assert step["active"].shape == (E, 3) and step["active"].dtype == bool
        assert step["reward"].shape == (E,) and step["reward"].dtype == np.float32
        assert step["terminated"].dtype == bool and step["truncated"].dtype == bool
        assert step["final_state"].shape == (E, 72) and step["final_obs"].shape == (3, E, 75)
    # At reset: everyone alive, stop always available, enemies out of range (masked).
    assert first["active"].all()
    assert first["avail"][:, :, STOP_ACTION].all()
    assert not first["avail"][:, :, 5:].any()
    # Distinct copies from one seed.
    assert not np.array_equal(first["state"][0], first["state"][1])


@pytest.mark.slow
def test_spec_heterogeneous_map(env2s3z_short):
    spec = env2s3z_short.spec
    assert spec.name == "smax/2s3z" and spec.n_agents == 5
    assert all(a.obs_dim == 127 and a.action_dim == 10 for a in spec.agents)
    assert spec.state_dim == 120
    step = env2s3z_short.reset(seed=0)
    assert [o.shape for o in step.obs] == [(4, 127)] * 5
    assert [m.shape for m in step.avail_actions] == [(4, 10)] * 5
    assert all(o.flags.c_contiguous for o in step.obs)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["random", "focus_fire"])
def test_episodes_complete_with_win_rate(which, run3m, run3m_focus, env3m):
    steps = run3m[1] if which == "random" else run3m_focus
    limit = env3m.spec.episode_limit
    n_allies = 3
    completed = [c for s in steps for c in s["completed"]]
    assert len(completed) >= N_ENVS  # every copy finished at least one episode
    for s in steps:
        done = s["terminated"] | s["truncated"]
        assert not (s["terminated"] & s["truncated"]).any()
        assert sorted(c["env"] for c in s["completed"]) == list(np.flatnonzero(done))
        for c in s["completed"]:
            k = c["env"]
            assert c["win_rate"] in (0.0, 1.0)
            assert 1 <= c["length"] <= limit
            if s["truncated"][k]:
                assert c["length"] == limit and c["win_rate"] == 0.0
            # A win ends with the win bonus in the last reward; a loss never reaches 1.
            assert (s["reward"][k] >= 1.0) == (c["win_rate"] == 1.0)
            # The final world state is the pre-reset one: the beaten team is all zeros,
            # while the new episode starts at full health.
            features = s["final_state"][k, :60].reshape(6, 10)
            ally_dead = not features[:n_allies].any()
            enemy_dead = not features[n_allies:].any()
            if c["win_rate"] == 1.0:  # every enemy dead, some ally alive
                assert s["terminated"][k] and enemy_dead and not ally_dead
            elif s["terminated"][k]:  # lost (or a draw: both teams wiped out)
                assert ally_dead
            fresh = s["state"][k, :60].reshape(6, 10)
            np.testing.assert_allclose(fresh[:, 0], 1.0)
            assert s["active"][k].all()
    if which == "focus_fire":
        assert any(c["win_rate"] == 1.0 for c in completed)


@pytest.mark.slow
def test_dead_agents_inactive(run3m):
    _, steps = run3m
    seen_dead = 0
    for s in steps:
        for e, i in np.argwhere(~s["active"]):
            seen_dead += 1
            assert not s["obs"][i, e].any()  # SMAX blanks a dead unit's observation
            expected = np.zeros(8, bool)
            expected[STOP_ACTION] = True  # stop is the only action left to the dead
            np.testing.assert_array_equal(s["avail"][i, e], expected)
        alive = s["active"]
        assert s["avail"][:, :, STOP_ACTION].all()
        # Alive agents can move somewhere (SMAX masks no movement of a living unit).
        assert s["avail"][:, :, :4].transpose(1, 0, 2).any(axis=2)[alive].all()
    assert seen_dead > 0


@pytest.mark.slow
def test_truncation_at_time_limit(env2s3z_short):
    env = env2s3z_short
    assert env.spec.episode_limit == 11
    steps = rollout(env, env.reset(seed=1), 25, seed=2)
    n_trunc = 0
    for s in steps:
        for c in s["completed"]:
            k = c["env"]
            if s["truncated"][k]:
                n_trunc += 1
                assert c["length"] == 11 and c["win_rate"] == 0.0
                # Both teams were alive in the final state (bootstrap from it).
                units = s["final_state"][k, :100].reshape(10, 10)
                assert units[:5, 0].any() and units[5:, 0].any()
                assert not np.array_equal(s["final_state"][k], s["state"][k])
            else:
                assert s["terminated"][k] and c["length"] <= 11
    assert n_trunc >= 4


@pytest.mark.slow
def test_same_seed_same_trajectory(env3m):
    a = rollout(env3m, env3m.reset(seed=3), 40, seed=9)
    b = rollout(env3m, env3m.reset(seed=3), 40, seed=9)
    assert_same(a, b)
    c = rollout(env3m, env3m.reset(seed=4), 5, seed=9)
    assert not np.array_equal(a[0]["state"], c[0]["state"])


@pytest.mark.slow
def test_get_state_set_state_exact_continuation(env3m):
    step = env3m.reset(seed=21)
    rng = np.random.default_rng(1)
    for _ in range(37):  # mid-episode for most copies
        step = env3m.step(random_available(step, rng))
    snapshot = pickle.loads(pickle.dumps(env3m.get_state()))
    uninterrupted = rollout(env3m, step, 90, seed=7)  # crosses episode ends
    env3m.reset(seed=99)  # wander off, as a new process would
    rollout(env3m, env3m.reset(seed=99), 3, seed=0)
    restored = env3m.set_state(snapshot)
    np.testing.assert_array_equal(np.stack(restored.obs), snapshot["obs"])
    np.testing.assert_array_equal(restored.state, snapshot["state"])
    resumed = rollout(env3m, restored, 90, seed=7)
    assert_same(uninterrupted, resumed)
    # Restored states keep their dtypes: no recompilation of the step function.
    assert env3m._step_fn._cache_size() == 1


@pytest.mark.slow
def test_set_state_rejects_other_map(env3m, env2s3z_short):
    env3m.reset(seed=0)
    with pytest.raises(ValueError):
        env2s3z_short.set_state(env3m.get_state())


@pytest.mark.slow
def test_out_of_range_action_rejected(env3m):
    env3m.reset(seed=0)
    with pytest.raises(ValueError, match="actions must lie"):
        env3m.step([np.full(N_ENVS, 8, np.int64)] * 3)


@pytest.mark.slow
def test_render(env3m):
    env3m.reset(seed=0)
    frame = env3m.render(0)
    assert frame.shape == (320, 320, 3) and frame.dtype == np.uint8
    blue = (frame[..., 2] > 150) & (frame[..., 0] < 120)
    red = (frame[..., 0] > 150) & (frame[..., 2] < 120)
    assert blue.sum() > 20 and red.sum() > 20


@pytest.mark.slow
def test_a_copys_trajectory_does_not_depend_on_n_envs():
    """Copy k's steps and episode starts depend only on (seed, k): the first two copies of
    a 4-copy env and of a 2-copy env play the same 4-step episodes (10 per copy)."""
    wide = SMAXVecEnv("3m", n_envs=4, seed=0, max_steps=3)
    narrow = SMAXVecEnv("3m", n_envs=2, seed=0, max_steps=3)
    a = rollout(wide, wide.reset(seed=5), 40, seed=0, policy=focus_fire)
    b = rollout(narrow, narrow.reset(seed=5), 40, seed=0, policy=focus_fire)
    assert sum(len(s["completed"]) for s in b) == 2 * 10
    for t, (x, y) in enumerate(zip(a, b)):
        for key in ("obs", "avail", "final_obs"):  # [N, E, ...]
            np.testing.assert_array_equal(x[key][:, :2], y[key], err_msg=f"step {t}: {key}")
        for key in ("state", "reward", "terminated", "truncated", "active", "final_state"):
            np.testing.assert_array_equal(x[key][:2], y[key], err_msg=f"step {t}: {key}")
    wide.close()
    narrow.close()


@pytest.mark.slow
def test_env_worker_processes_match_one_in_process_env():
    """4 copies over 2 worker processes (the second builds copies 2-3 as its own 0-1, with
    seed + 2) step exactly as 4 in-process copies with the same seed: a seed means the same
    episodes however the copies are split."""
    import dataclasses

    from envs.registry import make_vec_env

    config = dataclasses.replace(load_config(["--env", "smax", "--map_name", "3m"]),
                                 n_rollout_threads=4, n_env_workers=2)
    workers = make_vec_env(config, 4, seed=5)
    local = SMAXVecEnv("3m", n_envs=4, seed=5)
    try:
        assert_same(rollout(workers, workers.reset(seed=5), 30, seed=0, policy=focus_fire),
                    rollout(local, local.reset(seed=5), 30, seed=0, policy=focus_fire))
    finally:
        workers.close()
        local.close()


@pytest.mark.slow
def test_any_integer_seed_works(env3m):
    """Seeds wrap modulo 2**32 (render takes any --seed; evaluation seeds exceed 2**32)."""
    below, wrapped = copy_step(env3m.reset(seed=-1)), copy_step(env3m.reset(seed=2**32 - 1))
    assert_same([below], [wrapped])
    assert_same([copy_step(env3m.reset(seed=3 + 2**40))], [copy_step(env3m.reset(seed=3 + 2**40))])
