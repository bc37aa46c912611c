"""Sweeps: the cartesian product of comma lists, each run in its own process.

``python -m train.train --algo happo,hatrpo --seeds 1,2,3 --max_parallel 3 [flags]``
(``train.train`` hands any command line with a comma list in a sweep axis flag (``--algo``,
``--seed`` and the task flags: ``--scenario``, ``--agent_conf``, ``--agent_obsk``,
``--obs_mode``, ``--map_name``), or with ``--seeds``, ``--max_parallel`` or
``--ray_address``, to ``run`` here; ``main`` is the same from an argv).

* The command line is parsed once; each combination's flags resolve to its ``Config``
  (train/config.py), and all runs are validated before any starts (bad flags: one line,
  exit status 2).
* Every run is ``python -m train.train <its flags> --no-progress`` in the repository root,
  its flags written from the flags that resolved its Config (``flags_to_argv``): the
  sweep's flags with the combination's values, relative ``--results_dir`` and ``--config``
  paths made absolute (they mean what they mean for a single run started where the sweep
  was started), one torch thread unless ``--torch_threads`` (flag or config file) says
  otherwise, and without the flags the run does not read (``--ppo_epoch`` in a HATRPO run).
* At most ``--max_parallel`` runs at a time (default: the number of CPU cores).
* A run's output goes to ``<results_dir>/sweep-logs/<env>_<task>_<algo>_<exp>_seed<n>.log``
  (appended to, after a header line naming the sweep).
* A failed run is reported as it ends (exit status and the last line of its log); the
  others carry on. At the end one line per run; exit status 0 if every run succeeded, 1
  otherwise, 130 if interrupted (Ctrl-C / SIGTERM: running runs save a checkpoint).
* The same command again continues a sweep: a run whose directory already holds it
  resumes (``--resume``, which refuses changed settings), a finished one exits 0 at once.
* ``--ray_address auto|<address>|local`` runs the same commands as Ray tasks
  (``num_cpus=1`` each) on a Ray cluster; ``local`` starts a private local Ray instance
  with ``--max_parallel`` CPUs. Results and logs must then be on a file system every node
  sees, and the repository must live at the same path on every node.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.registry import task_name
from train.config import (DEFAULT_ENV_VARIABLE, REPO_ROOT, CommandLine, Config, config_from_dict, fields_where,
                          flags_to_argv, parse_command_line, read_yaml, resolve, run_dir_for, unused_flags)
from utils.dirlock import held_elsewhere
from utils.errors import STOP_SIGNALS, ConfigError

LOG_TAIL_LINES = 20


@dataclass
class Run:
    label: str  # e.g. "HalfCheetah-2x3 happo seed 1"
    config: Config  # what it trains
    argv: list[str]  # flags for train.train, written from the flags that resolved ``config``
    run_dir: Path
    log: Path
    returncode: int | None = None
    tail: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""  # why it could not run at all (e.g. a Ray task crashed)
    resumed: bool = False  # its run directory already held this run: it continues (--resume)

    @property
    def pid_file(self) -> Path:
        """Where run_command keeps the pid of the process training this run while it lives."""
        return Path(f"{self.log}.pid")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_line(self) -> str:
        return self.error or next((line for line in reversed(self.tail) if line.strip()), "(no output)")


# -- argv tokens (train/chaos.py and train/bench.py edit command lines they pass on) -------------
PATH_FLAGS = ("--config",)


def absolutize_paths(tokens: list[str]) -> list[str]:
    """A relative --config path, made absolute (the runs start in the repository root)."""
    out = list(tokens)
    for k, token in enumerate(out):
        name, eq, inline = token.partition("=")
        if name not in PATH_FLAGS:
            continue
        if eq and inline:
            out[k] = f"{name}={os.path.abspath(inline)}"
        elif not eq and k + 1 < len(out) and out[k + 1]:
            out[k + 1] = os.path.abspath(out[k + 1])
    return out


def drop_flag(tokens: list[str], *names: str) -> list[str]:
    """``tokens`` without the valued flag ``names`` (``--x v`` and ``--x=v`` forms)."""
    out, k = [], 0
    while k < len(tokens):
        name, eq, _ = tokens[k].partition("=")
        if name in names:
            k += 1 if eq else 2
            continue
        out.append(tokens[k])
        k += 1
    return out


def has_flag(tokens: list[str], *names: str) -> bool:
    return any(t.partition("=")[0] in names for t in tokens)


# -- planning ------------------------------------------------------------------------------------
@dataclass
class Plan:
    runs: list[Run]
    max_parallel: int
    ray_address: str | None
    max_parallel_given: bool = False  # --max_parallel on the command line (bounds a Ray cluster too)


def changed_settings(config: Config, run_dir: Path) -> str:
    """The settings in which ``config`` differs from the run saved in ``run_dir`` (runtime
    and command-only fields aside), as "name: saved -> new, ..."; empty if none or if no
    config.yaml is there."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return ""
    saved = config_from_dict(read_yaml(path), str(path)).to_dict()
    ignored = {*fields_where("runtime"), *fields_where("command_only")}
    return ", ".join(f"{key}: {saved[key]!r} -> {value!r}" for key, value in config.to_dict().items()
                     if key not in ignored and saved[key] != value)


