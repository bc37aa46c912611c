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
    which may be unavailable at a given step). The Gaussian policy's samples are not
    bounded: a continuous env clips the actions it receives to its own bounds.
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
    episode_limit: int  # informational (longest episode); the runner does not read it
    # Extra per-episode metrics the env reports in EnvStep.completed (e.g. ("win_rate",)):
    # every completed record carries each of them; they become train_/eval_<name> columns.
    episode_metrics: tuple[str, ...] = ()

    def __post_init__(self):
        kinds = {a.action_kind for a in self.agents}
        if len(kinds) != 1 or not kinds <= {"continuous", "discrete"}:
            raise ValueError(f"{self.name}: every agent's action_kind must be 'continuous', or every "
                             f"agent's 'discrete'; got {[a.action_kind for a in self.agents]}")

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
    avail_actions[i]:  [E, n_actions_i] bool (discrete envs), else None; every row has at
                       least one True (a dead agent keeps a no-op available)
    reward:            [E] float32, shared team reward of the step that led here
    terminated:        [E] bool, the episode ended for real (no bootstrap)
    truncated:         [E] bool, the episode was cut (time limit): bootstrap from final_*
    active:            [E, N] bool, agent alive in ``obs`` (dead agents are masked out)
    final_state:       [E, state_dim] the state after the last step of the episode that
                       just ended, before the auto-reset; only rows where
                       terminated | truncated mean anything (others: any values)
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
        """Reset every copy, reseeding everything; copy ``k`` draws from ``seed + k`` alone.

        That makes results independent of ``--n_env_workers``: worker ``w`` builds its
        copies with ``seed + w * n_local`` (MaMuJoCo seeds copy ``k`` with ``seed + k``,
        SMAX keys it with ``PRNGKey(seed + k)``). Evaluation calls ``reset(seed)`` before
        each evaluation, which makes it repeatable.
        """

    @abstractmethod
    def step(self, actions: list[np.ndarray]) -> EnvStep:
        """Apply one action per agent and env.

        actions[i]: [E, action_dim_i] float32 (continuous) or [E] int64 (discrete).
        Raises ``EnvError`` naming the failing copy if an environment fails.
        """

    @abstractmethod
    def get_state(self) -> Any:
        """A picklable snapshot (simulator state, RNGs, episode counters) for exact resume.

        Independent copies, never views of live buffers: the runner takes one at the start
        of every iteration (so keep it cheap) and may save it after the env has moved on
        (Ctrl-C mid-rollout). ``None`` means the env cannot snapshot (real SMAC): a resumed
        run then starts fresh episodes.
        """

    @abstractmethod
    def set_state(self, snapshot: Any) -> EnvStep:
        """Restore ``get_state()``'s snapshot; returns the current step (obs, state, masks)
        with reward and flags cleared (episode starts come from the checkpoint)."""

    def restart(self, env_index: int) -> EnvStep:
        """Rebuild copy ``env_index`` after a failure (fresh episode); returns the current
        step of all copies. Optional."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart a single environment")

    def render(self, env_index: int = 0) -> np.ndarray:
        """An RGB frame [H, W, 3] uint8 of copy ``env_index``. Optional."""
        raise NotImplementedError(f"{type(self).__name__} does not render")

    def close(self) -> None:
        pass


class StepBuffers:
    """The preallocated arrays behind every ``EnvStep`` of ``n_envs`` copies of a task.

    Adapters write into these in place and hand out ``step()`` (views, no copies). Where
    all agents share one observation (action) size, ``obs_block`` / ``final_obs_block`` /
    ``avail_block`` are single ``[N, E, ...]`` arrays whose rows are the per-agent views,
    so a batched simulator can fill them with one copy; otherwise they are None.
    """

    def __init__(self, spec: EnvSpec, n_envs: int):
        E, N = n_envs, spec.n_agents

        def per_agent(dims: list[int], dtype):
            if len(set(dims)) == 1:
                block = np.zeros((N, E, dims[0]), dtype)
                return block, list(block)
            return None, [np.zeros((E, d), dtype) for d in dims]

        obs_dims = [a.obs_dim for a in spec.agents]
        self.obs_block, self.obs = per_agent(obs_dims, np.float32)
        self.final_obs_block, self.final_obs = per_agent(obs_dims, np.float32)
        self.avail_block, self.avail = None, None
        if spec.discrete:
            self.avail_block, self.avail = per_agent([a.action_dim for a in spec.agents], np.bool_)
        self.state = np.zeros((E, spec.state_dim), np.float32)
        self.final_state = np.zeros((E, spec.state_dim), np.float32)
        self.reward = np.zeros(E, np.float32)
        self.terminated = np.zeros(E, bool)
        self.truncated = np.zeros(E, bool)
        self.active = np.ones((E, N), bool)

    def clear_flags(self) -> None:
        """After a reset / restore: no reward, no episode ended."""
        self.reward[:] = 0
        self.terminated[:] = False
        self.truncated[:] = False

    def step(self, completed: list[dict[str, Any]] | None = None) -> EnvStep:
        return EnvStep(obs=self.obs, state=self.state, avail_actions=self.avail, reward=self.reward,
                       terminated=self.terminated, truncated=self.truncated, active=self.active,
                       final_state=self.final_state, final_obs=self.final_obs, completed=completed or [])

