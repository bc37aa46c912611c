"""Learning curves and a final-performance table for every run under a results directory.

    python -m train.plot results/                       # eval_return (win rate for SMAC/SMAX)
    python -m train.plot results/ --metric train_episode_return --out figs/train.png
    python -m train.plot results/smax --table-only

Writes ``<out>`` (default ``<results dir>/curves.png``: one panel per task, one line per
algorithm = mean over seeds, band = 95% bootstrap CI over seeds) and ``<out stem>.md``
(the table, also printed). ``--out`` names the figure: its extension picks the format
(png, pdf, svg, ... as matplotlib supports); without one, ``.png`` is added; an existing
directory or a path ending in ``/`` gets ``curves.png`` inside it. With ``--table-only``
only ``<out stem>.md`` is written, so ``--out table.md --table-only`` is fine. Bad input ->
one-line error on stderr, exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from utils import analysis
from utils.errors import ArgumentParser, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="plot", description="Plot learning curves and tabulate final performance.")
    parser.add_argument("results_dir", help="directory searched for runs (metrics.csv)")
    parser.add_argument("--metric", default=None,
                        help="metrics.csv column (default: eval_return, or eval_win_rate "
                             "when every run is SMAC/SMAX)")
    parser.add_argument("--out", default=None,
                        help="figure path, its extension picks the format (default: "
                             "<results_dir>/curves.png; no extension: .png is added; a "
                             "directory: <dir>/curves.png); the table goes to the same path "
                             "with suffix .md")
    parser.add_argument("--table-only", action="store_true",
                        help="print (and write) the table, draw no figure")
    parser.add_argument("--points", type=int, default=100,
                        help="points on the common env-step grid per curve (default 100)")
    parser.add_argument("--title", default=None,
                        help="figure title (default: '<metric> (up to <N> env steps)')")
    return parser


def output_path(out_arg: str | None, results_dir: str, table_only: bool) -> tuple[Path, str]:
    """The figure path ``--out`` names, and a note (``""`` or `` (...)``) on any completion.

    No ``--out``: ``<results_dir>/curves.png``. An existing directory or a path ending in a
    separator: ``curves.png`` inside it. No extension: ``.png`` is added (matplotlib would
    add it silently). Unless ``table_only``, an extension matplotlib cannot write raises
    :class:`analysis.AnalysisError` naming the supported formats.
    """
    if not out_arg:
        return Path(results_dir) / "curves.png", ""
    if out_arg.endswith(("/", os.sep)) or Path(out_arg).is_dir():
        return Path(out_arg) / "curves.png", f" (--out {out_arg} is a directory)"
    ext = os.path.splitext(out_arg)[1][1:]  # matplotlib's reading: 'a.' and '.a' have none
    if not ext:
        return Path(out_arg.rstrip(".") + ".png"), f" (--out {out_arg} has no extension: .png added)"
    if not table_only:
        formats = analysis.figure_formats()
        if ext.lower() not in formats:
            raise analysis.AnalysisError(
                f"--out {out_arg}: '.{ext}' is not a figure format; use one of "
                f"{', '.join(formats)} (the table is written beside the figure as "
                f"{Path(out_arg).with_suffix('.md').name}; --table-only writes only the table)")
    return Path(out_arg), ""


def run(args: argparse.Namespace) -> int:
    """Do the work; raises :class:`analysis.AnalysisError` on bad input."""
    if args.points < 2:
        raise analysis.AnalysisError(f"--points must be >= 2, got {args.points}")
    out, note = output_path(args.out, args.results_dir, args.table_only)
    runs = analysis.discover_runs(args.results_dir)
    metric = args.metric or analysis.default_metric(runs)
    analysis.check_metric(runs, metric)

    for line in [*analysis.mixed_revisions(runs), *analysis.seed_warnings(runs)]:
        print(f"warning: {line}", file=sys.stderr)
    rows = analysis.final_table(runs, metric)
    if not rows:
        raise analysis.AnalysisError(analysis.no_values_message(runs, metric))
    table = analysis.markdown_table(rows, metric)
    print(table, end="")
    md_path = out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(table)
    print(f"table written to {md_path}", file=sys.stderr)

    if args.table_only:
        return 0
    curves, warnings = analysis.aggregate_curves(runs, metric, n_points=args.points)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not curves:
        raise analysis.AnalysisError(f"nothing to plot for '{metric}'")
    title = args.title or analysis.default_title(runs, metric)
    written = analysis.plot_curves(curves, metric, out, title)
    print(f"figure written to {written}{note}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except ConfigError as exc:  # a bad flag
        print(f"plot: error: {exc}", file=sys.stderr)
        return 2
    except analysis.AnalysisError as exc:
        print(f"plot: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable files, unwritable output: still one line
        print(f"plot: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
