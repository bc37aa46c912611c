"""Crash-safety acceptance experiment: ``python -m train.chaos [chaos flags] [training flags]``.

1. Train the configuration uninterrupted to its budget (a subprocess of ``train.train``).
2. Train the same configuration again, SIGKILL-ing the process ``--kills`` times (default 3)
   at random moments and resuming it with ``--resume <run dir>`` each time, until done.
3. Compare the two ``metrics.csv`` files: row counts, env_steps strictly increasing with no
   gaps (every iteration the runner logs, exactly once), and the learning columns (all but
   utils.logger.MACHINE_COLUMNS and time/*) of the final row and of every row equal.

Prints one line per step and, last, one JSON line with the results; exits 0 only if every
check passes (1 if one fails, 2 for bad flags).

Chaos flags (everything else is passed to ``train.train``):
  --kills N          SIGKILLs of the interrupted run (default 3)
  --chaos_seed S     seed of the kill moments (default: random, printed)
  --chaos_dir DIR    where both runs go, not one holding an earlier experiment's runs
                     (default: <--results_dir or results>/chaos/<time>-<pid>)

A kill happens a random delay after the running process has written a checkpoint of its
own (so every restart makes progress); the delay is drawn uniformly from
[0, remaining training time / (kills left + 1)], estimated from the uninterrupted run, so
kills land anywhere in an iteration: collecting, updating, logging or checkpointing.
Unless given, ``--device cpu --torch_threads 1`` are added: bitwise equality is only
promised for identical CPU runs, and ``--save_interval`` is lowered so that the run writes
about twice as many checkpoints as there are kills (a given one that leaves too few is an
error).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from algorithms.registry import FAMILY_OF
from train.config import ConfigError, load_config
from train.sweep import absolutize_paths, drop_flag
from train.train import ensure_writable, is_sweep, run_dir_for
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.logger import varies_by_machine

REPO = Path(__file__).resolve().parent.parent


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def iterations(config: dict[str, Any]) -> tuple[int, int]:
    """(env steps per iteration, iterations the run trains for)."""
    # An on-policy iteration is one rollout; an off-policy one, --train_interval vector steps.
    off_policy = FAMILY_OF[str(config["algo"])] == "off-policy"
    steps = config["train_interval"] if off_policy else config["episode_length"]
    per_iter = int(config["n_rollout_threads"]) * int(steps)
    return per_iter, -(-int(config["num_env_steps"]) // per_iter)


def expected_env_steps(config: dict[str, Any]) -> list[int]:
    """env_steps of every row the runner writes: each log interval, each evaluation, the last."""
    per_iter, n_iter = iterations(config)
    out = []
    for i in range(1, n_iter + 1):
        evaluated = config["use_eval"] and i % int(config["eval_interval"]) == 0
        if i % int(config["log_interval"]) == 0 or evaluated or i == n_iter:
            out.append(i * per_iter)
    return out


def compare(rows: list[dict[str, str]], reference: list[dict[str, str]], config: dict[str, Any]) -> dict[str, Any]:
    """The checks of the experiment, as a dict of plain values."""
    steps = [int(float(r["env_steps"])) for r in rows]
    learn = [{k: v for k, v in r.items() if not varies_by_machine(k)} for r in rows]
    ref = [{k: v for k, v in r.items() if not varies_by_machine(k)} for r in reference]
    differing = [k for k in sorted(set(learn[-1]) | set(ref[-1])) if learn[-1].get(k) != ref[-1].get(k)] \
        if learn and ref else ["<no rows>"]
    first_bad = next((int(float(a["env_steps"])) for a, b in zip(learn, ref) if a != b), None)
    return {
        "rows": len(rows),
        "rows_uninterrupted": len(reference),
        "env_steps_strictly_increasing": bool(steps) and all(a < b for a, b in zip(steps, steps[1:])),
        "no_gaps": steps == expected_env_steps(config),
        "final_metrics_equal": not differing,
        "all_rows_equal": len(learn) == len(ref) and first_bad is None,
        "final_differing_columns": differing[:10],
        "first_differing_env_steps": first_bad,
    }


def file_id(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class Child:
    """One ``train.train`` process, output to a log file."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "train.train", *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def tail(self, n: int = 15) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join("    | " + line for line in lines[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="train.chaos", allow_abbrev=False, add_help=False)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--chaos_seed", "--chaos-seed", type=int, default=None)
    parser.add_argument("--chaos_dir", "--chaos-dir", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)


