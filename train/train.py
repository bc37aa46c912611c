"""Entry point: ``python -m train.train [flags]`` (see ``--help`` and train/config.py).

Resolves the configuration, creates (or reopens, with ``--resume``) the run directory
``<results_dir>/<env>/<task>/<algo>/<exp_name>/seed-<n>/`` and runs, evaluates or resumes.
Bad input exits with status 2 and one line on stderr; nothing already saved is touched.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from envs.base import EnvError
from envs.registry import make_vec_env
from runners import runner_class
from train import sweep
from train.config import (CommandLine, Config, config_from_dict, fields_where, load_config, parse_command_line,
                          read_yaml, run_dir_for, save_config)
from utils import provenance
from utils.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from utils.dirlock import try_lock
from utils.errors import STOP_SIGNALS, ConfigError


def ensure_writable(directory: Path, flag: str) -> None:
    existing = next((d for d in (directory, *directory.parents) if d.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{flag} {directory}: {existing} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {directory} is not writable: {exc.strerror}") from None


def resume_config(flags: dict) -> tuple[Config, dict]:
    """Config of the run being resumed, with runtime flags (steps, device, ...) applied.
    ``flags``: the Config fields given on the command line (``CommandLine.flags``)."""
    run_dir = Path(flags["resume"])
    if run_dir.is_file():
        raise ConfigError(f"--resume takes the run directory, not a file; got {run_dir}")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    for key in fields_where("command_only"):
        if key in flags and key != "resume":
            raise ConfigError(f"--{key} cannot be used with --resume: a resumed run keeps its own "
                              "config (runtime flags such as --num_env_steps still apply)")
    checkpoint = None
    if not checkpoint_path(run_dir).exists() and (run_dir / "config.yaml").exists():
        # Stopped before its first checkpoint: nothing was kept, start it again from its config.
        saved_values = read_yaml(run_dir / "config.yaml")
        saved = config_from_dict(saved_values, f"{run_dir}/config.yaml")
        lost = saved_checkpoint_evidence(run_dir, saved)
        if lost:  # starting over would wipe metrics.csv of a run that did have a checkpoint
            raise ConfigError(f"--resume {run_dir}: {checkpoint_path(run_dir).relative_to(run_dir)} is missing, "
                              f"but {lost}, so the run had saved one; nothing was changed (restore the "
                              "checkpoint, or train a new run with another --exp_name or --seed)")
    else:
        try:
            checkpoint = load_checkpoint(run_dir)
        except CheckpointError as exc:
            raise ConfigError(f"--resume {run_dir}: {exc}") from None
        saved_values = checkpoint["config"]
        saved = config_from_dict(saved_values, f"{run_dir}/checkpoints")
    if "compile" not in saved_values:
        saved = dataclasses.replace(saved, compile=False)  # saved before --compile existed: trained eager
    overrides = {}
    for key, value in config_from_dict({k: v for k, v in flags.items()}, "command line").to_dict().items():
        if key not in flags:
            continue
        if key == "results_dir":  # the run stays where it is; config.yaml keeps where it was made
            if Path(value).resolve() != Path(saved.results_dir).resolve():
                print(f"warning: --results_dir has no effect with --resume: the run continues in {run_dir}",
                      file=sys.stderr, flush=True)
        elif key in fields_where("runtime"):
            overrides[key] = value
        elif value != getattr(saved, key):
            raise ConfigError(f"--{key} cannot change when resuming (the run used {getattr(saved, key)!r})")
    overrides["resume"] = str(run_dir)
    return dataclasses.replace(saved, **overrides).validate(), checkpoint


def saved_checkpoint_evidence(run_dir: Path, config: Config) -> str | None:
    """Why a run without ``checkpoints/last.pt`` must once have had one, or None if it may
    have died before its first: then --resume starts it over and drops its metrics rows.
    The runner saves at the end (before summary.json) and after every ``--save_interval``-th
    iteration's row, so a row past that iteration comes after a completed save."""
    if (run_dir / "summary.json").exists():
        return "it has a summary.json"
    try:
        with open(run_dir / "metrics.csv", newline="") as fh:
            iterations = [int(row["iteration"]) for row in csv.DictReader(fh) if row.get("iteration")]
    except (OSError, ValueError, KeyError):
        return None
    if iterations and max(iterations) > config.save_interval:
        return (f"metrics.csv reaches iteration {max(iterations)} "
                f"(a checkpoint is saved every --save_interval {config.save_interval})")
    return None


