"""The one interface every environment family implements.

A ``VecEnv`` steps ``n_envs`` copies of a cooperative task at once and returns an
``EnvStep`` of numpy arrays batched over environments. Agents may differ in observation
and action sizes, so per-agent arrays come as lists indexed by agent. Environments
reset themselves when an episode ends (auto-reset); the observation returned for such an
env is the first one of the new episode, and the last state of the finished episode is
kept in ``final_state`` / ``final_obs`` so that a truncated episode can be bootstrapped.

Arrays in an ``EnvStep`` may be buffers owned by the env and overwritten by the next
``step``/``reset``: copy what you keep.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class EnvError(RuntimeError):
    """An environment raised or died while stepping. ``env_index`` says which copy."""

    def __init__(self, message: str, env_index: int | None = None, seed: int | None = None):
        super().__init__(message)
        self.env_index = env_index
        self.seed = seed


@dataclass(frozen=True)
class AgentSpec:
    """What one agent sees and does.

    ``action_kind`` is ``"continuous"`` (a Box of ``action_dim`` dims bounded by
    ``action_low``/``action_high``) or ``"discrete"`` (``action_dim`` choices, some of
    which may be unavailable at a given step).
    """

    obs_dim: int
    action_kind: str
    action_dim: int
    action_low: float = -1.0
    action_high: float = 1.0


@dataclass(frozen=True)
class EnvSpec:
    """Static description of a task, shared by all its vectorised copies."""

    name: str  # e.g. "mamujoco/HalfCheetah-2x3", "smax/3m"
    agents: tuple[AgentSpec, ...]
    state_dim: int
    episode_limit: int
    # Extra per-episode metrics the env reports in EnvStep.completed (e.g. ("won",)).
    episode_metrics: tuple[str, ...] = ()

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def discrete(self) -> bool:
        return self.agents[0].action_kind == "discrete"


@dataclass
class EnvStep:
    """One step of ``n_envs`` environments (E = n_envs, N = n_agents).

    obs[i]:            [E, obs_dim_i] float32, agent i's observation
    state:             [E, state_dim] float32, the global state
    avail_actions[i]:  [E, n_actions_i] bool (discrete envs), else None
    reward:            [E] float32, shared team reward of the step that led here
    terminated:        [E] bool, the episode ended for real (no bootstrap)
    truncated:         [E] bool, the episode was cut (time limit): bootstrap from final_*
    active:            [E, N] bool, agent alive in ``obs`` (dead agents are masked out)
    final_state:       [E, state_dim] last state of the episode that just ended
                       (rows valid where terminated | truncated)
    final_obs[i]:      [E, obs_dim_i] likewise for local observations
    completed:         one dict per episode finished this step:
                       {"env": index, "return": float, "length": int, <episode_metrics>}
    """

    obs: list[np.ndarray]
    state: np.ndarray
    avail_actions: list[np.ndarray] | None
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    active: np.ndarray
    final_state: np.ndarray
    final_obs: list[np.ndarray]
    completed: list[dict[str, Any]] = field(default_factory=list)


class VecEnv(ABC):
    """``n_envs`` copies of one task, stepped together (auto-reset)."""

    spec: EnvSpec
    n_envs: int

    @abstractmethod
    def reset(self, seed: int) -> EnvStep:
        """Reset every copy; copy ``k`` is seeded from ``seed`` and ``k`` (distinct, reproducible)."""

    @abstractmethod
    def step(self, actions: list[np.ndarray]) -> EnvStep:
        """Apply one action per agent and env.

        actions[i]: [E, action_dim_i] float32 (continuous) or [E] int64 (discrete).
        Raises ``EnvError`` naming the failing copy if an environment fails.
        """

    @abstractmethod
    def get_state(self) -> Any:
        """A picklable snapshot (simulator state, RNGs, episode counters) for exact resume."""

    @abstractmethod
    def set_state(self, snapshot: Any) -> EnvStep:
        """Restore ``get_state()``'s snapshot; returns the current step (obs, state, masks)."""

    def restart(self, env_index: int) -> None:
        """Rebuild copy ``env_index`` after a failure (fresh episode). Optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart a single environment")

    def render(self, env_index: int = 0) -> np.ndarray:
        """An RGB frame [H, W, 3] uint8 of copy ``env_index``. Optional."""
        raise NotImplementedError(f"{type(self).__name__} does not render")

    def close(self) -> None:
        pass
