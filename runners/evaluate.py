"""Deterministic evaluation of the current policies on a separate vectorised env."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from algorithms.registry import make_algorithm
from envs.base import VecEnv

EVAL_SEED_TAG = 0x4556414C  # "EVAL": keeps evaluation seeds apart from any other hashed seed


def env_seed(config) -> int:
    """Base seed of a run's training envs (copy k adds k)."""
    return int(config.seed) * 10_007


def eval_seed(config, iteration: int = 0) -> int:
    """Base seed of the evaluation envs at ``iteration`` (copy k adds k).

    The training run, ``--eval_only`` and ``render`` of the same checkpoint all evaluate on
    the same episodes. Each evaluation gets its own hashed base in [0, 2**31): with
    consecutive bases (base + iteration), evaluations 25 iterations apart with 64 copies
    shared 39 copy seeds, so successive points of an evaluation curve replayed mostly the
    same start positions and their errors were correlated.
    """
    words = [int(config.seed) & 0xFFFF_FFFF_FFFF_FFFF, EVAL_SEED_TAG, int(iteration)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0] >> 1)


def policy_from_checkpoint(checkpoint: dict, config, spec, device):
    """The algorithm of ``config`` with a checkpoint's weights (no optimiser state)."""
    algo = make_algorithm(config, spec, device)
    algo.load_state_dict(checkpoint["algorithm"], weights_only=True)
    return algo


def to_torch(step, device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    # The same dtypes as the runner's buffers, whatever the env hands out (e.g. float64 obs).
    obs = [torch.as_tensor(o, dtype=torch.float32, device=device) for o in step.obs]
    avail = (None if step.avail_actions is None
             else [torch.as_tensor(a, dtype=torch.bool, device=device) for a in step.avail_actions])
    return obs, avail


@torch.no_grad()
def evaluate(algo, env: VecEnv, n_episodes: int, seed: int,
             on_frame: Callable[[np.ndarray], None] | None = None) -> dict[str, float]:
    """Run ``n_episodes`` greedy episodes (each env contributes its first episodes in turn).

    Returns ``eval_return`` (mean), ``eval_return_std``, ``eval_length`` and the mean of
    every episode metric the env reports as ``eval_<metric>`` (e.g. ``eval_win_rate``).
    ``on_frame`` receives an RGB frame of env 0 after every step (rendering).
    """
    device = algo.device
    E, N = env.n_envs, env.spec.n_agents
    per_env = -(-n_episodes // E)
    step = env.reset(seed)
    hidden = None
    if algo.chunk_length is not None:
        hidden = torch.zeros(E, N, *algo.hidden_shape, device=device)
    starts = torch.ones(E, dtype=torch.bool, device=device)
    done_counts = np.zeros(E, dtype=np.int64)
    episodes: list[list[dict]] = [[] for _ in range(E)]
    if on_frame is not None:
        on_frame(env.render(0))
    while (done_counts < per_env).any():
        obs, avail = to_torch(step, device)
        actions, _, hidden = algo.act(obs, avail, hidden, starts, deterministic=True)
        step = env.step([a.cpu().numpy() for a in actions])
        if on_frame is not None and done_counts[0] < per_env:
            on_frame(env.render(0))
        starts = torch.as_tensor(step.terminated | step.truncated, device=device)
        for record in step.completed:
            k = record["env"]
            if done_counts[k] < per_env:
                episodes[k].append(record)
            done_counts[k] += 1
    chosen = [ep for round_ in range(per_env) for k in range(E) for ep in episodes[k][round_:round_ + 1]]
    chosen = chosen[:n_episodes]
    returns = np.array([ep["return"] for ep in chosen])
    result = {"eval_return": float(returns.mean()), "eval_return_std": float(returns.std()),
              "eval_length": float(np.mean([ep["length"] for ep in chosen]))}
    for metric in env.spec.episode_metrics:
        result[f"eval_{metric}"] = float(np.mean([ep[metric] for ep in chosen]))
    return result
