"""What the on-policy and off-policy runners share: the run loop and its exits, evaluation,
metrics rows, summary.json and the part of a checkpoint that is not the runner's own.

A runner subclasses ``BaseRunner`` and supplies what it collects and how it trains:

    _build()          its algorithm (through algorithms.registry.make_algorithm), its buffer
                      and the tensors it carries between env steps
    collect()         one iteration's env steps into its buffer; ``Interrupted`` when a stop
                      signal came in mid-way
    learn()           the iteration's training; returns its diagnostics
    save(point)       a checkpoint of ``point`` (a ``resume_point``) with the networks
    window_columns()  its diagnostics since the previous metrics row, as that row's columns

and extends ``resume_point``, ``_restore``, ``_restore_point`` and ``_take_step`` with the
state it carries. Everything an exact resume needs is taken at each iteration boundary
(the "resume point"), so Ctrl-C, SIGTERM or a failing environment mid-collection still
leaves a checkpoint that continues exactly.
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
from envs.base import EnvError, EnvStep
from envs.registry import make_vec_env, task_name
from runners.evaluate import env_seed, eval_seed, evaluate
from utils.checkpoint import CheckpointError, atomic_write_bytes
from utils.device import rebalance_threads, release_cores
from utils.errors import STOP_SIGNALS
from utils.logger import MetricsLogger, resident_mb


class Interrupted(Exception):
    """A stop signal arrived mid-collection: the iteration is abandoned and its start saved."""


class StopRun(Exception):
    """Ends ``BaseRunner.run`` with exit status ``status``, raised by a step once it has saved
    and reported what it must."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def non_finite(step: EnvStep) -> tuple[str, int] | None:
    """The first non-finite quantity of ``step`` and the env it came from, or None. The
    last state of a finished episode counts too: bootstrap targets are computed from it."""
    done = step.terminated | step.truncated
    named = [("reward", step.reward), ("global state", step.state)]
    named += [(f"observation of agent {i}", o) for i, o in enumerate(step.obs)]
    if done.any():
        named += [("final global state", step.final_state[done])]
        named += [(f"final observation of agent {i}", o[done]) for i, o in enumerate(step.final_obs)]
    for what, array in named:
        if not np.isfinite(array).all():
            row = np.argwhere(~np.isfinite(array.reshape(array.shape[0], -1)))[0][0]
            return what, int(np.flatnonzero(done)[row] if what.startswith("final") else row)
    return None


