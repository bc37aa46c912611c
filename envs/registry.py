"""The only place that knows which environment families exist (docs/extending.md: how to add one).

Each family is a module exposing ``task_name(values)``, ``check_task(values)`` and
``make_vec_env(config, n_envs, seed, evaluation)``; modules are imported on first use so
that, say, MaMuJoCo users never import JAX.
"""
from __future__ import annotations

import difflib
import functools
import importlib
from typing import Any

from envs.workers import WorkerVecEnv
from utils.errors import ConfigError

FAMILIES = {
    "mamujoco": "envs.mamujoco",
    "smax": "envs.smax",
    "smac": "envs.smac",
}


# The flags that pick a task in each family; given for another family they would be ignored.
TASK_FLAGS = {
    "mamujoco": ("scenario", "agent_conf", "agent_obsk", "obs_mode"),
    "smax": ("map_name",),
    "smac": ("map_name",),
}


def check_task_flags(env: str, given: Any) -> None:
    """Raise ConfigError for a task flag (among ``given`` names) that ``env`` does not read."""
    own = TASK_FLAGS.get(env)
    if own is None:
        return
    for name in given:
        if name not in own and any(name in flags for flags in TASK_FLAGS.values()):
            raise ConfigError(f"--{name} does not apply to --env {env} (it takes "
                              f"{', '.join('--' + f for f in own)})")


def family(name: str):
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), FAMILIES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown environment family {name!r} (known: {', '.join(FAMILIES)}){hint}",
                          field="env")
    return importlib.import_module(FAMILIES[name])


def task_name(values: dict[str, Any]) -> str:
    """File-system-safe task label, e.g. ``HalfCheetah-2x3`` or ``3m``."""
    return family(values["env"]).task_name(values)


def check_task(values: dict[str, Any]) -> None:
    """Raise ConfigError if the scenario / map / agent configuration does not exist."""
    family(values["env"]).check_task(values)


def _make_in_process(config, n_envs: int, seed: int, evaluation: bool = False, **kwargs):
    return family(config.env).make_vec_env(config, n_envs=n_envs, seed=seed,
                                           evaluation=evaluation, **kwargs)


def make_vec_env(config, n_envs: int, seed: int, evaluation: bool = False, **kwargs):
    """Build ``n_envs`` copies of ``config``'s task (see envs.base.VecEnv).

    Training envs are split over ``config.n_env_workers`` processes when it is > 1
    (envs.workers); evaluation and rendering envs always run in-process.
    """
    workers = getattr(config, "n_env_workers", 1)
    if workers > 1 and not evaluation and not kwargs:
        return WorkerVecEnv(functools.partial(_make_in_process, config), n_envs, workers, seed,
                            timeout=getattr(config, "env_worker_timeout", 0.0))
    return _make_in_process(config, n_envs, seed, evaluation, **kwargs)
