"""Test-only environment family ``faulty``: the real MaMuJoCo VecEnv plus injected faults.

Register it in-process with
``monkeypatch.setitem(envs.registry.FAMILIES, "faulty", "tests.faulty_env")`` and train
with ``--env faulty`` and the usual MaMuJoCo flags (``--scenario``, ``--agent_conf``, ...).

Faults are read from the module-level list ``FAULTS`` (in-process tests) or, when that is
empty, from the environment variable ``FAULTY_ENV_FAULTS`` (a JSON list, for
subprocesses). Each fault is a dict:

    kind   "raise"       the simulator of copy ``env`` raises (the MaMuJoCo adapter turns
                         that into an EnvError naming the copy and its seed)
           "nan_obs"     agent ``agent``'s observation of copy ``env`` becomes NaN
           "nan_reward"  copy ``env``'s reward becomes NaN
           "nan_state"   copy ``env``'s global state becomes NaN
    step   fire on this call of ``step()`` (1-based, counted per VecEnv instance, i.e. per
           process for the training env: ``set_state`` does not rewind it)
    env    the copy (default 0); agent (default 0) for nan_obs
    times  how many times it may fire in this process (default 1)
    eval   also inject into evaluation envs (default False); "only": into them alone

Every fault that fired is appended to ``FIRED`` (a copy of the fault plus ``"at"``).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from envs import mamujoco
from envs.base import EnvStep, VecEnv

FAULTS: list[dict[str, Any]] = []
FIRED: list[dict[str, Any]] = []
FIRED_COUNTS: dict[int, int] = {}  # fault index -> times fired in this process (all instances)
KINDS = ("raise", "nan_obs", "nan_reward", "nan_state")


def task_name(values: dict[str, Any]) -> str:
    return mamujoco.task_name(values)


def check_task(values: dict[str, Any]) -> None:
    mamujoco.check_task(values)


def reset_faults(*faults: dict[str, Any]) -> None:
    """Replace the configured faults (and forget which fired)."""
    FAULTS[:] = [dict(f) for f in faults]
    FIRED.clear()
    FIRED_COUNTS.clear()
    for f in FAULTS:
        if f.get("kind") not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}; got {f.get('kind')!r}")


def _configured() -> list[dict[str, Any]]:
    if FAULTS:
        return FAULTS
    text = os.environ.get("FAULTY_ENV_FAULTS", "")
    if not text:
        return []
    faults = json.loads(text)
    reset_faults(*faults)
    return FAULTS


class _CrashingSimulation:
    """Replaces one copy's simulator (``do_simulation``, which gymnasium's ``step`` and the
    batched step both call) for a single call, raising like a dying simulator."""

    def __init__(self, raw_env, message: str):
        self.raw_env, self.message = raw_env, message

    def __call__(self, *args, **kwargs):
        del self.raw_env.do_simulation  # one shot: the class's method again
        raise RuntimeError(self.message)


class FaultyVecEnv(VecEnv):
    def __init__(self, inner: mamujoco.MaMuJoCoVecEnv, evaluation: bool):
        self.inner, self.evaluation = inner, evaluation
        self.spec, self.n_envs = inner.spec, inner.n_envs
        self.steps = 0  # step() calls on this instance

    def _due(self) -> list[tuple[int, dict[str, Any]]]:
        due = []
        for n, fault in enumerate(_configured()):
            if self.evaluation and not fault.get("eval", False):
                continue
            if not self.evaluation and fault.get("eval") == "only":
                continue
            if int(fault["step"]) != self.steps or FIRED_COUNTS.get(n, 0) >= int(fault.get("times", 1)):
                continue
            FIRED_COUNTS[n] = FIRED_COUNTS.get(n, 0) + 1
            FIRED.append({**fault, "at": self.steps})
            due.append((n, fault))
        return due

    def reset(self, seed: int) -> EnvStep:
        return self.inner.reset(seed)

    def step(self, actions: list[np.ndarray]) -> EnvStep:
        self.steps += 1
        due = self._due()
        for _, fault in due:
            if fault["kind"] == "raise":
                k = int(fault.get("env", 0))
                raw = self.inner._raw[k]
                raw.do_simulation = _CrashingSimulation(raw, f"injected simulator crash at step {self.steps}")
        out = self.inner.step(actions)
        for _, fault in due:
            k = int(fault.get("env", 0))
            if fault["kind"] == "nan_obs":
                i = int(fault.get("agent", 0))
                out.obs = [o.copy() for o in out.obs]
                out.obs[i][k, 0] = np.nan
            elif fault["kind"] == "nan_reward":
                out.reward = out.reward.copy()
                out.reward[k] = np.nan
            elif fault["kind"] == "nan_state":
                out.state = out.state.copy()
                out.state[k, 0] = np.nan
        return out

    def get_state(self) -> Any:
        return self.inner.get_state()

    def set_state(self, snapshot: Any) -> EnvStep:
        return self.inner.set_state(snapshot)

    def restart(self, env_index: int):
        return self.inner.restart(env_index)

    def render(self, env_index: int = 0) -> np.ndarray:
        return self.inner.render(env_index)

    def close(self) -> None:
        self.inner.close()


def make_vec_env(config, n_envs: int, seed: int, evaluation: bool = False, **kwargs) -> VecEnv:
    return FaultyVecEnv(mamujoco.make_vec_env(config, n_envs=n_envs, seed=seed, evaluation=evaluation, **kwargs),
                        evaluation)