def _sweep_options(command: CommandLine) -> tuple[int, str | None]:
    """--max_parallel and --ray_address, checked."""
    max_parallel = os.cpu_count() or 1
    if "max_parallel" in command.sweep_flags:
        raw = command.sweep_flags["max_parallel"]
        try:
            max_parallel = int(raw)
        except ValueError:
            max_parallel = 0
        if max_parallel <= 0:
            raise ConfigError(f"--max_parallel must be a positive integer; got {raw!r}")
    ray_address = command.sweep_flags.get("ray_address")
    if ray_address is not None and not ray_address.strip():
        raise ConfigError("--ray_address needs a value: auto, local or <host:port>")
    return max_parallel, ray_address


def _run_flags(flags: dict[str, Any], described: str) -> tuple[dict[str, Any], Config, dict[str, str]]:
    """One combination's flags, less those its run does not read, with the Config they
    resolve to and the reasons for the ones dropped."""
    try:
        config = resolve(flags, warn_unused=False)
        unused = unused_flags(config, flags)
        if unused:  # a flag only some runs read (--ppo_epoch in --algo happo,hatrpo) goes to those
            flags = {key: value for key, value in flags.items() if key not in unused}
            config = resolve(flags, warn_unused=False)
    except ConfigError as exc:
        raise ConfigError(f"run {described or '(single)'}: {exc}") from None
    return flags, config, unused


