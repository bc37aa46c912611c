"""The runner of the off-policy family (HATD3 / HADDPG / MATD3 / MADDPG).

One iteration: ``train_interval`` vector env steps into the replay buffer (uniform random
actions for the first ``warmup_steps`` env steps, then the actors with exploration noise;
one batched forward per actor per step, for all envs), then
``round(train_interval * update_per_train)`` gradient updates once warm-up is over and the
buffer holds a batch; then log, evaluate and checkpoint on their intervals: the run loop,
evaluation, logging and exits are runners/base.py's, shared with the on-policy
``runners.runner.Runner`` (same public interface and run files: metrics.csv, summary.json,
checkpoints/last.pt).

Exact resume: everything collection changes (env state, RNGs, the buffer's ring cursor)
is taken at each iteration start (the "resume point"); an interruption mid-collection
saves that point, and the rows written since are rewritten identically by the replayed
steps before anything samples them. The buffer itself is saved incrementally under
``checkpoints/replay/`` (utils/replay.py), its manifest inside ``last.pt``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.base import NumericalError
from algorithms.registry import make_algorithm
from envs.base import EnvStep
from runners.base import BaseRunner, Interrupted, non_finite
from utils.checkpoint import checkpoint_path, save_checkpoint
from utils.errors import ConfigError
from utils.replay import ReplayBuffer

REPLAY_DIR = "replay"  # inside the checkpoint directory


class OffPolicyRunner(BaseRunner):
    def _build(self) -> None:
        cfg, device = self.config, self.device
        E = cfg.n_rollout_threads
        self.algo = make_algorithm(cfg, self.spec, device)  # refuses discrete actions
        try:
            self.buffer = ReplayBuffer(self.spec, cfg.buffer_size, E, cfg.n_step, cfg.gamma, cfg.batch_size,
                                       device, seed=cfg.seed, proper_time_limits=cfg.use_proper_time_limits)
        except ValueError as exc:
            raise ConfigError(f"--buffer_size: {exc}") from None
        if self.buffer.max_sampleable < cfg.batch_size:
            raise ConfigError(f"--batch_size {cfg.batch_size} is more than the {self.buffer.max_sampleable} "
                              f"transitions a --buffer_size {cfg.buffer_size} buffer can sample with --n_step "
                              f"{cfg.n_step} and {E} envs; raise --buffer_size or lower --batch_size")
        self.n_updates = round(cfg.train_interval * cfg.update_per_train)
        if self.n_updates < 1:
            raise ConfigError(f"--train_interval {cfg.train_interval} x --update_per_train {cfg.update_per_train} "
                              "rounds to no gradient update per iteration; raise either")

    # -- state for checkpoints ---------------------------------------------------------------
    def resume_point(self) -> dict[str, Any]:
        """The base's, with what collection changes here: the exploration noise's RNG and
        the buffer's ring cursor."""
        return {**super().resume_point(), "explore_rng": self.algo.explore_rng.get_state(),
                "buffer_cursor": self.buffer.cursor}

    def save(self, point: dict[str, Any]) -> Path:
        """Changed replay chunks first, then ``last.pt`` (holding the buffer's manifest) by one
        atomic rename, then the chunk files no longer named; see utils/replay.py."""
        replay_dir = checkpoint_path(self.run_dir).parent / REPLAY_DIR
        manifest = self.buffer.write_chunks(replay_dir, cursor=point["buffer_cursor"])
        payload = {"config": self.config.to_dict(), "algorithm": self.algo.state_dict(), "replay": manifest,
                   **point}
        path = save_checkpoint(self.run_dir, payload)
        self.buffer.prune(replay_dir, manifest)
        return path

    def _restore(self, ckpt: dict[str, Any]) -> None:
        # The buffer first: its manifest's cursor is then rolled back to the resume point's.
        self.buffer.load(checkpoint_path(self.run_dir).parent / REPLAY_DIR, ckpt["replay"])
        super()._restore(ckpt)

    def _restore_point(self, point: dict[str, Any]) -> None:
        super()._restore_point(point)
        self.algo.explore_rng.set_state(point["explore_rng"])
        self.buffer.set_cursor(point["buffer_cursor"])
        self.env_steps = point["counters"]["env_steps"]  # counted step by step in collect()

    # -- collection ----------------------------------------------------------------------------
    def _check_finite(self, step: EnvStep) -> None:
        bad = non_finite(step)
        if bad is not None:
            what, env = bad
            at = self.env_steps + self.config.n_rollout_threads
            raise NumericalError(f"non-finite {what} from env {env} at env step {at}")

    def collect(self) -> None:
        """``train_interval`` vector steps into the buffer."""
        cfg, algo, env, buf = self.config, self.algo, self.env, self.buffer
        E = cfg.n_rollout_threads
        clock = time.perf_counter
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-step forwards of E rows gain nothing from intra-op threads
        try:
            for _ in range(cfg.train_interval):
                t0 = clock()
                if self.env_steps < cfg.warmup_steps:
                    actions = algo.random_actions(E)
                else:
                    actions = algo.act(self.obs)[0]
                np_actions = [a.cpu().numpy() for a in actions]
                t1 = clock()
                step = env.step(np_actions)
                t2 = clock()
                self._check_finite(step)
                buf.add(self.obs, self.state, actions, step)
                self.recent_episodes.extend(step.completed)
                self._take_step(step)
                self.env_steps += E
                self.phase["inference_s"] += t1 - t0
                self.phase["env_s"] += t2 - t1
                self.phase["buffer_s"] += clock() - t2
                if self.stop_signal is not None:
                    raise Interrupted()
        finally:
            torch.set_num_threads(threads)

    # -- training / logging --------------------------------------------------------------------
    def learn(self) -> dict[str, float]:
        """The iteration's gradient updates: none before the warm-up ends or while the buffer
        holds less than a batch."""
        if self.env_steps < self.config.warmup_steps or self.buffer.sampleable < self.config.batch_size:
            return {}
        stats = self.algo.train(self.buffer, self.n_updates)
        for key, seconds in self.algo.timings.items():
            self.phase[f"update_{key}"] += seconds
        self.algo.timings.clear()
        stats["updates"] = self.algo.updates
        return stats

    def evaluate(self) -> dict[str, float]:
        """The base's evaluation, its time reported in the row's ``time/eval_s``."""
        start = time.time()
        result = super().evaluate()
        self.phase["eval_s"] += time.time() - start
        return result

    def window_columns(self) -> dict[str, float]:
        """The mean over the window's iterations (``updates``: the count at the window's end),
        and the buffer's fill."""
        columns = {k: (v[-1] if k == "updates" else float(np.mean(v))) for k, v in self.window_stats.items()}
        columns["replay_transitions"] = self.buffer.size * self.config.n_rollout_threads
        return columns
