"""The one rollout buffer: preallocated tensors for one iteration of ``T`` steps of ``E``
envs (``N`` agents, ``K`` critics), filled in place by the runner, read by the algorithm.
"""
from __future__ import annotations

import torch

from envs.base import EnvSpec


class RolloutBuffer:
    """Storage ``[T, E, ...]`` (lists are per agent, since agents' sizes may differ).

    obs[i] [T, E, obs_dim_i]; actions[i] [T, E, act_dim_i] float32 or [T, E] int64;
    avail[i] [T, E, n_actions_i] bool (discrete) or None; log_probs [T, E, N];
    active [T, E, N] bool; state [T, E, S]; rewards [T, E]; terminated, truncated [T, E]
    bool (the step taken at t ended the episode); values [T+1, E, K] (critic outputs,
    values[T] bootstraps the cut); final_values [T, E, K] = V(final state) where
    truncated; final_state [T, E, S] / final_obs[i] [T, E, obs_dim_i], the last
    observations of truncated episodes, kept for a feed-forward critic that evaluates the
    rollout in one batch afterwards (None for recurrent critics); starts [T+1, E] bool
    (obs[t] opens an episode: recurrent states reset);
    actor_hidden [T, E, N, n, H] / critic_hidden [T, E, K, n, H], the recurrent states
    before step t (None for feed-forward networks).
    """

    def __init__(self, spec: EnvSpec, T: int, E: int, n_critics: int,
                 hidden_shape: tuple[int, int], recurrent: bool, device: torch.device):
        N, K = spec.n_agents, n_critics
        z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.T, self.E = T, E
        self.obs = [z(T, E, a.obs_dim) for a in spec.agents]
        self.actions = [z(T, E, dtype=torch.int64) if a.action_kind == "discrete" else z(T, E, a.action_dim)
                        for a in spec.agents]
        self.avail = [z(T, E, a.action_dim, dtype=torch.bool) for a in spec.agents] if spec.discrete else None
        self.log_probs = z(T, E, N)
        self.active = z(T, E, N, dtype=torch.bool)
        self.state = z(T, E, spec.state_dim)
        self.rewards = z(T, E)
        self.terminated = z(T, E, dtype=torch.bool)
        self.truncated = z(T, E, dtype=torch.bool)
        self.values = z(T + 1, E, K)
        self.final_values = z(T, E, K)
        self.starts = z(T + 1, E, dtype=torch.bool)
        self.final_state = None if recurrent else z(T, E, spec.state_dim)
        self.final_obs = None if recurrent else [z(T, E, a.obs_dim) for a in spec.agents]
        self.actor_hidden = z(T, E, N, *hidden_shape) if recurrent else None
        self.critic_hidden = z(T, E, K, *hidden_shape) if recurrent else None