class BaseRunner:
    def __init__(self, config, run_dir: Path, device: torch.device, checkpoint: dict | None = None):
        self.config, self.run_dir, self.device = config, Path(run_dir), torch.device(device)
        torch.manual_seed(config.seed)  # network initialisation
        np.random.seed(config.seed)
        self.env = make_vec_env(config, n_envs=config.n_rollout_threads, seed=env_seed(config))
        try:
            self.spec = self.env.spec
            self._build()
            self._start(checkpoint)
        except BaseException:  # e.g. a ConfigError from the algorithm: don't leave env workers behind
            self.env.close()
            raise

    def _build(self) -> None:
        """The algorithm, the buffer and the tensors carried between env steps."""
        raise NotImplementedError

    def _start(self, checkpoint: dict | None) -> None:
        """Counters, the current observations (an env reset, or the checkpoint's state), the logger."""
        config, E = self.config, self.config.n_rollout_threads
        self.obs = [torch.zeros(E, a.obs_dim, device=self.device) for a in self.spec.agents]
        self.state = torch.zeros(E, self.spec.state_dim, device=self.device)
        self.eval_env = None
        self.iteration = 0
        self.env_steps = 0
        self.wall_seconds = 0.0  # accumulated over resumed sessions
        self.env_restarts = 0
        self.recent_episodes: collections.deque = collections.deque(maxlen=max(E, 10))
        self.last_eval: dict[str, float] = {}
        self.stop_signal: int | None = None
        self._session_start = time.time()  # reset when run() starts
        self.phase: collections.Counter = collections.Counter()  # seconds per phase: the row's time/ columns
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
    def resume_point(self) -> dict[str, Any]:
        """Everything but the networks and the runner's own carried state, at an iteration
        boundary (cheap: taken every iteration)."""
        return {
            "env": self.env.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": np.random.get_state(),
            "counters": {"iteration": self.iteration, "env_steps": self.env_steps,
                         "wall_seconds": self.elapsed(), "env_restarts": self.env_restarts},
            "recent_episodes": list(self.recent_episodes),
            "last_eval": dict(self.last_eval),
            "window_stats": {k: list(v) for k, v in self.window_stats.items()},
        }

    def save(self, point: dict[str, Any]) -> Path:
        """Write a checkpoint of ``point`` with the networks; returns its path."""
        raise NotImplementedError

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
        else:
            self._take_step(self.env.set_state(point["env"]))
        torch.set_rng_state(point["torch_rng"])
        if point["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(point["cuda_rng"])
        np.random.set_state(point["numpy_rng"])
        self.recent_episodes.clear()  # episodes of a discarded, partial iteration must not count
        self.recent_episodes.extend(point["recent_episodes"])

    def _take_step(self, step: EnvStep) -> None:
        """Copy an env step's observations into the runner's current tensors."""
        for dst, src in zip(self.obs, step.obs):
            dst.copy_(torch.from_numpy(src))
        self.state.copy_(torch.from_numpy(step.state))

    # -- what a runner supplies ------------------------------------------------------------------
    def collect(self) -> None:
        """One iteration's env steps into the buffer."""
        raise NotImplementedError

    def learn(self) -> dict[str, float]:
        """The iteration's training on the buffer; returns its diagnostics."""
        raise NotImplementedError

    def window_columns(self) -> dict[str, float]:
        """The runner's columns of a metrics row: its diagnostics since the previous row."""
        raise NotImplementedError

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

    def _row(self, eval_result: dict[str, float] | None, window_sps: float) -> dict:
        row: dict[str, Any] = {"env_steps": self.env_steps, "iteration": self.iteration,
                               "wall_seconds": round(self.elapsed(), 3), "sps": round(window_sps, 1)}
        row.update(self._train_episode_stats())
        eval_keys = ["eval_return", "eval_return_std"] + [f"eval_{m}" for m in self.spec.episode_metrics]
        row.update({k: (eval_result or {}).get(k, math.nan) for k in eval_keys})
        row.update(self.window_columns())
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
        except EnvError as exc:  # outside the collection (saving the envs' state, or a restart)
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
        """One iteration: collect and train, then evaluate, log and save on their intervals.
        A failed collection is redone from its start (``handle_env_failure``)."""
        self.follow_thread_share()
        point = self.resume_point()
        try:
            self.collect()
        except EnvError as exc:
            self.handle_env_failure(exc, point)
            return
        except Interrupted:
            self.stop_with_checkpoint(point)
        self.update()
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
        """A training env failed mid-collection: rewind to ``point`` (the iteration's start)
        with the failed env restarted, so the caller redoes the iteration; past
        --max_env_restarts, or when the restart fails too, save ``point`` and stop (status 1)."""
        cfg = self.config
        if self.env_restarts >= cfg.max_env_restarts or exc.env_index is None:
            path = self.save(point)
            print(f"error: {exc}; no env restarts left (--max_env_restarts {cfg.max_env_restarts}); "
                  f"checkpoint at {point['counters']['env_steps']} env steps saved to {path}", flush=True)
            raise StopRun(1)
        self.env_restarts += 1
        print(f"warning: {exc}; restarting env {exc.env_index} "
              f"({self.env_restarts}/{cfg.max_env_restarts}) and redoing iteration {self.iteration + 1}",
              flush=True)
        try:
            self._restore_point(point)
            self._take_step(self.env.restart(exc.env_index))
        except EnvError as failed:  # keep the iteration's start rather than lose it
            path = self.save(point)
            print(f"error: restarting env {exc.env_index} failed: {failed}; checkpoint at "
                  f"{point['counters']['env_steps']} env steps saved to {path}", flush=True)
            raise StopRun(1) from None

    def update(self) -> None:
        """Train on what was just collected; its diagnostics join the metrics row's window."""
        t0 = time.perf_counter()
        for key, value in self.learn().items():
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
        self.logger.log(self._row(eval_result, window_sps))
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
        if self.config.use_eval and not self.final_policy_evaluated():
            # e.g. resumed with --num_env_steps at or below the steps already done
            print(f"note: evaluating the final policy ({self.env_steps} env steps) for summary.json",
                  flush=True)
            self.last_eval = self.evaluate()
        summary = self.write_summary()
        shown = ["eval_return_mean"] + [f"eval_{m}" for m in self.spec.episode_metrics]
        evals = "".join(f", {k} {summary[k]:.4g}" for k in shown if summary.get(k) is not None)
        print(f"\ndone: {self.env_steps} env steps in {summary['wall_seconds']:.0f} s{evals}; "
              f"{self.run_dir / 'summary.json'}", flush=True)

    def final_policy_evaluated(self) -> bool:
        """Whether ``last_eval`` measured the policy at this many env steps."""
        return self.last_eval.get("env_steps") == self.env_steps

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
