"""The runner of the off-policy family (HATD3 / HADDPG / MATD3 / MADDPG).

One iteration: ``train_interval`` vector env steps into the replay buffer (uniform random
actions for the first ``warmup_steps`` env steps, then the actors with exploration noise;
one batched forward per actor per step, for all envs), then
``round(train_interval * update_per_train)`` gradient updates once warm-up is over and the
buffer holds a batch; then log, evaluate and checkpoint on their intervals, as the
on-policy ``runners.runner.Runner`` does, with the same public interface and run files
(metrics.csv, summary.json, checkpoints/last.pt).

Exact resume: everything collection changes (env state, RNGs, the buffer's ring cursor)
is taken at each iteration start (the "resume point"); an interruption mid-collection
saves that point, and the rows written since are rewritten identically by the replayed
steps before anything samples them. The buffer itself is saved incrementally under
``checkpoints/replay/`` (utils/replay.py), its manifest inside ``last.pt``.
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
from algorithms.off_policy import OFF_POLICY_ALGORITHMS
from envs.base import EnvError, EnvStep
from envs.registry import make_vec_env, task_name
from runners.evaluate import env_seed, eval_seed, evaluate
from utils.errors import STOP_SIGNALS, ConfigError
from utils.checkpoint import CheckpointError, atomic_write_bytes, checkpoint_path, save_checkpoint
from utils.device import rebalance_threads, release_cores
from utils.logger import MetricsLogger, resident_mb
from utils.replay import ReplayBuffer

REPLAY_DIR = "replay"  # inside the checkpoint directory


class Interrupted(Exception):
    pass


class OffPolicyRunner:
    def __init__(self, config, run_dir: Path, device: torch.device, checkpoint: dict | None = None):
        self.config, self.run_dir, self.device = config, Path(run_dir), torch.device(device)
        if config.algo not in OFF_POLICY_ALGORITHMS:
            raise ConfigError(f"--algo {config.algo} is not an off-policy method "
                              f"({', '.join(OFF_POLICY_ALGORITHMS)})")
        torch.manual_seed(config.seed)  # network initialisation
        np.random.seed(config.seed)
        self.env = make_vec_env(config, n_envs=config.n_rollout_threads, seed=env_seed(config))
        try:
            self._build(checkpoint)
        except BaseException:  # e.g. a ConfigError on a discrete-action env: don't leave env workers behind
            self.env.close()
            raise

    def _build(self, checkpoint: dict | None) -> None:
        cfg, device = self.config, self.device
        E = cfg.n_rollout_threads
        self.spec = self.env.spec
        if self.spec.discrete:
            raise ConfigError(f"--algo {cfg.algo} needs continuous actions and {self.spec.name} has discrete "
                              "ones; use happo, hatrpo, mappo or ippo there")
        self.algo = OFF_POLICY_ALGORITHMS[cfg.algo](cfg, self.spec, device)
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
        self.eval_env = None
        self.obs = [torch.zeros(E, a.obs_dim, device=device) for a in self.spec.agents]
        self.state = torch.zeros(E, self.spec.state_dim, device=device)
        self.iteration = 0
        self.env_steps = 0
        self.wall_seconds = 0.0  # accumulated over resumed sessions
        self.env_restarts = 0
        self.recent_episodes: collections.deque = collections.deque(maxlen=max(E, 10))
        self.last_eval: dict[str, float] = {}
        self.stop_signal: int | None = None
        self._session_start = time.time()
        self.phase: collections.Counter = collections.Counter()
        self.window_stats: dict[str, list[float]] = collections.defaultdict(list)
        if checkpoint is None:
            self._take_step(self.env.reset(env_seed(cfg)))
        else:
            self._restore(checkpoint)
        self.logger = MetricsLogger(self.run_dir, cfg,
                                    keep_up_to_env_steps=self.env_steps if checkpoint is not None else None)

    # -- state for checkpoints ---------------------------------------------------------------
    def resume_point(self) -> dict[str, Any]:
        """Everything collection changes, at an iteration boundary (cheap: taken every iteration)."""
        return {
            "env": self.env.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": np.random.get_state(),
            "explore_rng": self.algo.explore_rng.get_state(),
            "buffer_cursor": self.buffer.cursor,
            "counters": {"iteration": self.iteration, "env_steps": self.env_steps,
                         "wall_seconds": self.elapsed(), "env_restarts": self.env_restarts},
            "recent_episodes": list(self.recent_episodes),
            "last_eval": dict(self.last_eval),
            "window_stats": {k: list(v) for k, v in self.window_stats.items()},
        }

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
        self.algo.load_state_dict(ckpt["algorithm"])
        self.buffer.load(checkpoint_path(self.run_dir).parent / REPLAY_DIR, ckpt["replay"])
        counters = ckpt["counters"]
        self.iteration, self.env_steps = counters["iteration"], counters["env_steps"]
        self.wall_seconds, self.env_restarts = counters["wall_seconds"], counters["env_restarts"]
        self._restore_point(ckpt)
        self.last_eval = dict(ckpt["last_eval"])
        self.window_stats.update(ckpt.get("window_stats", {}))

    def _restore_point(self, point: dict[str, Any]) -> None:
        if point["env"] is None:  # the env cannot snapshot: start fresh episodes
            self._take_step(self.env.reset(env_seed(self.config) + self.iteration))
        else:
            self._take_step(self.env.set_state(point["env"]))
        torch.set_rng_state(point["torch_rng"])
        if point["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(point["cuda_rng"])
        np.random.set_state(point["numpy_rng"])
        self.algo.explore_rng.set_state(point["explore_rng"])
        self.buffer.set_cursor(point["buffer_cursor"])
        self.env_steps = point["counters"]["env_steps"]
        self.recent_episodes.clear()  # episodes of a discarded, partial iteration must not count
        self.recent_episodes.extend(point["recent_episodes"])

    # -- collection ----------------------------------------------------------------------------
    def _take_step(self, step: EnvStep) -> None:
        for dst, src in zip(self.obs, step.obs):
            dst.copy_(torch.from_numpy(src))
        self.state.copy_(torch.from_numpy(step.state))

    def _check_finite(self, step: EnvStep) -> None:
        done = step.terminated | step.truncated
        named = [("reward", step.reward), ("global state", step.state)]
        named += [(f"observation of agent {i}", o) for i, o in enumerate(step.obs)]
        if done.any():  # the last state of an episode is a bootstrap target
            named += [("final global state", step.final_state[done])]
            named += [(f"final observation of agent {i}", o[done]) for i, o in enumerate(step.final_obs)]
        for what, array in named:
            if not np.isfinite(array).all():
                at = self.env_steps + self.config.n_rollout_threads
                raise NumericalError(f"non-finite {what} from the env at env step {at}")

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

    # -- evaluation / logging -------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Deterministic actors on the evaluation envs (runners/evaluate.py); a failing
        evaluation env is rebuilt within --max_env_restarts."""
        cfg = self.config
        while True:
            try:
                if self.eval_env is None:
                    self.eval_env = make_vec_env(cfg, n_envs=min(cfg.n_eval_rollout_threads, cfg.eval_episodes),
                                                 seed=eval_seed(cfg), evaluation=True)
                result = evaluate(self.algo, self.eval_env, cfg.eval_episodes, seed=eval_seed(cfg, self.iteration))
                return {**result, "env_steps": self.env_steps}
            except EnvError as exc:
                env, self.eval_env = self.eval_env, None
                if env is not None:
                    try:
                        env.close()
                    except Exception:  # noqa: BLE001 (it already failed; a new one is built)
                        pass
                if self.env_restarts >= cfg.max_env_restarts:
                    raise EnvError(f"evaluation env: {exc}; no env restarts left "
                                   f"(--max_env_restarts {cfg.max_env_restarts})") from exc
                self.env_restarts += 1
                print(f"warning: evaluation env: {exc}; rebuilding the evaluation envs "
                      f"({self.env_restarts}/{cfg.max_env_restarts}) and evaluating again", flush=True)

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
        # The mean over the window's iterations (``updates``: the count at the window's end).
        row.update({k: (v[-1] if k == "updates" else float(np.mean(v))) for k, v in self.window_stats.items()})
        row["replay_transitions"] = self.buffer.size * self.config.n_rollout_threads
        row.update({f"time/{k}": round(v, 4) for k, v in sorted(self.phase.items())})
        row["env_restarts"] = self.env_restarts
        row["rss_mb"] = round(resident_mb(), 1)
        row["torch_threads"] = torch.get_num_threads()
        return row

    def elapsed(self) -> float:
        return self.wall_seconds + time.time() - self._session_start

    # -- main loop -----------------------------------------------------------------------------
    def on_signal(self, signum, frame):
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once; the last checkpoint is intact
        self.stop_signal = signum

    def _stop_at(self, point: dict) -> int:
        path = self.save(point)
        print(f"\ninterrupted: checkpoint at {point['counters']['env_steps']} env steps saved to "
              f"{path}; continue with --resume {self.run_dir}", flush=True)
        return 130

    def _collect_or_restart(self, point: dict) -> int | None:
        """Collect; on an env failure restart that copy and redo the iteration within
        --max_env_restarts. Returns an exit status to stop with, or None to go on."""
        cfg = self.config
        while True:
            try:
                self.collect()
                return None
            except Interrupted:
                return self._stop_at(point)
            except EnvError as exc:
                if self.env_restarts >= cfg.max_env_restarts or exc.env_index is None:
                    path = self.save(point)
                    print(f"error: {exc}; no env restarts left (--max_env_restarts {cfg.max_env_restarts}); "
                          f"checkpoint at {point['counters']['env_steps']} env steps saved to {path}", flush=True)
                    return 1
                self.env_restarts += 1
                print(f"warning: {exc}; restarting env {exc.env_index} ({self.env_restarts}/"
                      f"{cfg.max_env_restarts}) and redoing iteration {self.iteration + 1}", flush=True)
                try:
                    self._restore_point(point)
                    self._take_step(self.env.restart(exc.env_index))
                except EnvError as failed:
                    path = self.save(point)
                    print(f"error: restarting env {exc.env_index} failed: {failed}; checkpoint at "
                          f"{point['counters']['env_steps']} env steps saved to {path}", flush=True)
                    return 1

    def run(self) -> int:
        cfg = self.config
        self._session_start = time.time()
        previous = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        window_start, window_steps = time.time(), self.env_steps
        try:
            if self.stop_signal is not None:  # received while starting up
                return self._stop_at(self.resume_point())
            while self.env_steps < cfg.num_env_steps:
                before, threads = rebalance_threads()
                if threads != before:
                    print(f"\ntorch threads: {before} -> {threads} (runs sharing this machine's cores "
                          "changed; --torch_threads N fixes the count)", flush=True)
                point = self.resume_point()
                status = self._collect_or_restart(point)
                if status is not None:
                    return status
                t0 = time.perf_counter()
                for key, value in self.learn().items():
                    self.window_stats[key].append(value)
                self.phase["update_s"] += time.perf_counter() - t0
                self.iteration += 1
                last = self.env_steps >= cfg.num_env_steps
                eval_result = None
                if cfg.use_eval and (self.iteration % cfg.eval_interval == 0 or last):
                    eval_start = time.time()
                    try:
                        eval_result = self.last_eval = self.evaluate()
                    except EnvError as exc:  # keep this iteration's updates: save them, then stop
                        path = self.save(self.resume_point())
                        print(f"error: {exc}; checkpoint at {self.env_steps} env steps saved to {path}", flush=True)
                        return 1
                    self.phase["eval_s"] += time.time() - eval_start
                    window_start += time.time() - eval_start  # sps is training throughput
                if self.iteration % cfg.log_interval == 0 or eval_result is not None or last:
                    now = time.time()
                    window_sps = (self.env_steps - window_steps) / max(now - window_start, 1e-9)
                    self.logger.log(self._row(eval_result, window_sps))
                    if cfg.progress:
                        extra = f"  eval_return {eval_result['eval_return']:.3g}" if eval_result else ""
                        self.logger.progress(self.env_steps, cfg.num_env_steps, window_sps,
                                             self._train_episode_stats()["train_episode_return"], extra)
                    window_start, window_steps = now, self.env_steps
                    self.phase.clear()
                    self.window_stats.clear()
                if self.iteration % cfg.save_interval == 0 or last or self.stop_signal is not None:
                    self.save(self.resume_point())
                if self.stop_signal is not None:
                    print(f"\ninterrupted: checkpoint at {self.env_steps} env steps saved; "
                          f"continue with --resume {self.run_dir}", flush=True)
                    return 130
            if cfg.use_eval and self.last_eval.get("env_steps") != self.env_steps:
                # Resumed with --num_env_steps at or below the steps already done.
                print(f"note: evaluating the final policy ({self.env_steps} env steps) for summary.json", flush=True)
                self.last_eval = self.evaluate()
            summary = self.write_summary()
            mean = summary.get("eval_return_mean")
            shown = f", eval_return_mean {mean:.4g}" if mean is not None else ""
            print(f"\ndone: {self.env_steps} env steps in {summary['wall_seconds']:.0f} s{shown}; "
                  f"{self.run_dir / 'summary.json'}", flush=True)
            return 0
        except NumericalError as exc:
            print(f"\nerror: {exc}; stopped without saving, the last good checkpoint is kept", flush=True)
            return 1
        except EnvError as exc:
            print(f"\nerror: {exc}; stopped without saving, the last checkpoint is kept", flush=True)
            return 1
        except CheckpointError as exc:
            print(f"\nerror: {exc}", flush=True)
            return 1
        finally:
            release_cores()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()
            self.env.close()
            if self.eval_env is not None:
                self.eval_env.close()

    def write_summary(self) -> dict:
        wall = self.elapsed()
        summary = {"algo": self.config.algo, "env": self.config.env, "task": task_name(self.config.to_dict()),
                   "seed": self.config.seed, "env_steps": self.env_steps, "iterations": self.iteration,
                   "eval_env_steps": self.last_eval.get("env_steps"),
                   "eval_return_mean": self.last_eval.get("eval_return"),
                   "eval_return_std": self.last_eval.get("eval_return_std"),
                   **{f"eval_{m}": self.last_eval.get(f"eval_{m}") for m in self.spec.episode_metrics},
                   "train_episode_return": self._train_episode_stats()["train_episode_return"],
                   "wall_seconds": round(wall, 2), "sps": round(self.env_steps / max(wall, 1e-9), 1),
                   "env_restarts": self.env_restarts}
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        atomic_write_bytes(self.run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary
