"""Reproduction suites: one YAML file per benchmark names its tasks x algorithms x seeds x
budget; one command trains what is unfinished and regenerates the published results.

    bash scripts/benchmark.sh configs/benchmarks/mamujoco-10m.yaml             # train, report
    bash scripts/benchmark.sh configs/benchmarks/mamujoco-10m.yaml --report    # report only
    bash scripts/benchmark.sh configs/benchmarks/mamujoco-10m.yaml --status    # what is left
    bash scripts/benchmark.sh configs/benchmarks/mamujoco-10m.yaml --max_parallel 2
    bash scripts/benchmark.sh configs/benchmarks/mamujoco-10m.yaml --ray_address auto

1. **train**: one sweep (``train/sweep.py``) per experiment x task of the suite. A finished
   run exits at once; an interrupted one resumes from its checkpoint.
2. **archive**: every finished run's small files (``metrics.csv``, ``summary.json``,
   ``config.yaml``, ``run_info.json``) are copied to the suite's ``archive_dir``, which is
   kept in git, so that the report regenerates on any clone without re-training.
3. **report**: from the archive alone, the suite's section of ``docs/results.md`` (between
   ``<!-- suite:<name> -->`` markers; the text around it is left as written) and its curve
   figure.

Bad input (an unknown key, a missing file) is a one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from envs.registry import check_task, task_name
from train import sweep
from train.config import REPO_ROOT
from utils import analysis
from utils.dirlock import held_elsewhere
from utils.errors import ArgumentParser, ConfigError

ARCHIVED_FILES = ("metrics.csv", "summary.json", "config.yaml", "run_info.json")
RESULTS_DOC = REPO_ROOT / "docs" / "results.md"
LAUNCH_SCRIPTS = {"mamujoco": "scripts/train_mujoco.sh", "smax": "scripts/train_smac.sh --env smax",
                  "smac": "scripts/train_smac.sh"}


@dataclass(frozen=True)
class Experiment:
    """Runs that share one setting (``exp_name``): every task x algo x seed of it."""

    exp_name: str
    tasks: tuple[dict[str, str], ...]  # task flags, e.g. {"scenario": "Ant", "agent_conf": "4x2"}
    algos: tuple[str, ...]
    seeds: tuple[int, ...]
    flags: dict[str, Any] = field(default_factory=dict)  # on top of the task files


@dataclass(frozen=True)
class Published:
    """Values read off one source's published curves: ``values[task][algo]``."""

    source: str
    exp_name: str  # the experiment of ours it compares with (the same observation setting)
    values: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    env: str
    num_env_steps: int
    results_dir: Path
    archive_dir: Path
    figure: Path
    metric: str
    experiments: tuple[Experiment, ...]
    published: tuple[Published, ...] = ()

    def runs(self):
        """(experiment, task flags, algo, seed) of every run, in the order they train."""
        for experiment in self.experiments:
            for task in experiment.tasks:
                for algo in experiment.algos:
                    for seed in experiment.seeds:
                        yield experiment, task, algo, seed

    def task_label(self, task: dict[str, str]) -> str:
        return task_name({"env": self.env, **task})

    def run_dir(self, root: Path, experiment: Experiment, task: dict[str, str], algo: str, seed: int) -> Path:
        return root / self.env / self.task_label(task) / algo / experiment.exp_name / f"seed-{seed}"


# -- the suite file ---------------------------------------------------------------------------
def _require(mapping: dict, key: str, kind: type, where: str):
    if key not in mapping:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # YAML's true is no int
        raise ConfigError(f"{where}: {key} must be a {kind.__name__}; got {value!r}")
    return value


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(sorted(allowed))})")


