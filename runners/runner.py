"""The runner of the on-policy family (HAPPO / HATRPO / MAPPO / IPPO), for every environment family.

Per iteration: collect ``episode_length`` steps of ``n_rollout_threads`` envs into the
rollout buffer (one batched forward per actor per step), then let the algorithm train on it
(GAE and the sequential update live in the algorithm). The run loop, evaluation, logging,
checkpoints and exits are runners/base.py's; this file holds the rollout and what it
carries between steps (masks, alive agents, episode starts, recurrent states).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.base import NumericalError
from algorithms.registry import make_algorithm
from envs.base import EnvError, EnvStep
from runners.base import BaseRunner, Interrupted, non_finite
from utils.buffer import RolloutBuffer
from utils.checkpoint import save_checkpoint


class Runner(BaseRunner):
    def _build(self) -> None:
        config, device = self.config, self.device
        E, T = config.n_rollout_threads, config.episode_length
        self.algo = make_algorithm(config, self.spec, device)
        recurrent = config.use_recurrent_policy
        self.buffer = RolloutBuffer(self.spec, T, E, self.algo.n_critics, self.algo.hidden_shape, recurrent, device)
        N, K = self.spec.n_agents, self.algo.n_critics
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.avail = [z(E, a.action_dim, dtype=torch.bool) for a in self.spec.agents] if self.spec.discrete else None
        self.active = z(E, N, dtype=torch.bool)
        self.starts = torch.ones(E, dtype=torch.bool, device=device)
        self.actor_hidden = z(E, N, *self.algo.hidden_shape) if recurrent else None
        self.critic_hidden = z(E, K, *self.algo.hidden_shape) if recurrent else None

    # -- state for checkpoints ---------------------------------------------------------------
    def _clone(self, x):
        return None if x is None else x.detach().clone().cpu()

    def resume_point(self) -> dict[str, Any]:
        return {**super().resume_point(),
                "carry": {"starts": self._clone(self.starts), "actor_hidden": self._clone(self.actor_hidden),
                          "critic_hidden": self._clone(self.critic_hidden), "active": self._clone(self.active)}}

    def save(self, point: dict[str, Any]) -> Path:
        payload = {"config": self.config.to_dict(), "algorithm": self.algo.state_dict(), **point}
        return save_checkpoint(self.run_dir, payload)

    def _restore_point(self, point: dict[str, Any]) -> None:
        super()._restore_point(point)
        if point["env"] is None:  # fresh episodes (the env cannot snapshot)
            self.starts.fill_(True)
        else:
            self.starts.copy_(point["carry"]["starts"])
        for name in ("actor_hidden", "critic_hidden"):
            saved, live = point["carry"][name], getattr(self, name)
            if saved is not None and live is not None:
                live.copy_(saved)

    def handle_env_failure(self, exc: EnvError, point: dict[str, Any]) -> None:
        super().handle_env_failure(exc, point)
        self.starts[exc.env_index] = True  # a fresh episode: recurrent states start over

    # -- collection ----------------------------------------------------------------------------
    def _take_step(self, step: EnvStep) -> None:
        super()._take_step(step)
        if self.avail is not None:
            for dst, src in zip(self.avail, step.avail_actions):
                dst.copy_(torch.from_numpy(src))
        self.active.copy_(torch.from_numpy(step.active))

    def _check_finite(self, step: EnvStep, t: int) -> None:
        steps = self.env_steps + (t + 1) * self.config.n_rollout_threads
        bad = non_finite(step)
        if bad is not None:
            what, env = bad
            raise NumericalError(f"non-finite {what} from env {env} at env step {steps} "
                                 f"(collecting for update {self.iteration + 1})")
        # With no action available the masked policy would sample among unavailable ones.
        for i, avail in enumerate(step.avail_actions or ()):
            none = ~avail.any(axis=1)
            if none.any():
                raise NumericalError(f"agent {i} has no available action in env {np.flatnonzero(none)[0]} at "
                                     f"env step {steps} (an env keeps at least one, e.g. a no-op for dead agents)")

    def collect(self) -> None:
        buf, algo, E = self.buffer, self.algo, self.config.n_rollout_threads
        clock = time.perf_counter
        # A feed-forward critic evaluates the whole rollout in one batch at the end
        # (``fill_values``); a recurrent one must step along with the actors.
        per_step_values = not algo.batched_values
        # The rollout's small forwards gain nothing from intra-op threads, and a spare
        # core may be running the critic's update: one thread here (docs/performance.md).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._collect_steps(per_step_values)
        finally:
            torch.set_num_threads(threads)
        t0 = clock()
        algo.wait_for_critics()  # the previous iteration's critic update, if still running
        t1 = clock()
        if per_step_values:
            buf.values[-1] = algo.values(self.state, self.obs, self.critic_hidden, self.starts)[0]
        else:
            algo.fill_values(buf, self.state, self.obs)
        self.phase["update_s"] += t1 - t0
        self.phase["inference_s"] += clock() - t1
        buf.starts[-1] = self.starts
        self.env_steps += self.config.episode_length * E

    def _collect_steps(self, per_step_values: bool) -> None:
        buf, algo, env = self.buffer, self.algo, self.env
        clock = time.perf_counter
        values = critic_next = None
        for t in range(self.config.episode_length):
            t0 = clock()
            if per_step_values:
                values, critic_next = algo.values(self.state, self.obs, self.critic_hidden, self.starts)
            actions, log_probs, actor_next = algo.act(self.obs, self.avail, self.actor_hidden, self.starts)
            t1 = clock()
            for i in range(self.spec.n_agents):
                buf.obs[i][t] = self.obs[i]
                buf.actions[i][t] = actions[i]
                if buf.avail is not None:
                    buf.avail[i][t] = self.avail[i]
            buf.state[t] = self.state
            buf.log_probs[t] = log_probs
            buf.active[t] = self.active
            if per_step_values:
                buf.values[t] = values
            buf.starts[t] = self.starts
            if buf.actor_hidden is not None:
                buf.actor_hidden[t] = self.actor_hidden
                buf.critic_hidden[t] = self.critic_hidden
            np_actions = [a.cpu().numpy() for a in actions]
            t2 = clock()
            step = env.step(np_actions)
            t3 = clock()
            self._check_finite(step, t)
            buf.rewards[t] = torch.from_numpy(step.reward)
            terminated = torch.from_numpy(step.terminated)
            truncated = torch.from_numpy(step.truncated)
            buf.terminated[t] = terminated
            buf.truncated[t] = truncated
            if step.truncated.any():  # bootstrap the time limit from V(final state)
                rows = np.flatnonzero(step.truncated)
                final_state = torch.from_numpy(step.final_state[rows]).to(self.device)
                final_obs = [torch.from_numpy(o[rows]).to(self.device) for o in step.final_obs]
                if per_step_values:
                    hidden = None if critic_next is None else critic_next[rows]
                    v, _ = algo.values(final_state, final_obs, hidden,
                                       torch.zeros(len(rows), dtype=torch.bool, device=self.device))
                    buf.final_values[t, rows] = v
                else:
                    buf.final_state[t, rows] = final_state
                    for i, o in enumerate(final_obs):
                        buf.final_obs[i][t, rows] = o
            self.recent_episodes.extend(step.completed)
            self._take_step(step)
            self.starts = (terminated | truncated).to(self.device)
            self.actor_hidden, self.critic_hidden = actor_next, critic_next
            t4 = clock()
            self.phase["inference_s"] += t1 - t0
            self.phase["env_s"] += t3 - t2
            self.phase["buffer_s"] += (t2 - t1) + (t4 - t3)
            if self.stop_signal is not None:
                raise Interrupted()

    # -- training / logging --------------------------------------------------------------------
    def learn(self) -> dict[str, float]:
        """Train the algorithm on the rollout just collected."""
        cfg = self.config
        self.algo.iteration = self.iteration + 1
        # The budget spent before this rollout: update k of K uses lr (1 - k/K), from
        # the full lr at the first update down to lr / K at the last (HARL's schedule).
        before = self.env_steps - cfg.episode_length * cfg.n_rollout_threads
        self.algo.set_progress(before / cfg.num_env_steps)
        return self.algo.train(self.buffer, defer_critic=True)

    def window_columns(self) -> dict[str, float]:
        """Diagnostics of every update since the last row: keys ending in ``_max`` / ``_min``
        keep the extreme (e.g. HATRPO's ``kl_max``: the largest KL of any accepted step),
        the rest the mean over updates."""
        out = {}
        for key, values in self.window_stats.items():
            reduce = max if key.endswith("_max") else min if key.endswith("_min") else np.mean
            out[key] = float(reduce(values))
        return out

    def final_policy_evaluated(self) -> bool:
        if self.last_eval.get("env_steps") is None:
            # A checkpoint saved before evaluations recorded their env steps: its policy was
            # evaluated at its last update, unless resumed with --num_env_steps below the
            # steps already done (the policy being reported may not have been evaluated).
            return self.config.num_env_steps >= self.env_steps
        return super().final_policy_evaluated()