def summary_env_steps(run_dir: Path) -> int | None:
    """``env_steps`` of the run's summary.json, None if absent or unreadable."""
    try:
        steps = json.loads((run_dir / "summary.json").read_text()).get("env_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


# What --eval_only takes from the command line; everything else is the run's own config.
EVAL_SETTINGS = ("eval_episodes", "n_eval_rollout_threads", "device", "torch_threads")


def evaluate_only(config: Config, given: dict) -> int:
    """``given``: the Config fields given on the command line (``CommandLine.flags``)."""
    import torch

    from runners.evaluate import eval_seed, evaluate, policy_from_checkpoint
    from utils.device import resolve_device, set_threads

    if not config.model_dir:
        raise ConfigError("--eval_only needs --model_dir <run directory or checkpoint file>")
    try:
        checkpoint = load_checkpoint(Path(config.model_dir))
    except CheckpointError as exc:
        raise ConfigError(f"--model_dir: {exc}") from None
    ignored = [k for k in given if k not in ("eval_only", "model_dir", *EVAL_SETTINGS)]
    if ignored:
        raise ConfigError(f"--{ignored[0]} has no effect with --eval_only: the run's own config is used; "
                          f"only --{', --'.join(EVAL_SETTINGS)} apply")
    saved = config_from_dict(checkpoint["config"], f"{config.model_dir}")
    # Unset ones keep the run's values, so a bare evaluation repeats the run's own.
    saved = dataclasses.replace(saved, **{k: getattr(config, k) for k in EVAL_SETTINGS if k in given}).validate()
    set_threads(saved.torch_threads)
    device = resolve_device(saved.device)
    # The same evaluation seeds as the run's own evaluation at this checkpoint, so the
    # final checkpoint of a run reproduces its last eval_return exactly.
    iteration = checkpoint["counters"]["iteration"]
    env = make_vec_env(saved, n_envs=min(saved.n_eval_rollout_threads, saved.eval_episodes),
                       seed=eval_seed(saved), evaluation=True)
    algo = policy_from_checkpoint(checkpoint, saved, env.spec, device)
    torch.manual_seed(saved.seed)
    result = evaluate(algo, env, saved.eval_episodes, seed=eval_seed(saved, iteration))
    result["env_steps"] = checkpoint["counters"]["env_steps"]
    env.close()
    print(json.dumps(result))
    return 0


def is_sweep(argv: list[str]) -> bool:
    """A comma list in a sweep axis flag (or a sweep flag) makes ``argv`` a sweep;
    ConfigError if it does not parse."""
    return parse_command_line(argv).is_sweep


class StartupSignals:
    """SIGINT / SIGTERM while a run starts (imports, JAX compiles and env construction take
    seconds, before ``Runner.run`` installs its own handlers). The first one is recorded and
    acted on at the next safe point; a second one stops at once (KeyboardInterrupt). Recording
    matters: a KeyboardInterrupt raised inside one of JAX's callbacks is swallowed and the run
    went on training."""

    def __init__(self):
        self.received: int | None = None
        self.runner = None  # once built, signals go to its handler

    def __call__(self, signum, frame):
        if self.runner is not None:
            return self.runner.on_signal(signum, frame)
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def hand_over(self, runner) -> None:
        runner.stop_signal = self.received
        self.runner = runner


def lock_run_dir(run_dir: Path, held: list[int]) -> None:
    """Lock ``run_dir`` for this process (``utils.dirlock``; the descriptor goes into
    ``held``), so that two processes never train one run: a --resume while the run still
    trains, or a sweep re-run while a run of the first is still going, would both append to
    metrics.csv and overwrite each other's checkpoints."""
    try:
        fd = try_lock(run_dir)
    except BlockingIOError:
        raise ConfigError(f"run directory {run_dir} is in use by another training process; wait for it "
                          "to finish or stop it (Ctrl-C saves a checkpoint) first") from None
    if fd is not None:
        held.append(fd)


def remove_empty(directories: list[Path]) -> None:
    """Remove the directories a rejected or interrupted start created, deepest first, while empty."""
    for d in directories:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        command = parse_command_line(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if command.is_sweep:
        return sweep.run(command)
    startup = StartupSignals()
    if hasattr(signal, "pthread_sigmask"):
        # A launcher may have blocked them, and children inherit the mask (a Ray worker blocks
        # SIGINT): the run would never see the Ctrl-C that saves its checkpoint.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    previous = {s: signal.signal(s, startup) for s in STOP_SIGNALS}
    new_dirs: list[Path] = []  # directories this start creates
    held: list[int] = []  # the run directory's lock (lock_run_dir)
    try:
        return start(command, startup, new_dirs, held)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, one line rather than a traceback
        remove_empty(new_dirs)
        print("\ninterrupted: stopped at once; the last checkpoint, if any, is kept", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for fd in held:
            os.close(fd)


def start(command: CommandLine, startup: StartupSignals, new_dirs: list[Path], held: list[int]) -> int:
    """Train, resume or evaluate as the command line says; ``new_dirs`` collects the
    directories created, ``held`` the run directory's lock."""
    try:
        flags = command.flags
        if flags.get("resume"):
            config, checkpoint = resume_config(flags)
            run_dir = Path(config.resume)
            lock_run_dir(run_dir, held)
            done = checkpoint["counters"]["env_steps"] if checkpoint else 0
            # Without a summary.json of these steps it stopped after its last checkpoint (or
            # after a session that trained it further died): the runner writes it.
            if done >= config.num_env_steps and summary_env_steps(run_dir) == done:
                print(f"{run_dir} is already at {done} env steps (--num_env_steps {config.num_env_steps}); "
                      "nothing to do: raise --num_env_steps to train on", flush=True)
                return 0
        elif flags.get("eval_only"):
            # Not load_config: it would check (and import) the default env family, while the
            # run's own config, read from the checkpoint, says which one to build.
            for stop in STOP_SIGNALS:  # nothing to save: Ctrl-C stops it
                signal.signal(stop, signal.default_int_handler)
            return evaluate_only(config_from_dict(flags, "command line"), flags)
        else:
            config, checkpoint = load_config(command), None
            if config.model_dir:
                raise ConfigError("--model_dir is read only with --eval_only; to continue a run use "
                                  "--resume <run dir>")
            run_dir = run_dir_for(config)
            new_dirs[:] = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
            ensure_writable(Path(config.results_dir), "--results_dir")
            if (run_dir / "checkpoints").exists() or (run_dir / "metrics.csv").exists():
                raise ConfigError(f"run directory {run_dir} already holds a run; continue it with "
                                  f"--resume {run_dir} or choose another --exp_name/--seed")
            ensure_writable(run_dir, "--results_dir")
            lock_run_dir(run_dir, held)
        record = provenance.session_record(command.argv)  # git runs here, before JAX starts threads
        from utils.device import resolve_device, set_threads  # torch

        if startup.received is not None:  # before the runner is built: nothing to save
            remove_empty(new_dirs)
            print(f"interrupted ({signal.Signals(startup.received).name}) before training started; "
                  "nothing was changed", file=sys.stderr)
            return 130

        try:
            threads = set_threads(config.torch_threads)
            device = resolve_device(config.device)
            runner = runner_class(config)(config, run_dir, device, checkpoint)
        except (ConfigError, EnvError) as exc:
            if checkpoint is None:  # rejected while building (e.g. --share_param on unequal agents)
                remove_empty(new_dirs)  # leave no empty run directory behind
            if isinstance(exc, ConfigError):
                raise
            # e.g. StarCraft II that does not launch: nothing was trained or saved
            print(f"error: the environments failed to start: {exc}", file=sys.stderr)
            return 1
        startup.hand_over(runner)  # from here a signal stops the run with a checkpoint (Runner.run)
        if runner.env_steps < config.num_env_steps or summary_env_steps(run_dir) != runner.env_steps:
            # A resumed run's summary.json of an earlier, shorter session no longer describes
            # the run once it trains on: the runner writes the new one when it finishes.
            (run_dir / "summary.json").unlink(missing_ok=True)
        save_config(config, run_dir / "config.yaml")  # on --resume too: its runtime flags (steps, ...)
        record.update(device=str(device), torch_threads=threads)
        code_note = provenance.code_change_note(provenance.read_sessions(run_dir), record)
        provenance.append_session(run_dir, record)
        print(f"{config.algo} on {runner.spec.name}: {runner.spec.n_agents} agents, obs "
              f"{[a.obs_dim for a in runner.spec.agents]}, actions {[a.action_dim for a in runner.spec.agents]}; "
              f"device {device}, {threads} torch thread(s); run dir {run_dir}", flush=True)
        if code_note:
            print(code_note, file=sys.stderr, flush=True)
        return runner.run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # e.g. a full disk while writing the config or metrics
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