def load_suite(path: Path) -> Suite:
    """Read and check a suite file; paths in it are relative to the repository root."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read suite file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    where = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must hold a mapping")
    _check_keys(data, {"name", "title", "env", "num_env_steps", "results_dir", "archive_dir", "figure",
                       "metric", "experiments", "published"}, where)
    experiments = []
    for k, item in enumerate(_require(data, "experiments", list, where)):
        at = f"{where} experiments[{k}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: must be a mapping")
        _check_keys(item, {"exp_name", "tasks", "algos", "seeds", "flags"}, at)
        tasks = _require(item, "tasks", list, at)
        if not tasks or not all(isinstance(t, dict) and t for t in tasks):
            raise ConfigError(f"{at}: tasks must be a list of task-flag mappings, e.g. "
                              "{scenario: Ant, agent_conf: 4x2}")
        seeds = _require(item, "seeds", list, at)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{at}: seeds must be a list of integers; got {seeds!r}")
        experiments.append(Experiment(
            exp_name=_require(item, "exp_name", str, at),
            tasks=tuple({key: str(value) for key, value in t.items()} for t in tasks),
            algos=tuple(str(a) for a in _require(item, "algos", list, at)),
            seeds=tuple(seeds), flags=dict(item.get("flags") or {})))
    published = []
    for k, item in enumerate(data.get("published") or []):
        at = f"{where} published[{k}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: must be a mapping")
        _check_keys(item, {"source", "exp_name", "values"}, at)
        values = _require(item, "values", dict, at)
        published.append(Published(_require(item, "source", str, at), _require(item, "exp_name", str, at),
                                    {str(t): {str(a): float(v) for a, v in algos.items()}
                                     for t, algos in values.items()}))
    root = REPO_ROOT
    suite = Suite(
        name=_require(data, "name", str, where), title=_require(data, "title", str, where),
        env=_require(data, "env", str, where), num_env_steps=int(_require(data, "num_env_steps", int, where)),
        results_dir=root / _require(data, "results_dir", str, where),
        archive_dir=root / _require(data, "archive_dir", str, where),
        figure=root / _require(data, "figure", str, where),
        metric=str(data.get("metric", "eval_return")),
        experiments=tuple(experiments), published=tuple(published))
    for experiment in suite.experiments:  # every task exists (one line naming the one that does not)
        for task in experiment.tasks:
            try:
                check_task({"env": suite.env, **task})
            except (KeyError, ConfigError) as exc:
                raise ConfigError(f"{where}: task {task}: {exc}") from None
    return suite


# -- train --------------------------------------------------------------------------------------
def _flag_tokens(flags: dict[str, Any]) -> list[str]:
    tokens: list[str] = []
    for name, value in flags.items():
        if isinstance(value, bool):
            tokens.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            tokens += [f"--{name}", ",".join(str(v) for v in value)]
        else:
            tokens += [f"--{name}", str(value)]
    return tokens


def sweep_argv(suite: Suite, experiment: Experiment, task: dict[str, str]) -> list[str]:
    """The sweep command line of one experiment x task (also the table's command)."""
    task_tokens = [tok for key, value in task.items() for tok in (f"--{key}", value)]
    return ["--env", suite.env, *task_tokens, "--algo", ",".join(experiment.algos),
            "--seeds", ",".join(str(s) for s in experiment.seeds), "--exp_name", experiment.exp_name,
            "--num_env_steps", str(suite.num_env_steps), *_flag_tokens(experiment.flags)]


def train(suite: Suite, extra: list[str]) -> int:
    """Run every experiment x task's sweep; the worst exit status (130 stops at once)."""
    worst = 0
    for experiment in suite.experiments:
        for task in experiment.tasks:
            argv = [*sweep_argv(suite, experiment, task), "--results_dir", str(suite.results_dir), *extra]
            print(f"benchmark {suite.name}: {suite.task_label(task)} [{experiment.exp_name}] "
                  f"{','.join(experiment.algos)} x seeds {','.join(map(str, experiment.seeds))}", flush=True)
            status = sweep.main(argv)
            if status == 130:
                return 130
            worst = max(worst, status)
    return worst


# -- archive ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def finished(run_dir: Path, num_env_steps: int) -> bool:
    summary = _read_json(run_dir / "summary.json")
    return bool(summary) and (summary.get("env_steps") or 0) >= num_env_steps


def archive(suite: Suite) -> list[Path]:
    """Copy the small files of every finished run into the archive; the runs copied."""
    copied = []
    for experiment, task, algo, seed in suite.runs():
        source = suite.run_dir(suite.results_dir, experiment, task, algo, seed)
        if not finished(source, suite.num_env_steps):
            continue
        target = suite.run_dir(suite.archive_dir, experiment, task, algo, seed)
        target.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, target / name)
        copied.append(target)
    return copied