def plan(command: list[str] | CommandLine) -> Plan:
    """Expand, validate and name every run of a sweep (argv, or one already parsed); raises
    ConfigError (nothing started)."""
    if not isinstance(command, CommandLine):
        command = parse_command_line(command)
    max_parallel, ray_address = _sweep_options(command)
    for name in fields_where("command_only"):
        if name != "config" and name in command.flags:
            raise ConfigError(f"--{name} cannot be part of a sweep (resume or evaluate runs one at a time)")
    shared = dict(command.flags)
    if shared.get("config"):
        shared["config"] = os.path.abspath(shared["config"])
    runs: list[Run] = []
    seen: dict[Path, str] = {}
    unused_in_every_run: dict[str, str] = {}
    for combo in itertools.product(*command.axes.values()):
        values = dict(zip(command.axes, combo))
        described = " ".join(f"--{key} {value}" for key, value in values.items())
        flags, config, unused = _run_flags({**shared, **values}, described)
        unused_in_every_run = unused if not runs else {k: v for k, v in unused_in_every_run.items() if k in unused}
        # What the sweep sets for every run, as flags, so the run's own parse gives this Config.
        extra: dict[str, Any] = {}
        # A swept flag that the run directory does not name (MaMuJoCo's --agent_obsk) goes
        # into --exp_name, so its runs get directories (and plot rows) of their own.
        for key, value in values.items():
            if any(run_dir_for(dataclasses.replace(config, **{key: other})) == run_dir_for(config)
                   for other in command.axes[key] if other != value):
                extra["exp_name"] = f"{extra.get('exp_name', config.exp_name)}-{key}{value}".replace("/", "_")
        if config.torch_threads == 0:  # not chosen by a flag or a config file
            extra["torch_threads"] = 1
        if not os.path.isabs(config.results_dir):  # relative to where the sweep started, as for one run
            extra["results_dir"] = os.path.abspath(config.results_dir)
        if os.environ.get(DEFAULT_ENV_VARIABLE) and "env" not in flags:
            extra["env"] = config.env  # a Ray worker does not inherit the launch script's variable
        extra["progress"] = False
        config = dataclasses.replace(config, **extra)
        flags = {**{k: v for k, v in flags.items() if k not in extra}, **extra}
        run_dir, task = run_dir_for(config), task_name(config.to_dict())
        if run_dir in seen:
            raise ConfigError(f"runs {seen[run_dir]!r} and {described!r} would share the run directory "
                              f"{run_dir}; sweep them separately, each with its own --exp_name")
        seen[run_dir] = described
        log = (Path(config.results_dir) / "sweep-logs"
               / f"{config.env}_{task}_{config.algo}_{config.exp_name}_seed{config.seed}.log")
        # Running a sweep again continues it: a run that already started (an interrupted sweep,
        # a reboot) resumes from its checkpoint, a finished one says so and exits 0. --resume keeps
        # the run's own config and refuses a changed flag (one line), so a reused --exp_name with
        # other settings fails rather than mixing two configs in one run.
        resumed = any((run_dir / name).exists() for name in ("checkpoints", "metrics.csv", "config.yaml"))
        argv = flags_to_argv(flags)
        if resumed:
            changed = changed_settings(config, run_dir)
            if changed:
                raise ConfigError(f"run {described or '(single)'}: {run_dir} holds a run with other settings "
                                  f"({changed}); choose another --exp_name, or give the run's own settings "
                                  "to continue it")
            argv = ["--resume", str(run_dir), *flags_to_argv({k: v for k, v in flags.items() if k != "config"})]
        runs.append(Run(label=f"{task} {config.algo} {config.exp_name} seed {config.seed}", config=config,
                        argv=argv, run_dir=run_dir, log=log, resumed=resumed))
    for name, why in unused_in_every_run.items():
        print(f"warning: --{name} has no effect in any run of this sweep: {why}", file=sys.stderr, flush=True)
    return Plan(runs, max_parallel, ray_address, "max_parallel" in command.sweep_flags)


