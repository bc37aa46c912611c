"""Throughput benchmark: ``bash scripts/bench.sh [--iterations N] [training flags]``.

Runs a fixed training workload through the real runner (default: HAPPO on HalfCheetah 2x3
with its task file, 20 envs x 200 steps per update, the reference implementation's
workload, on the CPU; ``--algo hatd3`` etc.: the off-policy family with its task-file
section, warm-up ending with the first iteration) for ``--iterations`` iterations, then
steps the same vectorised envs with random actions for as many env steps. The last
line printed is one JSON object:

    {"sps": training env-steps/s (iterations 2..N: start-up such as JIT compiles and the
     off-policy warm-up excluded; "sps_with_startup" includes it), "env_only_sps": ...,
     "seconds": {"env": .., "inference": .., "buffer": .., "update": .., "other": ..}
     (iterations 2..N), "update_seconds": {"critic": .., "actor": .., "sample": ..,
     "polyak": ..} (off-policy: the parts of "update"), "peak_rss_mb": .., ...}
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch._dynamo.config

from algorithms.base import MaybeCompiled
from envs.registry import make_vec_env
from train.config import ConfigError, load_config
from train.sweep import has_flag
from train.train import main as train_main


def _peak_kib(pid: int) -> int:
    """A live process's peak resident set size (VmHWM in /proc/<pid>/status), KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class ChildPeaks(threading.Thread):
    """Samples the summed peak resident memory of this process's children (env workers)
    every ``interval`` seconds while the workload runs.

    Not ``getrusage(RUSAGE_CHILDREN)``: a child started by fork or vfork and then exec
    reports this process's peak at that moment as its own maximum, so the git call that
    records a run's revision (utils/provenance.py) would count as ~220 MB.
    """

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.peak_kib = interval, 0
        self._done = threading.Event()

    def sample(self) -> None:
        total, now = 0, time.time()
        for child in psutil.Process().children(recursive=True):
            try:
                # A child younger than a second may not have exec'd yet (git, a compiler
                # probe) and still shows this process's size: env workers live far longer.
                if now - child.create_time() >= 1.0:
                    total += _peak_kib(child.pid)
            except (OSError, ValueError, psutil.Error):  # exited meanwhile
                pass
        self.peak_kib = max(self.peak_kib, total)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kib


def peak_rss_mb(children_kib: int) -> float:
    """This process's peak resident set size plus its children's (sampled), in MB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + children_kib) / 1024.0


def random_actions(spec, step, rng: np.random.Generator, E: int) -> list[np.ndarray]:
    out = []
    for i, agent in enumerate(spec.agents):
        if agent.action_kind == "continuous":
            out.append(rng.uniform(agent.action_low, agent.action_high, (E, agent.action_dim)).astype(np.float32))
        else:  # a uniformly random available action per env
            avail = step.avail_actions[i]
            scores = rng.random(avail.shape) * avail
            out.append(scores.argmax(1).astype(np.int64))
    return out


def given(flags: list[str], name: str) -> bool:
    """Whether ``--name`` (or ``--name-with-dashes``, with or without ``=value``) is in flags."""
    return has_flag(flags, f"--{name}", f"--{name.replace('_', '-')}")


REFERENCE_ROLLOUT = ["--episode_length", "200"]  # 20 envs x 200 steps, as the reference runs it


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # as train.train
    parser.add_argument("--iterations", type=int, default=10)
    known, rest = parser.parse_known_args(argv)
    if known.iterations <= 0:
        print("error: --iterations must be a positive integer", file=sys.stderr)
        return 2
    # The benchmark sets these itself; given, they would be silently overridden.
    for name, instead in (("num_env_steps", "use --iterations"), ("results_dir", "nothing is kept"),
                          ("use_eval", "it measures training only"), ("resume", "it starts a fresh run"),
                          ("log_interval", "it reads every iteration"), ("save_interval", "it saves once"),
                          ("tensorboard", "it writes no event files"), ("progress", "its last line is the result")):
        if given(rest, name) or given(rest, f"no-{name}"):
            print(f"error: --{name} is set by the benchmark ({instead})", file=sys.stderr)
            return 2
    if not any(given(rest, f) for f in ("env", "scenario", "agent_conf", "config", "episode_length")):
        rest = rest + REFERENCE_ROLLOUT

    cpu = [] if given(rest, "device") else ["--device", "cpu"]  # the CPU unless --device says otherwise
    try:
        base = load_config(rest + cpu,
                           warn_unused=False)  # the run below warns
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Off-policy warm-up ends with the first iteration, which the steady-state figures leave
    # out, so every measured iteration updates.
    off_policy = base.off_policy
    steps_per_vector_env = base.train_interval if off_policy else base.episode_length
    steps_per_iter = base.steps_per_iteration
    if off_policy and not given(rest, "warmup_steps"):
        rest = rest + ["--warmup_steps", str(steps_per_iter)]
        base = dataclasses.replace(base, warmup_steps=steps_per_iter)
    total = known.iterations * steps_per_iter
    with tempfile.TemporaryDirectory() as tmp:
        flags = rest + ["--num_env_steps", str(total), "--results_dir", tmp, "--no-use_eval",
                        "--log_interval", "1", "--save_interval", str(known.iterations),
                        "--no-tensorboard", "--no-progress", *cpu]
        children = ChildPeaks()
        children.start()
        start = time.time()
        captured = io.StringIO()  # the run's own lines name a directory that is deleted below
        with contextlib.redirect_stdout(captured):
            code = train_main(flags)
        wall = time.time() - start
        children_kib = children.stop()
        if code != 0:
            print(captured.getvalue(), end="", flush=True)
            return code
        run_dir = next(Path(tmp).rglob("summary.json")).parent
        summary = json.loads((run_dir / "summary.json").read_text())
        with open(run_dir / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
    # Steady state: iteration 1 carries one-off start-up (JIT compiles, allocator warm-up).
    steady = rows[1:] if len(rows) > 1 else rows
    steady_seconds = float(steady[-1]["wall_seconds"]) - (float(rows[0]["wall_seconds"]) if len(rows) > 1 else 0.0)
    steady_steps = int(steady[-1]["env_steps"]) - (int(rows[0]["env_steps"]) if len(rows) > 1 else 0)
    phases: dict[str, float] = {}
    update_parts: dict[str, float] = {}  # off-policy: time/update_<part>_s, within time/update_s
    for row in steady:
        for key, value in row.items():
            if key.startswith("time/") and value:
                phase = key[len("time/"):-len("_s")]
                parts = update_parts if phase.startswith("update_") else phases
                phase = phase[len("update_"):] if phase.startswith("update_") else phase
                parts[phase] = parts.get(phase, 0.0) + float(value)
    phases["other"] = max(steady_seconds - sum(phases.values()), 0.0)
    train_seconds = summary["wall_seconds"]

    # The same envs with random actions: what the simulator alone allows.
    env = make_vec_env(base, n_envs=base.n_rollout_threads, seed=base.seed)
    rng = np.random.default_rng(0)
    step = env.reset(base.seed)
    actions = random_actions(env.spec, step, rng, env.n_envs)
    for _ in range(3):  # compile / warm up, as the training figure excludes start-up too
        step = env.step(actions)
        if env.spec.discrete:
            actions = random_actions(env.spec, step, rng, env.n_envs)
    t0 = time.perf_counter()
    for _ in range(known.iterations * steps_per_vector_env):
        step = env.step(actions)
        if env.spec.discrete:
            actions = random_actions(env.spec, step, rng, env.n_envs)
    env_only_sps = total / (time.perf_counter() - t0)
    env.close()
    # What ran: --compile, not switched off by TORCH_COMPILE_DISABLE, and no fall-back.
    compiled = base.compiles_actor_loss and not torch._dynamo.config.disable and not MaybeCompiled.fell_back
    if off_policy:
        updates = round(base.train_interval * base.update_per_train)
        workload = (f"{base.algo} {env.spec.name} {base.n_rollout_threads}x{base.train_interval} "
                    f"batch={base.batch_size} updates/iteration={updates} hidden={base.hidden_sizes}")
    else:
        workload = (f"{base.algo} {env.spec.name} {base.n_rollout_threads}x{base.episode_length} "
                    f"epochs={base.ppo_epoch} minibatches={base.actor_num_mini_batch} "
                    f"hidden={base.hidden_sizes} workers={base.n_env_workers} "
                    f"compile={'on' if compiled else 'off'}")
    result = {"workload": workload,
              "iterations": known.iterations, "env_steps": total,
              "sps": round(steady_steps / steady_seconds, 1), "env_only_sps": round(env_only_sps, 1),
              "seconds": {k: round(v, 3) for k, v in phases.items()},
              **({"update_seconds": {k: round(v, 3) for k, v in update_parts.items()}} if update_parts else {}),
              "sps_with_startup": round(total / train_seconds, 1), "train_seconds": round(train_seconds, 3),
              "process_seconds": round(wall, 3), "peak_rss_mb": round(peak_rss_mb(children_kib), 1),
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