# -- report -------------------------------------------------------------------------------------
@dataclass
class Row:
    experiment: Experiment
    task: str
    algo: str
    finals: list[float]  # final metric of each finished seed
    runs: list[analysis.Run]
    published: dict[str, float | None]  # source -> value
    command: str


def run_provenance(run: analysis.Run) -> tuple[str, str]:
    """(commit, first day) of a run's first session; a '+' after the commit marks a tree
    with uncommitted changes."""
    info = _read_json(run.path / "run_info.json")
    session = (info.get("sessions") or [{}])[0]
    git = session.get("git") or {}
    commit = str(git.get("commit", "unknown"))[:7] + ("+" if git.get("dirty") else "")
    return commit, str(session.get("started", ""))[:10] or "?"


def collect_rows(suite: Suite) -> list[Row]:
    archived = analysis.discover_runs(suite.archive_dir) if suite.archive_dir.is_dir() and any(
        suite.archive_dir.rglob("metrics.csv")) else []
    by_key = {(r.task, r.algo, r.exp_name, r.seed): r for r in archived}
    rows = []
    script = LAUNCH_SCRIPTS.get(suite.env, f"-m train.train --env {suite.env}")
    for experiment in suite.experiments:
        for task in experiment.tasks:
            label = suite.task_label(task)
            for algo in experiment.algos:
                runs = [by_key[key] for key in ((label, algo, experiment.exp_name, s) for s in experiment.seeds)
                        if key in by_key and finished(by_key[key].path, suite.num_env_steps)]
                finals = [v for v in (analysis.final_value(r, suite.metric) for r in runs) if v is not None]
                task_tokens = " ".join(f"--{k} {v}" for k, v in task.items())
                flags = " ".join(_flag_tokens(experiment.flags))
                command = (f"bash {script} {task_tokens} --algo {algo} --seeds "
                           f"{','.join(map(str, experiment.seeds))} --exp_name {experiment.exp_name} "
                           f"--num_env_steps {suite.num_env_steps}" + (f" {flags}" if flags else ""))
                published = {p.source: p.values.get(label, {}).get(algo)
                             for p in suite.published if p.exp_name == experiment.exp_name}
                rows.append(Row(experiment, label, algo, finals, runs, published, command))
    return rows


def _number(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:,.0f}"


def render_section(suite: Suite, rows: list[Row], figure_link: str) -> str:
    sources = [p.source for p in suite.published]
    sources = list(dict.fromkeys(sources))
    lines = [f"### {suite.title}", "",
             f"Final greedy evaluation return at {analysis.format_steps(suite.num_env_steps)} env steps "
             f"(`{suite.metric}`, the mean of the last evaluation's episodes), per seed; mean ± sample std "
             "and IQM (interquartile mean) over the finished seeds. Published values are read off the "
             "published curves (approximate, legacy v2 bodies).", ""]
    header = ["task", "setting", "algo", "seeds", "ours: mean ± std", "IQM",
              *[f"published: {s}" for s in sources]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n_planned = len(row.experiment.seeds)
        if row.finals:
            finals = np.array(row.finals)
            ours = _number(finals.mean())
            spread = analysis.seed_std(finals)
            if spread is not None:
                ours += f" ± {_number(spread)}"
            iqm = _number(analysis.iqm(finals))
        else:
            ours, iqm = "not yet run", "–"
        cells = [row.task, row.experiment.exp_name, row.algo, f"{len(row.finals)}/{n_planned}", ours, iqm,
                 *[_number(row.published.get(s)) for s in sources]]
        lines.append("| " + " | ".join(cells) + " |")
    by_commit: dict[str, dict[str, list[str]]] = {}  # commit -> row label -> "seed (day)"
    for row in rows:
        for run in row.runs:
            commit, day = run_provenance(run)
            label = f"{row.task} {row.algo} [{row.experiment.exp_name}]"
            by_commit.setdefault(commit, {}).setdefault(label, []).append(f"{run.seed} ({day})")
    if by_commit:
        lines.append("")
    for commit, labels in by_commit.items():  # the commit leads the line: the docs tests allow it there
        runs = "; ".join(f"{label} seeds {', '.join(seeds)}" for label, seeds in labels.items())
        lines.append(f"Runs at commit {commit}: {runs}.  ")
    if by_commit:
        lines.append("(The commit each run started from; a `+` marks uncommitted changes on top. A run "
                     "resumed later lists every session's commit and diff hash in its `run_info.json`.)")
    lines += ["", "Commands (each trains, or resumes, the row's seeds; `--results_dir` as you like):", ""]
    for row in rows:
        lines.append(f"- {row.task} {row.algo} [{row.experiment.exp_name}]: `{row.command}`")
    lines += ["", f"The whole suite: `bash scripts/benchmark.sh {suite_path_label(suite)}`; the report alone "
              f"(from the archived runs in `{shown(suite.archive_dir)}`): add `--report`.", ""]
    if figure_link:
        lines += [f"![{suite.title}]({figure_link})", ""]
    lines.append(f"Generated {datetime.date.today().isoformat()} from {sum(len(r.finals) for r in rows)} "
                 f"finished runs of {sum(len(r.experiment.seeds) for r in rows)} planned.")
    return "\n".join(lines) + "\n"


def suite_path_label(suite: Suite) -> str:
    return f"configs/benchmarks/{suite.name}.yaml"


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def write_section(doc: Path, name: str, section: str) -> None:
    """Replace the text between the suite's markers in ``doc`` (appended when absent)."""
    start, end = f"<!-- suite:{name} -->", f"<!-- /suite:{name} -->"
    text = doc.read_text() if doc.exists() else "# Results\n\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def published_marks(rows: list[Row], runs: list[analysis.Run]) -> list[analysis.Mark]:
    """The published values of the rows that have runs, under the labels their curves get
    (``group_runs`` adds the setting to the algo when the suite has several)."""
    label_of = {id(run): key for key, group in analysis.group_runs(runs).items() for run in group}
    marks = []
    for row in rows:
        if row.runs:
            task, algo = label_of[id(row.runs[0])]
            marks += [analysis.Mark(task, algo, source, value) for source, value in row.published.items()
                      if value is not None]
    return marks


def report(suite: Suite, doc: Path = RESULTS_DOC) -> Path:
    rows = collect_rows(suite)
    figure_link = ""
    runs = [run for row in rows for run in row.runs]
    if runs:
        curves, _ = analysis.aggregate_curves(runs, suite.metric)
        if curves:
            analysis.plot_curves(curves, suite.metric, suite.figure,
                                 f"{suite.title}: {suite.metric} (mean over seeds, 95% bootstrap band)",
                                 published_marks(rows, runs))
            figure_link = os.path.relpath(suite.figure, doc.parent)
    write_section(doc, suite.name, render_section(suite, rows, figure_link))
    return doc


# -- status -------------------------------------------------------------------------------------
@dataclass
class RunStatus:
    """Where one planned run stands, read from its run directory (or the archive)."""

    label: str
    state: str  # "finished", "training" (a process holds the run directory), "stopped", "not started"
    env_steps: float = 0.0
    last_value: float | None = None  # the suite's metric, last logged
    steps_per_second: float | None = None  # env steps over wall seconds, all sessions together
    idle_seconds: float | None = None  # since metrics.csv last changed

    def seconds_left(self, num_env_steps: int) -> float | None:
        if self.state == "finished":
            return 0.0
        if not self.steps_per_second:
            return None
        return max(num_env_steps - self.env_steps, 0.0) / self.steps_per_second


def run_status(suite: Suite, experiment: Experiment, task: dict[str, str], algo: str, seed: int,
               now: float) -> RunStatus:
    label = f"{suite.task_label(task)} {algo} [{experiment.exp_name}] seed {seed}"
    live = suite.run_dir(suite.results_dir, experiment, task, algo, seed)
    archived = suite.run_dir(suite.archive_dir, experiment, task, algo, seed)
    run_dir = live if (live / "metrics.csv").is_file() else archived
    if not (run_dir / "metrics.csv").is_file():
        return RunStatus(label, "training" if live.is_dir() and held_elsewhere(live) else "not started")
    run = analysis.load_run(run_dir, run_dir.parent)
    steps = analysis.final_env_steps(run) or 0.0
    wall = analysis.final_value(run, "wall_seconds") if "wall_seconds" in run.metrics.columns else None
    if finished(run_dir, suite.num_env_steps):
        state = "finished"
    else:
        state = "training" if held_elsewhere(run_dir) else "stopped"
    return RunStatus(label, state, steps, analysis.final_value(run, suite.metric),
                     steps / wall if wall and steps else None,
                     now - (run_dir / "metrics.csv").stat().st_mtime)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def status_text(suite: Suite, now: float | None = None) -> str:
    """One line per planned run, and what is left: env steps, and run time at the pace the
    suite's runs have shown so far (a run not started goes at its task's pace)."""
    now = time.time() if now is None else now
    planned = list(suite.runs())
    statuses = [run_status(suite, *run, now) for run in planned]
    # the pace of a run not started: its task's and algorithm's runs, else its task's
    pace: dict[tuple[str, ...], list[float]] = {}
    for (_, task, algo, _), st in zip(planned, statuses):
        if st.steps_per_second:
            pace.setdefault((suite.task_label(task), algo), []).append(st.steps_per_second)
            pace.setdefault((suite.task_label(task),), []).append(st.steps_per_second)
    width = max(len(st.label) for st in statuses)
    lines = [f"{'run':<{width}}  {'state':<11}  {'env steps':>9}  {suite.metric:>11}  "
             f"{'steps/s':>7}  {'last log':>9}  {'left':>8}"]
    left_total, unknown = 0.0, 0
    for (_, task, algo, _), st in zip(planned, statuses):
        left = st.seconds_left(suite.num_env_steps)
        if left is None and st.state == "not started":
            rates = pace.get((suite.task_label(task), algo)) or pace.get((suite.task_label(task),))
            left = suite.num_env_steps / float(np.median(rates)) if rates else None
        if left is None:
            unknown += 1
        else:
            left_total += left
        last_log = "–" if st.idle_seconds is None or st.state == "finished" else _duration(st.idle_seconds) + " ago"
        lines.append(f"{st.label:<{width}}  {st.state:<11}  {analysis.format_steps(st.env_steps):>9}  "
                     f"{_number(st.last_value):>11}  {_number(st.steps_per_second):>7}  {last_log:>9}  "
                     f"{'–' if st.state == 'finished' else _duration(left):>8}")
    counts = {state: sum(st.state == state for st in statuses)
              for state in ("finished", "training", "stopped", "not started")}
    steps_left = sum(suite.num_env_steps - min(st.env_steps, suite.num_env_steps) for st in statuses)
    lines.append("")
    lines.append(f"{suite.name}: {len(statuses)} runs planned: " +
                 ", ".join(f"{n} {state}" for state, n in counts.items() if n) + ".")
    lines.append(f"Left: {analysis.format_steps(steps_left)} env steps, {_duration(left_total)} of run time "
                 f"at the pace shown (summed over runs: N side by side take about 1/N of it)" +
                 (f"; not counted: {unknown} runs of tasks with no pace yet." if unknown else "."))
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="benchmark", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="suite file, e.g. configs/benchmarks/mamujoco-10m.yaml")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--report", action="store_true",
                      help="only archive finished runs and regenerate the report (no training)")
    only.add_argument("--status", action="store_true",
                      help="list every planned run (finished, training, stopped, not started; env "
                           "steps, last value, pace) and the training time left; changes nothing")
    parser.add_argument("--max_parallel", "--max-parallel", type=int, default=None,
                        help="runs at a time (default: the sweep's, the number of CPU cores)")
    parser.add_argument("--ray_address", "--ray-address", default=None,
                        help="run on a Ray cluster: auto | local | <host:port>")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        suite = load_suite(Path(args.suite))
    except ConfigError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    if args.status:
        print(status_text(suite), flush=True)
        return 0
    status = 0
    if not args.report:
        extra = ([] if args.max_parallel is None else ["--max_parallel", str(args.max_parallel)]) + \
                ([] if args.ray_address is None else ["--ray_address", args.ray_address])
        status = train(suite, extra)
    copied = archive(suite)
    doc = report(suite)
    print(f"benchmark {suite.name}: {len(copied)} finished runs archived in "
          f"{shown(suite.archive_dir)}; report in {shown(doc)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