# -- executing one run (also the body of a Ray task: standard library only) --------------------
def run_command(argv: list[str], log_path: str, repo_root: str, header: str,
                tail_lines: int = LOG_TAIL_LINES, on_start=None,
                new_session: bool = False) -> tuple[int, list[str]]:
    """``python -m train.train <argv>`` in ``repo_root``, output appended to ``log_path``.

    Returns (exit status, last lines of the log). ``on_start(popen)`` lets the caller
    forward signals; with ``new_session`` the run does not receive the terminal's Ctrl-C
    itself (the caller forwards exactly one signal, see ``LocalPool``). While the run lives,
    ``<log_path>.pid`` holds its process id (a local Ray sweep interrupts its runs by it).
    """
    import collections
    import contextlib
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    command = [sys.executable, "-m", "train.train", *argv]
    with open(log_path, "ab") as log:
        log.write(f"=== {header}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(command, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=new_session)
        except OSError as exc:
            log.write(f"could not start {command[0]}: {exc}\n".encode())
            return 127, [f"could not start {command[0]}: {exc}"]
        if on_start is not None:
            on_start(proc)
        pid_path = log_path + ".pid"
        with open(pid_path, "w") as pid_file:
            pid_file.write(str(proc.pid))
        try:
            returncode = proc.wait()
        finally:
            with contextlib.suppress(OSError):
                os.remove(pid_path)
    with open(log_path, "rb") as log:
        log.seek(max(0, os.path.getsize(log_path) - 16_384))
        lines = log.read().decode(errors="replace").splitlines()
    return returncode, list(collections.deque(lines, maxlen=tail_lines))


def _header(run: Run) -> str:
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    return f"sweep {stamp}: python -m train.train {shlex.join(run.argv)}"


# -- reporting ---------------------------------------------------------------------------------
def report_finished(run: Run, done: int, total: int) -> None:
    if run.ok:
        print(f"[{done}/{total}] ok      {run.label} ({run.seconds:.0f} s)", flush=True)
    else:
        status = f"exit {run.returncode}" if run.returncode is not None else "did not run"
        where = f"  (log: {run.log})" if run.log.exists() else ""
        print(f"[{done}/{total}] FAILED  {run.label}: {status}; {run.last_line()}{where}", flush=True)


def summary_line(run: Run) -> str:
    if not run.ok:
        status = f"exit {run.returncode}" if run.returncode is not None else "did not run"
        return f"failed  {run.run_dir}  {status}: {run.last_line()}"
    parts = []
    try:
        summary = json.loads((run.run_dir / "summary.json").read_text())
        for key in ("eval_win_rate", "eval_return_mean"):
            if summary.get(key) is not None:
                parts.append(f"{key} {summary[key]:.4g}")
    except (OSError, ValueError):
        parts.append("(no summary.json)")
    return f"ok      {run.run_dir}  {' '.join(parts) or 'no evaluation'}"


# -- local pool ----------------------------------------------------------------------------
class LocalPool:
    """At most ``max_parallel`` runs at a time, each a subprocess driven from a thread."""

    def __init__(self, runs: list[Run], max_parallel: int):
        self.runs, self.max_parallel = runs, max_parallel
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def _one(self, run: Run) -> Run:
        if self.stopping:
            run.error = "not started (sweep interrupted)"
            return run
        start = time.time()

        def started(proc):
            with self.lock:
                self.live.add(proc)
                if self.stopping:  # a signal arrived while it was starting
                    proc.send_signal(signal.SIGTERM)

        try:
            run.returncode, run.tail = run_command(run.argv, str(run.log), str(REPO_ROOT), _header(run),
                                                   on_start=started, new_session=True)
        except OSError as exc:
            run.error = f"could not write the log {run.log}: {exc.strerror}"
        finally:
            with self.lock:
                self.live = {p for p in self.live if p.poll() is None}
        run.seconds = time.time() - start
        return run

    def _stop(self, signum, frame) -> None:
        """SIGINT/SIGTERM/SIGHUP: start nothing new; the runs save a checkpoint and stop."""
        self.stopping = True
        with self.lock:
            for proc in self.live:
                if proc.poll() is None:
                    try:
                        proc.send_signal(signum)
                    except OSError:
                        pass
        print(f"\nsweep: stopping (signal {signum}); running runs save a checkpoint and stop", flush=True)

    def execute(self) -> None:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS}
        try:
            with ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
                futures = [pool.submit(self._one, run) for run in self.runs]
                for done, future in enumerate(as_completed(futures), 1):
                    report_finished(future.result(), done, len(self.runs))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# -- Ray ---------------------------------------------------------------------------------------