def _flag_value(flags: list[str], *names: str) -> str | None:
    for k, token in enumerate(flags):
        name, eq, inline = token.partition("=")
        if name in names:
            return inline if eq else (flags[k + 1] if k + 1 < len(flags) else None)
    return None


def check_chaos_dir(chaos_dir: Path, flag: str) -> None:
    """Last of the checks (it creates the directory). An earlier experiment's runs there would
    make the new uninterrupted run refuse to start, and only after the checks ran."""
    held = [name for name in ("uninterrupted", "killed") if (chaos_dir / name).exists()]
    if held:
        raise ConfigError(f"{flag} {chaos_dir} already holds runs ({', '.join(held)}): choose an empty "
                          "directory or remove it")
    ensure_writable(chaos_dir, flag)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts, flags = parse(argv)
    if opts.help:
        print(__doc__)
        return 0
    try:
        if opts.kills < 0:
            raise ConfigError(f"--kills must be >= 0; got {opts.kills}")
        forbidden = {"--resume", "--eval_only", "--eval-only", "--model_dir", "--model-dir"}
        if is_sweep(flags) or any(token.partition("=")[0] in forbidden for token in flags):
            raise ConfigError("train.chaos runs one training configuration: no sweeps, --resume or --eval_only")
        if _flag_value(flags, "--device") is None:
            flags += ["--device", "cpu"]
        if _flag_value(flags, "--torch_threads", "--torch-threads") is None:
            flags += ["--torch_threads", "1"]
        if "--progress" not in flags and "--no-progress" not in flags:
            flags += ["--no-progress"]
        base = Path(_flag_value(flags, "--results_dir", "--results-dir") or "results")
        flags = drop_flag(flags, "--results_dir", "--results-dir")
        chaos_dir = Path(opts.chaos_dir) if opts.chaos_dir else base / "chaos" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        # The runs start in the repository root: paths relative to here must not move.
        chaos_dir = chaos_dir.absolute()
        flags = absolutize_paths(flags)
        config = load_config(flags)  # validates every flag before anything runs
        # Every kill lands after a checkpoint the killed process wrote itself, so the run must
        # write more checkpoints than there are kills (the last one is at the end).
        _, n_iter = iterations(config.to_dict())
        if _flag_value(flags, "--save_interval", "--save-interval") is None:
            interval = max(1, n_iter // (2 * opts.kills + 2))
            if interval < config.save_interval:
                flags += ["--save_interval", str(interval)]
                config = load_config(flags, warn_unused=False)  # warned above
        if opts.kills and n_iter // config.save_interval < opts.kills + 1:
            raise ConfigError(f"--kills {opts.kills} needs more than {opts.kills} checkpoints before the last "
                              f"iteration; {n_iter} iterations with --save_interval {config.save_interval} "
                              f"write {n_iter // config.save_interval}: lower --save_interval or raise "
                              "--num_env_steps")
        check_chaos_dir(chaos_dir, "--chaos_dir" if opts.chaos_dir else "--results_dir")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed = opts.chaos_seed if opts.chaos_seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    cfg = config.to_dict()
    chaos_dir.mkdir(parents=True, exist_ok=True)
    ref_dir = run_dir_for(dataclasses.replace(config, results_dir=str(chaos_dir / "uninterrupted")))
    run_dir = run_dir_for(dataclasses.replace(config, results_dir=str(chaos_dir / "killed")))
    print(f"chaos: {opts.kills} SIGKILLs, chaos seed {seed}, results under {chaos_dir}", flush=True)
    result: dict[str, Any] = {"kills_requested": opts.kills, "chaos_seed": seed, "chaos_dir": str(chaos_dir)}

    # 1. uninterrupted
    t0 = time.time()
    child = Child([*flags, "--results_dir", str(chaos_dir / "uninterrupted")], chaos_dir / "uninterrupted.log")
    try:
        rc = child.proc.wait()
    finally:
        child.kill()
    print(f"uninterrupted run: exit {rc} after {time.time() - t0:.1f} s ({ref_dir})", flush=True)
    if rc != 0:
        print(child.tail(), flush=True)
        print(json.dumps({**result, "ok": False, "failure": f"uninterrupted run exited {rc}"}))
        return 1
    summary = json.loads((ref_dir / "summary.json").read_text())
    seconds_per_step = float(summary["wall_seconds"]) / max(int(summary["env_steps"]), 1)

    # 2. killed and resumed
    last = run_dir / "checkpoints" / "last.pt"
    kills, loads_ok, starts, failure = 0, True, 0, None
    budget = int(cfg["num_env_steps"])
    while failure is None:
        starts += 1
        args = ([*flags, "--results_dir", str(chaos_dir / "killed")] if starts == 1
                else ["--resume", str(run_dir), "--no-progress"])
        before = file_id(last)
        child = Child(args, chaos_dir / f"killed-{starts}.log")
        try:
            if kills < opts.kills:
                while file_id(last) == before and child.proc.poll() is None:
                    time.sleep(0.01)
                done = load_checkpoint(run_dir)["counters"]["env_steps"] if last.exists() else 0
                remaining = max(budget - done, 0) * seconds_per_step
                delay = rng.uniform(0.0, remaining / (opts.kills - kills + 1))
                deadline = time.time() + delay
                while time.time() < deadline and child.proc.poll() is None:
                    time.sleep(0.005)
                if child.proc.poll() is not None:
                    rc = child.proc.returncode
                    if rc == 0:
                        failure = (f"process {starts} finished before kill {kills + 1} could land "
                                   "(too few checkpoints left: lower --save_interval)")
                        print(failure, flush=True)
                        break
                    failure = f"process {starts} exited {rc} before being killed"
                    print(child.tail(), flush=True)
                    break
                child.kill()
                kills += 1
                try:
                    ckpt = load_checkpoint(run_dir)
                    note = f"checkpoint loads: {ckpt['counters']['env_steps']} env steps"
                except CheckpointError as exc:
                    loads_ok, note = False, f"CHECKPOINT DOES NOT LOAD: {exc}"
                print(f"kill {kills}: SIGKILL {delay:.2f} s after process {starts} wrote its first checkpoint; "
                      f"{note}", flush=True)
                if not loads_ok:
                    failure = "checkpoint unreadable after a kill"
            else:
                rc = child.proc.wait()
                print(f"process {starts} ran to the end: exit {rc}", flush=True)
                if rc != 0:
                    failure = f"final resumed process exited {rc}"
                    print(child.tail(), flush=True)
                break
        finally:
            child.kill()

    # 3. compare
    result.update(compare(read_rows(run_dir), read_rows(ref_dir), cfg))
    result.update({"kills": kills, "processes": starts, "checkpoint_loaded_after_every_kill": loads_ok})
    if failure:
        result["failure"] = failure
    checks = ("env_steps_strictly_increasing", "no_gaps", "final_metrics_equal", "all_rows_equal",
              "checkpoint_loaded_after_every_kill")
    result["ok"] = failure is None and kills == opts.kills and all(result[c] for c in checks)
    print(f"rows: {result['rows']} (uninterrupted {result['rows_uninterrupted']})")
    print(f"env_steps strictly increasing: {result['env_steps_strictly_increasing']}; "
          f"no gaps: {result['no_gaps']}")
    print(f"final learning metrics equal the uninterrupted run's: {result['final_metrics_equal']}"
          + ("" if result["final_metrics_equal"] else f" (differ: {result['final_differing_columns']})"))
    print(f"every row's learning metrics equal: {result['all_rows_equal']}"
          + ("" if result["first_differing_env_steps"] is None
             else f" (first difference at env_steps {result['first_differing_env_steps']})"))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
