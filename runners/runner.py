"""The one runner for every environment family.

Per iteration: collect ``episode_length`` steps of ``n_rollout_threads`` envs into the
buffer (one batched forward per actor per step), let the algorithm train, then log,
evaluate and checkpoint on their intervals. Everything an exact resume needs is taken
at each iteration boundary (the "resume point"), so Ctrl-C, SIGTERM or a failing
environment mid-rollout still leaves a checkpoint that continues exactly.
"""
from __future__ import annotations

import collections
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.base import NumericalError
from algorithms.registry import make_algorithm
from envs.base import EnvError, EnvStep
from envs.registry import make_vec_env, task_name
from runners.evaluate import env_seed, eval_seed, evaluate
from utils.buffer import RolloutBuffer
from utils.checkpoint import CheckpointError, atomic_write_bytes, save_checkpoint
from utils.device import rebalance_threads, release_cores
from utils.errors import STOP_SIGNALS
from utils.logger import MetricsLogger, resident_mb


class Interrupted(Exception):
    """A stop signal arrived mid-rollout: the iteration is abandoned and its start saved."""


class StopRun(Exception):
    """Ends ``Runner.run`` with exit status ``status``, raised by a step once it has saved
    and reported what it must."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Runner:
    def __init__(self, config, run_dir: Path, device: torch.device, checkpoint: dict | None = None):
        self.config, self.run_dir, self.device = config, Path(run_dir), device
        E, T = config.n_rollout_threads, config.episode_length
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.env = make_vec_env(config, n_envs=E, seed=env_seed(config))
        try:
            self._build(checkpoint)
        except BaseException:  # e.g. a ConfigError from the algorithm: don't leave env workers behind
            self.env.close()
            raise

    def _build(self, checkpoint: dict | None) -> None:
        config, device = self.config, self.device
        E, T = config.n_rollout_threads, config.episode_length
        self.spec = self.env.spec
        self.algo = make_algorithm(config, self.spec, device)
        recurrent = config.use_recurrent_policy
        self.buffer = RolloutBuffer(self.spec, T, E, self.algo.n_critics, self.algo.hidden_shape, recurrent, device)
        self.eval_env = None
        N, K = self.spec.n_agents, self.algo.n_critics
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.obs = [z(E, a.obs_dim) for a in self.spec.agents]
        self.state = z(E, self.spec.state_dim)
        self.avail = [z(E, a.action_dim, dtype=torch.bool) for a in self.spec.agents] if self.spec.discrete else None
        self.active = z(E, N, dtype=torch.bool)
        self.starts = torch.ones(E, dtype=torch.bool, device=device)
        self.actor_hidden = z(E, N, *self.algo.hidden_shape) if recurrent else None
        self.critic_hidden = z(E, K, *self.algo.hidden_shape) if recurrent else None
        self.iteration = 0
        self.env_steps = 0
        self.wall_seconds = 0.0  # accumulated over resumed sessions
        self.env_restarts = 0
        self.recent_episodes: collections.deque = collections.deque(maxlen=max(E, 10))
        self.last_eval: dict[str, float] = {}
        self.stop_signal: int | None = None
        self._session_start = time.time()  # reset when run() starts
        self.phase = collections.Counter()
        # Per-iteration diagnostics since the last metrics row (a row summarises them all).
        self.window_stats: dict[str, list[float]] = collections.defaultdict(list)
        # Where the current metrics row's window began (wall time, env steps): its sps. Set
        # again when run() starts.
        self._window_start, self._window_steps = time.time(), 0
        if checkpoint is None:
            self._take_step(self.env.reset(env_seed(config)))
        else:
            self._restore(checkpoint)
        self.logger = MetricsLogger(self.run_dir, config,
                                    keep_up_to_env_steps=self.env_steps if checkpoint is not None else None)

    # -- state for checkpoints ---------------------------------------------------------------
    def _clone(self, x):
        return None if x is None else x.detach().clone().cpu()

    def resume_point(self) -> dict[str, Any]:
        """Everything but the networks, at an iteration boundary (cheap: taken every iteration)."""
        return {
            "env": self.env.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": np.random.get_state(),
            "carry": {"starts": self._clone(self.starts), "actor_hidden": self._clone(self.actor_hidden),
                      "critic_hidden": self._clone(self.critic_hidden), "active": self._clone(self.active)},
            "counters": {"iteration": self.iteration, "env_steps": self.env_steps,
                         "wall_seconds": self.elapsed(),
                         "env_restarts": self.env_restarts},
            "recent_episodes": list(self.recent_episodes),
            "last_eval": dict(self.last_eval),
            "window_stats": {k: list(v) for k, v in self.window_stats.items()},
        }

    def save(self, point: dict[str, Any]) -> Path:
        payload = {"config": self.config.to_dict(), "algorithm": self.algo.state_dict(), **point}
        return save_checkpoint(self.run_dir, payload)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.algo.load_state_dict(ckpt["algorithm"])
        counters = ckpt["counters"]  # first: an env without snapshots reseeds from the iteration
        self.iteration, self.env_steps = counters["iteration"], counters["env_steps"]
        self.wall_seconds, self.env_restarts = counters["wall_seconds"], counters["env_restarts"]
        self._restore_point(ckpt)
        self.last_eval = dict(ckpt["last_eval"])
        self.window_stats.update(ckpt.get("window_stats", {}))

    def _restore_point(self, point: dict[str, Any]) -> None:
        if point["env"] is None:  # the env cannot snapshot (SMAC): start fresh episodes
            self._take_step(self.env.reset(env_seed(self.config) + self.iteration))
            self.starts.fill_(True)
        else:
            self._take_step(self.env.set_state(point["env"]))
            self.starts.copy_(point["carry"]["starts"])
        torch.set_rng_state(point["torch_rng"])
        if point["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(point["cuda_rng"])
        np.random.set_state(point["numpy_rng"])
        self.recent_episodes.clear()  # episodes of a discarded, partial rollout must not count
        self.recent_episodes.extend(point["recent_episodes"])
        for name in ("actor_hidden", "critic_hidden"):
            saved, live = point["carry"][name], getattr(self, name)
            if saved is not None and live is not None:
                live.copy_(saved)

    # -- collection ----------------------------------------------------------------------------
    def _take_step(self, step: EnvStep) -> None:
        """Copy an env step's observations into the runner's current tensors."""
        for dst, src in zip(self.obs, step.obs):
            dst.copy_(torch.from_numpy(src))
        self.state.copy_(torch.from_numpy(step.state))
        if self.avail is not None:
            for dst, src in zip(self.avail, step.avail_actions):
                dst.copy_(torch.from_numpy(src))
        self.active.copy_(torch.from_numpy(step.active))

    def _check_finite(self, step: EnvStep, t: int) -> None:
        named = [("reward", step.reward), ("global state", step.state)]
        named += [(f"observation of agent {i}", o) for i, o in enumerate(step.obs)]
        done = step.terminated | step.truncated
        if done.any():  # the last state of an episode feeds the truncation bootstrap
            named += [("final global state", step.final_state[done])]
            named += [(f"final observation of agent {i}", o[done]) for i, o in enumerate(step.final_obs)]
        steps = self.env_steps + (t + 1) * self.config.n_rollout_threads
        for what, array in named:
            if not np.isfinite(array).all():
                bad = np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)))[0][0]
                if what.startswith("final"):
                    bad = np.flatnonzero(done)[bad]
                raise NumericalError(f"non-finite {what} from env {bad} at env step {steps} "
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

    # -- evaluation / logging -------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy evaluation of the current policies. A failing evaluation env is rebuilt and
        the evaluation played again, within --max_env_restarts (its seeds are fixed, so it
        plays the same episodes); past that an EnvError naming the evaluation env is raised."""
        cfg = self.config
        while True:
            try:
                if self.eval_env is None:
                    self.eval_env = make_vec_env(cfg, n_envs=min(cfg.n_eval_rollout_threads, cfg.eval_episodes),
                                                 seed=eval_seed(cfg), evaluation=True)
                result = evaluate(self.algo, self.eval_env, cfg.eval_episodes, seed=eval_seed(cfg, self.iteration))
                return {**result, "env_steps": self.env_steps}  # when: summary.json's eval_env_steps
            except EnvError as exc:
                self._close_eval_env()
                if self.env_restarts >= cfg.max_env_restarts:
                    raise EnvError(f"evaluation env: {exc}; no env restarts left "
                                   f"(--max_env_restarts {cfg.max_env_restarts})") from exc
                self.env_restarts += 1
                print(f"warning: evaluation env: {exc}; rebuilding the evaluation envs "
                      f"({self.env_restarts}/{cfg.max_env_restarts}) and evaluating again", flush=True)

    def _close_eval_env(self) -> None:
        env, self.eval_env = self.eval_env, None
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 (it already failed; a new one is built)
                pass

    def _train_episode_stats(self) -> dict[str, float]:
        if not self.recent_episodes:
            return {"train_episode_return": math.nan, "train_episode_length": math.nan}
        eps = list(self.recent_episodes)
        stats = {"train_episode_return": float(np.mean([e["return"] for e in eps])),
                 "train_episode_length": float(np.mean([e["length"] for e in eps]))}
        for metric in self.spec.episode_metrics:
            stats[f"train_{metric}"] = float(np.mean([e[metric] for e in eps]))
        return stats

    def _window_summary(self) -> dict[str, float]:
        """Diagnostics of every update since the last row: keys ending in ``_max`` / ``_min``
        keep the extreme (e.g. HATRPO's ``kl_max``: the largest KL of any accepted step),
        the rest the mean over updates."""
        out = {}
        for key, values in self.window_stats.items():
            reduce = max if key.endswith("_max") else min if key.endswith("_min") else np.mean
            out[key] = float(reduce(values))
        return out

    def _row(self, stats: dict[str, float], eval_result: dict[str, float] | None, window_sps: float) -> dict:
        row: dict[str, Any] = {"env_steps": self.env_steps, "iteration": self.iteration,
                               "wall_seconds": round(self.elapsed(), 3), "sps": round(window_sps, 1)}
        row.update(self._train_episode_stats())
        eval_keys = ["eval_return", "eval_return_std"] + [f"eval_{m}" for m in self.spec.episode_metrics]
        row.update({k: (eval_result or {}).get(k, math.nan) for k in eval_keys})
        row.update(stats)
        row.update({f"time/{k}": round(v, 4) for k, v in sorted(self.phase.items())})
        row["env_restarts"] = self.env_restarts
        row["rss_mb"] = round(resident_mb(), 1)
        row["torch_threads"] = torch.get_num_threads()  # auto threads follow the other runs
        return row

    def elapsed(self) -> float:
        return self.wall_seconds + time.time() - self._session_start

    # -- main loop -----------------------------------------------------------------------------
    def on_signal(self, signum, frame):
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once; the last checkpoint is intact
        self.stop_signal = signum

    def run(self) -> int:
        """Train up to ``--num_env_steps``, one ``iterate`` at a time, then ``finish``.

        Exit status: 0 done; 130 stopped by a signal, with a checkpoint to resume from; 1 a
        failure (an environment past its restarts, a non-finite number, a checkpoint that
        could not be written), with the last good checkpoint kept or this one saved.
        """
        self._session_start = time.time()
        previous = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        self._window_start, self._window_steps = time.time(), self.env_steps
        try:
            if self.stop_signal is not None:  # received while starting up (train.train.StartupSignals)
                self.stop_with_checkpoint(self.resume_point())
            while self.env_steps < self.config.num_env_steps:
                self.iterate()
            self.finish()
            return 0
        except StopRun as stop:
            return stop.status
        except NumericalError as exc:
            print(f"\nerror: {exc}; stopped without saving, the last good checkpoint is kept", flush=True)
            return 1
        except EnvError as exc:  # outside the rollout (saving the envs' state, or a restart)
            print(f"\nerror: {exc}; stopped without saving, the last checkpoint is kept", flush=True)
            return 1
        except CheckpointError as exc:
            print(f"\nerror: {exc}", flush=True)
            return 1
        finally:
            release_cores()  # other runs on this machine may take this run's cores
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()
            self.env.close()
            if self.eval_env is not None:
                self.eval_env.close()

    def iterate(self) -> None:
        """One iteration: collect a rollout and train on it, then evaluate, log and save on
        their intervals. A failed rollout is redone from its start (``handle_env_failure``)."""
        self.follow_thread_share()
        point = self.resume_point()
        try:
            self.collect()
        except EnvError as exc:
            self.handle_env_failure(exc, point)
            return
        except Interrupted:
            self.stop_with_checkpoint(point)
        self.update(point)
        last = self.env_steps >= self.config.num_env_steps
        eval_result = self.evaluate_if_due(last)
        self.log_if_due(eval_result, last)
        self.save_if_due(last)

    def follow_thread_share(self) -> None:
        """--torch_threads 0: take this run's share of the cores as other runs start or end."""
        before, threads = rebalance_threads()
        if threads != before:
            print(f"\ntorch threads: {before} -> {threads} (runs sharing this machine's cores "
                  "changed; --torch_threads N fixes the count)", flush=True)

    def handle_env_failure(self, exc: EnvError, point: dict[str, Any]) -> None:
        """A training env failed mid-rollout: rewind to ``point`` (the iteration's start) with
        the failed env restarted, so the caller redoes the iteration; past
        --max_env_restarts, or when the restart fails too, save ``point`` and stop (status 1)."""
        cfg = self.config
        if self.env_restarts >= cfg.max_env_restarts or exc.env_index is None:
            path = self.save(point)
            print(f"error: {exc}; no env restarts left (--max_env_restarts {cfg.max_env_restarts}); "
                  f"checkpoint at {self.env_steps} env steps saved to {path}", flush=True)
            raise StopRun(1)
        self.env_restarts += 1
        print(f"warning: {exc}; restarting env {exc.env_index} "
              f"({self.env_restarts}/{cfg.max_env_restarts}) and redoing update {self.iteration + 1}",
              flush=True)
        try:
            self._restore_point(point)
            self._take_step(self.env.restart(exc.env_index))
        except EnvError as failed:  # keep the iteration's start rather than lose it
            path = self.save(point)
            print(f"error: restarting env {exc.env_index} failed: {failed}; checkpoint at "
                  f"{point['counters']['env_steps']} env steps saved to {path}", flush=True)
            raise StopRun(1) from None
        self.starts[exc.env_index] = True  # a fresh episode: recurrent states start over

    def update(self, point: dict[str, Any]) -> None:
        """Train the algorithm on the rollout just collected (``point``: its resume point)."""
        t0 = time.perf_counter()
        self.algo.iteration = self.iteration + 1
        # The budget spent before this rollout: update k of K uses lr (1 - k/K), from
        # the full lr at the first update down to lr / K at the last (HARL's schedule).
        self.algo.set_progress(point["counters"]["env_steps"] / self.config.num_env_steps)
        for key, value in self.algo.train(self.buffer, defer_critic=True).items():
            self.window_stats[key].append(value)
        self.phase["update_s"] += time.perf_counter() - t0
        self.iteration += 1

    def evaluate_if_due(self, last: bool) -> dict[str, float] | None:
        """Evaluate on --eval_interval and after the last update; None when not due. An
        evaluation env past its restarts: save this iteration's update, then stop (status 1)."""
        cfg = self.config
        if not (cfg.use_eval and (self.iteration % cfg.eval_interval == 0 or last)):
            return None
        eval_start = time.time()
        try:
            self.last_eval = self.evaluate()
        except EnvError as exc:
            path = self.save(self.resume_point())
            print(f"error: {exc}; checkpoint at {self.env_steps} env steps saved to {path}", flush=True)
            raise StopRun(1) from None
        self._window_start += time.time() - eval_start  # sps is training throughput
        return self.last_eval

    def log_if_due(self, eval_result: dict[str, float] | None, last: bool) -> None:
        """A metrics row (and the progress line) on --log_interval, after an evaluation and
        after the last update; it summarises every update since the previous row."""
        cfg = self.config
        if not (self.iteration % cfg.log_interval == 0 or eval_result is not None or last):
            return
        now = time.time()
        window_sps = (self.env_steps - self._window_steps) / max(now - self._window_start, 1e-9)
        self.logger.log(self._row(self._window_summary(), eval_result, window_sps))
        if cfg.progress:
            train_return = self._train_episode_stats()["train_episode_return"]
            shown = "".join(f"  {k} {v:.3g}" for k, v in (eval_result or {}).items()
                            if k == "eval_return" or k[len("eval_"):] in self.spec.episode_metrics)
            self.logger.progress(self.env_steps, cfg.num_env_steps, window_sps, train_return, shown)
        self._window_start, self._window_steps = now, self.env_steps
        self.phase.clear()
        self.window_stats.clear()

    def save_if_due(self, last: bool) -> None:
        """A checkpoint on --save_interval, after the last update and when a stop signal came
        in; after that signal, stop (status 130)."""
        if self.iteration % self.config.save_interval == 0 or last or self.stop_signal is not None:
            self.save(self.resume_point())
        if self.stop_signal is not None:
            print(f"\ninterrupted: checkpoint at {self.env_steps} env steps saved; "
                  f"continue with --resume {self.run_dir}", flush=True)
            raise StopRun(130)

    def stop_with_checkpoint(self, point: dict) -> None:
        """Save ``point`` (a ``resume_point``) and stop as interrupted (status 130)."""
        path = self.save(point)
        print(f"\ninterrupted: checkpoint at {point['counters']['env_steps']} env steps saved to "
              f"{path}; continue with --resume {self.run_dir}", flush=True)
        raise StopRun(130)

    def finish(self) -> None:
        """The budget is spent: make sure the reported policy was evaluated, write summary.json."""
        cfg = self.config
        # None: a checkpoint saved before evaluations recorded their env steps, whose policy
        # was evaluated at its last update.
        evaluated_at = self.last_eval.get("env_steps")
        if cfg.use_eval and evaluated_at != self.env_steps and (
                evaluated_at is not None or cfg.num_env_steps < self.env_steps):
            # Resumed with --num_env_steps below the steps already done: the policy being
            # reported may not have been evaluated yet.
            print(f"note: evaluating the final policy ({self.env_steps} env steps) for summary.json",
                  flush=True)
            self.last_eval = self.evaluate()
        summary = self.write_summary()
        shown = ["eval_return_mean"] + [f"eval_{m}" for m in self.spec.episode_metrics]
        evals = "".join(f", {k} {summary[k]:.4g}" for k in shown if summary.get(k) is not None)
        print(f"\ndone: {self.env_steps} env steps in {summary['wall_seconds']:.0f} s{evals}; "
              f"{self.run_dir / 'summary.json'}", flush=True)

    def write_summary(self) -> dict:
        wall = self.elapsed()
        summary = {"algo": self.config.algo, "env": self.config.env, "task": task_name(self.config.to_dict()),
                   "seed": self.config.seed, "env_steps": self.env_steps, "iterations": self.iteration,
                   "eval_env_steps": self.last_eval.get("env_steps"),  # when the figures below were measured
                   "eval_return_mean": self.last_eval.get("eval_return"),
                   "eval_return_std": self.last_eval.get("eval_return_std"),
                   **{f"eval_{m}": self.last_eval.get(f"eval_{m}") for m in self.spec.episode_metrics},
                   "train_episode_return": self._train_episode_stats()["train_episode_return"],
                   "wall_seconds": round(wall, 2), "sps": round(self.env_steps / max(wall, 1e-9), 1),
                   "env_restarts": self.env_restarts}
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        atomic_write_bytes(self.run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary
