"""Read finished (or running) training runs and turn them into curves and tables.

A run directory is ``<results_dir>/<env>/<task>/<algo>/<exp_name>/seed-<n>/`` and holds
``metrics.csv`` (one row per log interval), ``config.yaml`` and, once finished,
``summary.json``. This module

* discovers runs (:func:`discover_runs`) and names them from their path,
* turns one metric of one run into a step/value curve (:func:`metric_curve`),
* puts the seeds of one task x algorithm on a common env-step grid
  (:func:`common_grid`, :func:`interpolate_seeds`) and draws a bootstrap confidence band
  over seeds (:func:`bootstrap_ci`),
* computes final performance per task x algorithm (:func:`final_table`) and renders it
  as Markdown (:func:`markdown_table`),
* draws the figure (:func:`plot_curves`).

Errors caused by user input raise :class:`AnalysisError`, whose message is one line;
``train/plot.py`` turns it into exit status 2.

The statistics are those of ``rliable`` (Agarwal et al., NeurIPS 2021), which RL papers
and ``marl-eval`` report: the IQM is its ``aggregate_iqm`` (``scipy.stats.trim_mean`` at
0.25) and the band its percentile bootstrap over runs, which for the runs of one task is
what its stratified bootstrap does. They are written out here, a few lines each, because
rliable 1.2.0 (the latest) requires ``arch < 8``, and arch 7 does not import with the
pandas 3 this project is locked to; tests/test_analysis.py checks them against their
definitions.
"""
from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from algorithms import registry as algorithms
from envs import registry
from utils import provenance

# metric name -> key in summary.json holding its final value (other metrics: same name)
SUMMARY_KEYS = {"eval_return": "eval_return_mean", "eval_win_rate": "eval_win_rate"}
# fixed colour per known algorithm, so a given algorithm looks the same in every figure
ALGO_ORDER = algorithms.NAMES  # the registry's order
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
NOT_METRICS = {"env_steps"}
_SEED_RE = re.compile(r"^seed-(\d+)$")
_AGENT_RE = re.compile(r"^agent\d+/")


class AnalysisError(ValueError):
    """Bad user input (missing directory, no runs, unknown metric). One-line message."""


@dataclass
class Run:
    """One training run: its identity and its logged data.

    ``metrics`` is the raw ``metrics.csv`` as a DataFrame (rows = log intervals, blank
    cells = NaN); ``summary`` is ``summary.json`` or ``None`` for an unfinished run,
    including one resumed with a larger ``--num_env_steps`` that has logged past its old
    summary.json (still running, or stopped before writing the new one).
    """

    path: Path
    env: str
    task: str
    algo: str
    exp_name: str
    seed: int | str
    metrics: pd.DataFrame
    summary: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    revisions: list[tuple[str, str]] = field(default_factory=list)  # (code identity, label) per session

    @property
    def logs_win_rate(self) -> bool:
        """The env reports a win rate per episode (SMAC, SMAX): metrics.csv has its column."""
        return any(c in self.metrics.columns for c in ("eval_win_rate", "train_win_rate"))


# --------------------------------------------------------------------------- discovery


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except Exception:  # a broken config must not hide the run's metrics
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _task_from_config(config: dict[str, Any]) -> str | None:
    """Task name as the trainers spell it (``envs.registry.task_name``, e.g.
    ``Humanoid-9_8`` or ``3m``) for a family the registry knows; ``None`` otherwise."""
    if config.get("env") not in registry.FAMILIES:
        return None
    try:
        return registry.task_name(config)
    except (KeyError, TypeError, ValueError):  # an old or hand-written config.yaml
        return None


def _identity(run_dir: Path, root: Path, config: dict[str, Any],
              summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """env/task/algo/exp_name/seed of a run.

    The last five components of the path relative to ``root`` are
    ``<env>/<task>/<algo>/<exp_name>/seed-<n>``; components the relative path lacks come
    from ``config.yaml`` (the task: from summary.json, which the runner writes with the
    family's own name, or from the known families' task flags), and failing that from the
    absolute path.
    """
    names = ("env", "task", "algo", "exp_name", "seed")
    rel = run_dir.relative_to(root).parts[-5:]
    from_path = dict(zip(names[5 - len(rel):], rel)) if rel else {}
    if not _SEED_RE.match(from_path.get("seed", "seed-0")):
        del from_path["seed"]  # last component is not seed-<n>: take the seed from config
    from_config = {
        "env": config.get("env"),
        "task": (summary or {}).get("task") or _task_from_config(config),
        "algo": config.get("algo"),
        "exp_name": config.get("exp_name"),
        "seed": config.get("seed"),
    }
    absolute = dict(zip(names[5 - len(run_dir.parts[-5:]):], run_dir.parts[-5:]))
    ident: dict[str, Any] = {}
    for name in names:
        for source in (from_path, from_config, absolute):
            if source.get(name) is not None:
                ident[name] = source[name]
                break
        else:
            ident[name] = "?"
    seed = str(ident["seed"])
    match = _SEED_RE.match(seed)
    ident["seed"] = int(match.group(1)) if match else (int(seed) if seed.isdigit() else seed)
    ident = {k: (v if k == "seed" else str(v)) for k, v in ident.items()}
    return ident


def load_run(run_dir: Path, root: Path) -> Run:
    """Read one run directory (must contain ``metrics.csv``)."""
    try:
        metrics = pd.read_csv(run_dir / "metrics.csv")
    except pd.errors.EmptyDataError:
        metrics = pd.DataFrame()
    config = _read_yaml(run_dir / "config.yaml")
    summary = _read_json(run_dir / "summary.json")
    current = summary if _summary_is_current(summary, metrics) else None
    return Run(path=run_dir, metrics=metrics, summary=current, config=config,
               revisions=_revisions(run_dir), **_identity(run_dir, root, config, summary))


def _summary_is_current(summary: dict[str, Any] | None, metrics: pd.DataFrame) -> bool:
    """False when metrics.csv goes past summary.json's ``env_steps``: the run was resumed
    to train further, and its summary describes the earlier, shorter run."""
    if summary is None or "env_steps" not in metrics.columns:
        return summary is not None
    done = summary.get("env_steps")
    logged = _numeric(metrics["env_steps"]).max()
    return not (isinstance(done, (int, float)) and math.isfinite(logged) and logged > done)


def _revisions(run_dir: Path) -> list[tuple[str, str]]:
    """(``provenance.code_identity``, ``revision_label``) of each session in run_info.json
    whose revision is known."""
    revisions = []
    for session in provenance.read_sessions(run_dir):
        identity = provenance.code_identity(session.get("git"))
        if identity is not None:
            revisions.append((identity, provenance.revision_label(session.get("git"))))
    return revisions


def mixed_revisions(runs: list[Run]) -> list[str]:
    """One line per task x algo group whose runs did not all run the same code (a resumed
    run counts every session's), naming the revisions. Sessions whose revision is unknown,
    and runs without run_info.json, are skipped."""
    lines = []
    for (task, algo), group in group_runs(runs).items():
        identities = {identity for r in group for identity, _ in r.revisions}
        if len(identities) > 1:
            labels = sorted({label for r in group for _, label in r.revisions})
            lines.append(f"{task} {algo}: its {len(group)} run(s) ran {len(identities)} versions "
                         f"of the code ({', '.join(labels)}); see each run's run_info.json")
    return lines


def seed_warnings(runs: list[Run]) -> list[str]:
    """One line per task x algo group whose seeds do not compare like for like: the same
    seed found in several folders (each would count as a seed of its own, e.g. a copy
    under ``chaos/``), or runs ending at different env steps (an unfinished or stopped seed:
    the table averages its last value with the others' finals, the curves stop where it does)."""
    lines = []
    for (task, algo), group in group_runs(runs).items():
        paths: dict[str, list[Path]] = {}
        for r in group:
            paths.setdefault(str(r.seed), []).append(r.path)
        for seed, where in paths.items():
            if len(where) > 1:
                lines.append(f"{task} {algo}: seed {seed} is {len(where)} runs ({', '.join(map(str, where))}), "
                             "each counted as a seed; plot one results folder at a time")
        ends = {r.path: final_env_steps(r) for r in group}
        known = [v for v in ends.values() if v is not None]
        if known and min(known) < max(known):
            short = sorted({str(r.seed) for r in group if ends[r.path] is not None and ends[r.path] < max(known)})
            lines.append(f"{task} {algo}: runs end between {format_steps(min(known))} and "
                         f"{format_steps(max(known))} env steps (seed(s) {', '.join(short)} short of the "
                         "others): the table mixes their finals, the curves stop at the shortest")
    return lines


def discover_runs(root: str | Path) -> list[Run]:
    """All runs under ``root`` (every directory holding a ``metrics.csv``), sorted.

    Raises :class:`AnalysisError` when ``root`` is missing or holds no runs.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnalysisError(f"results directory not found: {root}")
    root = root.resolve()
    run_dirs = sorted({p.parent for p in root.rglob("metrics.csv") if p.is_file()})
    if not run_dirs:
        raise AnalysisError(f"no runs (no metrics.csv) under {root}")
    runs = [load_run(d, root) for d in run_dirs]
    return sorted(runs, key=lambda r: (r.env, r.task, r.algo, r.exp_name, str(r.seed)))


# --------------------------------------------------------------------------- metrics


def _numeric(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def metric_columns(runs: list[Run]) -> list[str]:
    """Metric columns present (with at least one numeric value) in any run, sorted."""
    cols: set[str] = set()
    for run in runs:
        for col in run.metrics.columns:
            if col not in NOT_METRICS and _numeric(run.metrics[col]).notna().any():
                cols.add(str(col))
    return sorted(cols)


def describe_columns(cols: list[str]) -> str:
    """One-line listing; per-agent columns ``agent<k>/x`` are shown once as ``agent<i>/x``."""
    shown: list[str] = []
    for col in cols:
        name = _AGENT_RE.sub("agent<i>/", col)
        if name not in shown:
            shown.append(name)
    return ", ".join(shown) if shown else "(none)"


def default_metric(runs: list[Run]) -> str:
    """``eval_win_rate`` when every run logs a win rate (SMAC, SMAX), else ``eval_return``."""
    return "eval_win_rate" if runs and all(r.logs_win_rate for r in runs) else "eval_return"


def train_counterpart(runs: list[Run], metric: str) -> str | None:
    """Training-time column standing in for evaluation metric ``metric``.

    ``eval_return`` -> ``train_episode_return``, ``eval_<x>`` -> ``train_<x>`` (e.g.
    ``train_win_rate``), falling back to ``train_episode_return``; ``None`` when ``metric``
    is not an ``eval_`` metric or no run logs a value for the counterpart.
    """
    if not metric.startswith("eval_"):
        return None
    base = metric[len("eval_"):]
    candidates = ("train_episode_return",) if base == "return" else \
        (f"train_{base}", "train_episode_return")
    available = set(metric_columns(runs))
    return next((c for c in candidates if c in available), None)


def runs_without_eval(runs: list[Run]) -> list[Run]:
    """Runs trained with evaluation switched off (``use_eval: false`` in config.yaml)."""
    return [r for r in runs if r.config.get("use_eval") is False]


def _try_instead(runs: list[Run], metric: str) -> str:
    alternative = train_counterpart(runs, metric)
    return f"; try --metric {alternative}" if alternative else ""


def check_metric(runs: list[Run], metric: str) -> None:
    """Raise :class:`AnalysisError` unless some run logs ``metric``.

    For a missing ``eval_*`` metric the message says when the runs log no evaluation
    metric at all (trained without evaluation) and suggests the training counterpart.
    """
    if any(metric in r.metrics.columns for r in runs):
        return
    why = ""
    if metric.startswith("eval_") and not any(str(c).startswith("eval_")
                                              for r in runs for c in r.metrics.columns):
        why = (" (the runs log no evaluation metrics: they were trained without "
               f"evaluation{_try_instead(runs, metric)})")
    raise AnalysisError(f"unknown metric '{metric}'{why}; available: "
                        f"{describe_columns(metric_columns(runs))}")


def no_values_message(runs: list[Run], metric: str) -> str:
    """One-line reason why no run has a final value for ``metric`` (a logged column).

    Names the metric; for an ``eval_*`` metric, says how many runs were trained without
    evaluation (``use_eval: false``, i.e. ``--no-use_eval``: they never will have one) and
    suggests the training counterpart. Otherwise the runs may simply not have logged it yet.
    """
    message = f"no run has a value for '{metric}'"
    without = runs_without_eval(runs) if metric.startswith("eval_") else []
    if not without:
        finished = sum(r.summary is not None for r in runs)
        if finished == len(runs):
            return f"{message}: all {len(runs)} run(s) finished without logging it"
        return f"{message} yet ({len(runs) - finished} of {len(runs)} run(s) still running)"
    if len(without) == len(runs):
        who = f"the {len(runs)} run(s) were" if len(runs) > 1 else "the run was"
        return (f"{message}: {who} trained without evaluation (use_eval: false in config.yaml, "
                f"i.e. --no-use_eval){_try_instead(runs, metric)}")
    return (f"{message} yet: {len(without)} of {len(runs)} runs were trained without "
            f"evaluation (use_eval: false, i.e. --no-use_eval) and never will, the others "
            f"have not been evaluated yet{_try_instead(runs, metric)}")


def metric_curve(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's curve for ``metric`` as ``(steps, values)``, both shape ``(n,)``.

    Rows where the metric or env_steps is blank/non-finite are skipped; steps are
    sorted ascending and a repeated step (e.g. after a resume) keeps its last row.
    """
    df = run.metrics
    if metric not in df.columns or "env_steps" not in df.columns:
        return np.empty(0), np.empty(0)
    steps = _numeric(df["env_steps"]).to_numpy(float)
    values = _numeric(df[metric]).to_numpy(float)
    keep = np.isfinite(steps) & np.isfinite(values)
    steps, values = steps[keep], values[keep]
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    last_of_step = np.append(steps[1:] != steps[:-1], True) if len(steps) else steps.astype(bool)
    return steps[last_of_step], values[last_of_step]


def final_value(run: Run, metric: str) -> float | None:
    """Final value of ``metric``: summary.json's value when present, else the last
    non-blank metrics.csv row; ``None`` when the run has neither."""
    if run.summary is not None:
        value = run.summary.get(SUMMARY_KEYS.get(metric, metric))
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    _, values = metric_curve(run, metric)
    return float(values[-1]) if len(values) else None


def final_env_steps(run: Run) -> float | None:
    """Env steps the run reached: summary.json's ``env_steps``, else the largest logged."""
    if run.summary is not None:
        value = run.summary.get("env_steps")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    if "env_steps" in run.metrics.columns:
        steps = _numeric(run.metrics["env_steps"]).dropna()
        if len(steps):
            return float(steps.max())
    return None


# --------------------------------------------------------------------------- statistics


def common_grid(curves: list[tuple[np.ndarray, np.ndarray]], n_points: int = 100) -> np.ndarray:
    """Grid of ``n_points`` env steps over the overlap of all seeds' step ranges.

    ``curves`` is a list of ``(steps, values)``. Returns shape ``(n_points,)``, or
    ``(1,)`` when the overlap is a single step, or ``(0,)`` when the ranges do not
    overlap (or a curve is empty). Never extends past any seed's first or last step.
    """
    if not curves or any(len(steps) == 0 for steps, _ in curves):
        return np.empty(0)
    lo = max(float(steps[0]) for steps, _ in curves)
    hi = min(float(steps[-1]) for steps, _ in curves)
    if lo > hi:
        return np.empty(0)
    if lo == hi:
        return np.array([lo])
    return np.linspace(lo, hi, max(int(n_points), 2))


def interpolate_seeds(curves: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> np.ndarray:
    """Each seed's curve linearly interpolated at ``grid``: shape ``(n_seeds, len(grid))``.

    ``grid`` must lie inside every seed's step range (see :func:`common_grid`), so
    nothing is extrapolated.
    """
    return np.stack([np.interp(grid, steps, values) for steps, values in curves]) \
        if curves else np.empty((0, len(grid)))


def bootstrap_ci(values: np.ndarray, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Percentile bootstrap confidence interval of the mean over seeds (rliable's
    ``get_interval_estimates(..., method="percentile")`` for one task).

    ``values`` has shape ``(n_seeds, n_points)``; seeds are resampled with replacement
    ``n_resamples`` times (fixed RNG ``seed``, so the band is reproducible), one draw of
    seeds serving every point. Returns ``(low, high)``, each shape ``(n_points,)``: the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear interpolation,
    as ``np.percentile``) of the resampled means; ``None`` with fewer than two seeds.
    """
    values = np.asarray(values, dtype=float)
    n_seeds = values.shape[0]
    if n_seeds < 2:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    # counts[b, s] = how often seed s was drawn in resample b -> means without copying values
    counts = np.zeros((n_resamples, n_seeds))
    np.add.at(counts, (np.arange(n_resamples)[:, None], picks), 1.0)
    means = counts @ values / n_seeds  # (n_resamples, n_points)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return low, high


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of what is left after dropping floor(n/4) values from
    each end, i.e. ``scipy.stats.trim_mean(values, 0.25)``, rliable's ``aggregate_iqm``
    (which trims whole values: no fractional weighting of the values at the cut)."""
    x = np.sort(np.asarray(values, dtype=float))
    cut = int(math.floor(0.25 * len(x)))
    return float(np.mean(x[cut:len(x) - cut]))


# --------------------------------------------------------------------------- grouping


def _group_label(run: Run, several_envs: bool, several_exps: bool) -> tuple[str, str]:
    """(panel task label, line algo label) of a run."""
    task = f"{run.env}/{run.task}" if several_envs else run.task
    algo = f"{run.algo} [{run.exp_name}]" if several_exps else run.algo
    return task, algo


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs grouped by (task, algo), in sorted order.

    A task that occurs under more than one env is labelled ``<env>/<task>``; when the
    runs have more than one exp_name, the algo label becomes ``<algo> [<exp_name>]`` so
    different experiments are never averaged together.
    """
    several_exps = len({r.exp_name for r in runs}) > 1
    envs_of_task: dict[str, set[str]] = {}
    for r in runs:
        envs_of_task.setdefault(r.task, set()).add(r.env)
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        key = _group_label(r, len(envs_of_task[r.task]) > 1, several_exps)
        groups.setdefault(key, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], _algo_rank(kv[0][1]))))


def _algo_rank(label: str) -> tuple[int, str]:
    base = label.split(" ")[0]
    return (ALGO_ORDER.index(base) if base in ALGO_ORDER else len(ALGO_ORDER), label)


def algo_colours(labels: list[str]) -> dict[str, str]:
    """A colour per algo label, the same in every panel (known algos keep fixed colours)."""
    ordered = sorted(set(labels), key=_algo_rank)
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(ordered)}


@dataclass
class Curve:
    """Aggregated curve of one task x algo: ``steps``/``mean``/``low``/``high`` shape ``(P,)``
    (``low``/``high`` ``None`` with one seed); ``n_seeds`` seeds contributed."""

    task: str
    algo: str
    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    n_seeds: int


def aggregate_curves(runs: list[Run], metric: str, n_points: int = 100,
                     n_resamples: int = 2000, seed: int = 0) -> tuple[list[Curve], list[str]]:
    """One :class:`Curve` per task x algo; also returns warnings (one line each) about
    runs without values for ``metric`` and groups whose seeds' step ranges don't overlap."""
    curves: list[Curve] = []
    warnings: list[str] = []
    for (task, algo), group in group_runs(runs).items():
        seeds = [metric_curve(r, metric) for r in group]
        usable = [c for c in seeds if len(c[0])]
        if len(usable) < len(seeds):
            warnings.append(f"{task} {algo}: {len(seeds) - len(usable)} of {len(seeds)} "
                            f"run(s) have no '{metric}' values; left out of the plot")
        if not usable:
            continue
        grid = common_grid(usable, n_points)
        if len(grid) == 0:
            warnings.append(f"{task} {algo}: seeds' env-step ranges do not overlap; not plotted")
            continue
        values = interpolate_seeds(usable, grid)
        band = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
        curves.append(Curve(task, algo, grid, values.mean(axis=0),
                             band[0] if band else None, band[1] if band else None, len(usable)))
    return curves, warnings


# --------------------------------------------------------------------------- table


def seed_std(finals) -> float | None:
    """Sample std over seeds (ddof=1: the seeds are a sample, and with 2-3 of them the
    population std understates the spread); ``None`` for one seed, where it is undefined."""
    return float(np.std(finals, ddof=1)) if len(finals) > 1 else None


@dataclass
class TableRow:
    """Final performance of one task x algo over its seeds."""

    task: str
    algo: str
    finals: np.ndarray  # (n_seeds,) final metric value per seed that has one
    env_steps: float | None  # median final env steps over the group's runs

    @property
    def mean(self) -> float:
        return float(np.mean(self.finals))

    @property
    def std(self) -> float | None:
        return seed_std(self.finals)

    @property
    def iqm(self) -> float | None:
        """IQM over seeds when there are at least 4, else ``None``."""
        return iqm(self.finals) if len(self.finals) >= 4 else None


def final_table(runs: list[Run], metric: str) -> list[TableRow]:
    """One row per task x algo that has at least one final value for ``metric``."""
    rows = []
    for (task, algo), group in group_runs(runs).items():
        finals = [v for v in (final_value(r, metric) for r in group) if v is not None]
        if not finals:
            continue
        steps = [s for s in (final_env_steps(r) for r in group) if s is not None]
        rows.append(TableRow(task, algo, np.array(finals),
                             float(np.median(steps)) if steps else None))
    return rows


def _fmt(x: float) -> str:
    """Compact number: 4 significant digits, no scientific notation for ordinary sizes."""
    if abs(x) >= 1e4:
        return f"{x:.0f}"
    return f"{x:.4g}" if x != 0 else "0"


def markdown_table(rows: list[TableRow], metric: str) -> str:
    """Markdown table: task | algo | <metric> (mean ± std) | seeds | env steps | IQM; std: ``TableRow.std``."""
    lines = [f"| task | algo | {metric} (mean ± std) | seeds | env steps | IQM |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        steps = f"{row.env_steps:.0f}" if row.env_steps is not None else "–"
        iqm_text = _fmt(row.iqm) if row.iqm is not None else "–"
        spread = f" ± {_fmt(row.std)}" if row.std is not None else ""
        lines.append(f"| {row.task} | {row.algo} | {_fmt(row.mean)}{spread} | "
                     f"{len(row.finals)} | {steps} | {iqm_text} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figure


def format_steps(steps: float) -> str:
    """400000 -> '400k', 10000000 -> '10M', 1500000 -> '1.5M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(steps) >= div:
            return f"{steps / div:.3g}{suffix}"
    return f"{steps:.0f}"


def default_title(runs: list[Run], metric: str) -> str:
    """e.g. 'eval_return (up to 400k env steps)' from the largest final env_steps."""
    steps = [s for s in (final_env_steps(r) for r in runs) if s is not None]
    return f"{metric} (up to {format_steps(max(steps))} env steps)" if steps else metric


def figure_formats() -> list[str]:
    """File extensions (no dot) matplotlib can save a figure as, e.g. png, pdf, svg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


# Characters of the (12 pt) figure title per inch of figure width, with room to spare.
TITLE_CHARS_PER_INCH = 10


@dataclass(frozen=True)
class Mark:
    """A published value to compare a curve with: drawn at the right end of ``task``'s
    panel, in the colour of the curve labelled ``algo``, one marker shape per ``source``."""

    task: str
    algo: str
    source: str
    value: float


MARK_SHAPES = ("D", "X", "^", "s", "v")


def plot_curves(curves: list[Curve], metric: str, out: str | Path, title: str,
                marks: Sequence[Mark] = ()) -> Path:
    """Draw one panel per task (grid of panels), one line + 95% band per algo, and the
    ``marks`` of the algos drawn; save the figure to ``out``, whose extension (one of
    :func:`figure_formats`) picks the format.

    Constrained layout keeps the overall title clear of the first row's panel titles
    whatever the number of rows; the title wraps to the figure's width (a suite's title over
    one 5-inch panel would otherwise run off both edges).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    tasks = list(dict.fromkeys(c.task for c in curves))
    colours = algo_colours([c.algo for c in curves])
    sources = list(dict.fromkeys(m.source for m in marks))
    shapes = {source: MARK_SHAPES[i % len(MARK_SHAPES)] for i, source in enumerate(sources)}
    ncols = min(3, max(len(tasks), 1))
    nrows = max(math.ceil(len(tasks) / ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.8 * nrows), squeeze=False,
                             layout="constrained")
    for ax, task in zip(axes.flat, tasks):
        panel = [c for c in curves if c.task == task]
        for c in panel:
            colour = colours[c.algo]
            label = f"{c.algo} (n={c.n_seeds})"
            marker = "o" if len(c.steps) == 1 else None
            ax.plot(c.steps, c.mean, color=colour, label=label, marker=marker, lw=1.8)
            if c.low is not None:
                ax.fill_between(c.steps, c.low, c.high, color=colour, alpha=0.2, lw=0)
        drawn = {c.algo for c in panel}
        right = max(float(c.steps[-1]) for c in panel)
        panel_marks = [m for m in marks if m.task == task and m.algo in drawn]
        for m in panel_marks:
            ax.plot([right], [m.value], ls="none", marker=shapes[m.source], ms=7, color=colours[m.algo],
                    markeredgecolor="black", markeredgewidth=0.6, clip_on=False, zorder=3)
        for source in dict.fromkeys(m.source for m in panel_marks):
            ax.plot([], [], ls="none", marker=shapes[source], color="0.6", markeredgecolor="black",
                    markeredgewidth=0.6, label=f"published: {source}")
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_steps(x)))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle(textwrap.fill(title, width=int(TITLE_CHARS_PER_INCH * fig.get_figwidth())))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