def execute_ray(runs: list[Run], address: str, max_parallel: int, parallel_given: bool) -> bool:
    """The same commands as Ray tasks (one CPU each), reported as they finish; True if
    interrupted (Ctrl-C)."""
    import logging

    import ray
    from ray import cloudpickle

    # Ship run_command by value: workers need neither this repository on sys.path nor its
    # packages (run_command uses the standard library only).
    cloudpickle.register_pickle_by_value(sys.modules[run_command.__module__])
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address == "local":
            ray.init(address="local", num_cpus=max_parallel, **options)
        else:
            ray.init(address=address, **options)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ... depending on the cause
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--ray_address {address}: could not start or reach Ray: {reason}") from None
    task = ray.remote(num_cpus=1, max_retries=0)(run_command)
    # A cluster has its own CPU count; only an explicit --max_parallel bounds the runs in flight.
    limit = max_parallel if (parallel_given or address == "local") else len(runs)
    pending = list(runs)
    for run in pending:  # a pid left by a sweep that died would name some other process now
        run.pid_file.unlink(missing_ok=True)
    in_flight: dict = {}
    done = 0
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                run = pending.pop(0)
                in_flight[task.remote(run.argv, str(run.log), str(REPO_ROOT), _header(run))] = (run, time.time())
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                run, start = in_flight.pop(ref)
                try:
                    run.returncode, run.tail = ray.get(ref)
                except Exception as exc:  # the task or its worker died
                    reason = (str(exc).strip().splitlines() or [""])[-1]
                    run.error = f"Ray task failed: {type(exc).__name__} {reason}".strip()
                run.seconds = time.time() - start
                done += 1
                report_finished(run, done, len(runs))
    except KeyboardInterrupt:
        print("\nsweep: interrupted; cancelling the Ray tasks", flush=True)
        if address == "local":
            # Cancelling a task neither stops nor signals its run, and shutting Ray down then
            # kills it unsaved: on this machine, interrupt the runs as a local sweep does (they
            # save a checkpoint) and wait for them first. A cluster's runs keep their last
            # periodic checkpoint.
            for run, _ in in_flight.values():
                _interrupt(run)
            _wait_for_runs([run for run, _ in in_flight.values()])
        for ref, (run, _) in in_flight.items():
            ray.cancel(ref)
            run.error = "cancelled (sweep interrupted)"
        for run in pending:
            run.error = "not started (sweep interrupted)"
        return True
    finally:
        ray.shutdown()
    return False


def _interrupt(run: Run) -> None:
    """SIGINT to the process training ``run`` on this machine (its pid from run_command)."""
    try:
        pid = int(run.pid_file.read_text())
        os.kill(pid, signal.SIGINT)
    except (OSError, ValueError):  # not started yet, or finished meanwhile
        pass


def _wait_for_runs(runs: list[Run], timeout: float = 300.0) -> None:
    """Wait (at most ``timeout`` s in all) until no process trains any of ``runs``: a
    training process holds its run directory's lock (train.train.lock_run_dir)."""
    deadline = time.time() + timeout
    for run in runs:
        # held_elsewhere is False where no lock is possible: nothing to wait on there
        while run.run_dir.is_dir() and time.time() < deadline and held_elsewhere(run.run_dir):
            time.sleep(0.2)


# -- entry point -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m train.sweep [flags]``: the sweep ``argv`` describes (the same flags as
    ``python -m train.train``); exit status as in the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command = parse_command_line(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(command)


def run(command: CommandLine) -> int:
    """Plan, validate and execute the sweep of a parsed command line."""
    try:
        sweep = plan(command)
        if sweep.ray_address:
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ConfigError("--ray_address needs Ray, which is not installed here: pip install ray") from None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = sweep.runs
    where = f"Ray ({sweep.ray_address})" if sweep.ray_address else "this machine"
    print(f"sweep: {len(runs)} run(s), at most {sweep.max_parallel} at a time, on {where}; "
          f"logs in {runs[0].log.parent}", flush=True)
    resumed = [run for run in runs if run.resumed]
    if resumed:
        print(f"sweep: {len(resumed)} run(s) already started here continue from their run directories "
              f"(--resume): {', '.join(run.label for run in resumed)}", flush=True)
    if sweep.ray_address:
        try:
            interrupted = execute_ray(runs, sweep.ray_address, sweep.max_parallel, sweep.max_parallel_given)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        pool = LocalPool(runs, sweep.max_parallel)
        pool.execute()
        interrupted = pool.stopping
    n_ok = sum(run.ok for run in runs)
    print(f"sweep summary: {n_ok}/{len(runs)} run(s) succeeded", flush=True)
    for run in runs:
        print(summary_line(run), flush=True)
    if interrupted:
        print("sweep: interrupted; run the same command again to continue it", flush=True)
        return 130
    return 0 if n_ok == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
