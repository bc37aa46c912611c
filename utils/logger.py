"""Metrics out: ``metrics.csv`` (the record every tool reads), tensorboard, optional
wandb, and a console progress line. One row per log interval."""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

import psutil

from utils.checkpoint import CheckpointError, atomic_write_bytes
from utils.errors import ConfigError


# metrics.csv columns that describe the machine, not the learning: they differ between two
# runs of the same seed (and across a resume), so reproducibility checks leave them out.
MACHINE_COLUMNS = ("wall_seconds", "sps", "rss_mb", "torch_threads")


def varies_by_machine(column: str) -> bool:
    return column in MACHINE_COLUMNS or column.startswith("time/")


def resident_mb() -> float:
    """Resident memory of this process plus its children (env worker processes), summed, in
    MB (pages they share count once per process). Logged with every row, so memory that
    grows over a long run shows up in the curves."""
    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited between the listing and the read
            pass
    return total / 2**20


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _start_wandb(run_dir: Path, config):
    import wandb

    try:
        return wandb.init(project=config.wandb_project, dir=str(run_dir), config=config.to_dict(),
                          name=f"{config.algo}-{Path(run_dir).parent.name}-seed{config.seed}",
                          mode=os.environ.get("WANDB_MODE", "online"), reinit=True)
    except wandb.errors.Error as exc:  # no API key, a rejected key, no network, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"Weights & Biases did not start ({reason}); run `wandb login`, "
                          "or set WANDB_MODE=offline to log without an account", field="wandb") from None


def _remove_tb_events(tb_dir: Path) -> None:
    """Delete the event files in this run's own ``tb/`` (tensorboard would overlay them)."""
    for path in tb_dir.glob("events.out.tfevents.*"):
        if path.is_file():
            path.unlink()


def tensorboard_tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column; the prefix is the panel it shows in:
    ``eval_return`` -> ``eval/return``, ``train_episode_return`` -> ``train/episode_return``,
    ``agent0/kl`` as it is, the rest (``sps``, ``rss_mb``, ...) -> ``run/<column>``."""
    if "/" in column:
        return column
    for prefix in ("eval", "train"):
        if column.startswith(prefix + "_"):
            return f"{prefix}/{column[len(prefix) + 1:]}"
    return f"run/{column}"


class MetricsLogger:
    """Appends rows to ``<run_dir>/metrics.csv``; on resume, first drops rows after the
    checkpoint (``keep_up_to_env_steps``) so replayed iterations are not doubled."""

    def __init__(self, run_dir: Path, config, keep_up_to_env_steps: int | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.header: list[str] | None = None
        # W&B first: it is the step that fails on the user's setup (no login), and failing
        # before anything is written leaves a new run directory empty (removed) and an old one intact.
        self.wandb_run = _start_wandb(run_dir, config) if config.wandb else None
        if keep_up_to_env_steps is not None and self.path.exists():
            self._truncate(keep_up_to_env_steps)
        elif self.path.exists():
            self.path.unlink()
        if keep_up_to_env_steps is None:  # starting from step 0: the old events are of a discarded session
            _remove_tb_events(Path(run_dir) / "tb")
        self.tb = None
        if config.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=None if keep_up_to_env_steps is None else keep_up_to_env_steps + 1)
        self._tty = sys.stdout.isatty()

    def _truncate(self, keep_up_to: int) -> None:
        text = self.path.read_text()
        if not text.endswith("\n"):  # a row cut short by a crash mid-write: drop it
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        self.header = list(reader.fieldnames or [])
        if not self.header:
            self.header = None
            return
        rows = [r for r in reader
                if None not in r and r.get("env_steps") and int(float(r["env_steps"])) <= keep_up_to]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.header, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, out.getvalue().encode())

    def log(self, row: dict[str, Any]) -> None:
        if self.header is None:
            self.header = list(row)
            self._rewrite([])
        elif any(k not in self.header for k in row):  # a new column: widen the file once
            with open(self.path, newline="") as fh:
                old = list(csv.DictReader(fh))
            self.header += [k for k in row if k not in self.header]
            self._rewrite(old)
        try:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.header, restval="").writerow(
                    {k: _format(v) for k, v in row.items()})
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise CheckpointError(f"could not append to {self.path}: {exc.strerror}") from None
        step = int(row["env_steps"])
        numeric = {k: float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}
        if self.tb is not None:
            for key, value in numeric.items():
                if key != "env_steps":
                    self.tb.add_scalar(tensorboard_tag(key), value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numeric, step=step)

    def progress(self, env_steps: int, total: int, sps: float, last_return: float | None,
                 extra: str = "", final_line: bool = False) -> None:
        """``[ 120000/400000  30%] 5230 sps  ETA 0:00:53  return 1523.4``."""
        eta = (total - env_steps) / sps if sps > 0 else 0.0
        h, rem = divmod(int(eta), 3600)
        ret = "n/a" if last_return is None or math.isnan(last_return) else f"{last_return:.1f}"
        line = (f"[{env_steps:>{len(str(total))}}/{total} {100 * env_steps / total:3.0f}%] "
                f"{sps:6.0f} sps  ETA {h}:{rem // 60:02d}:{rem % 60:02d}  return {ret}{extra}")
        if self._tty and not final_line:
            sys.stdout.write("\r" + line + "\x1b[K")
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self._tty:
            sys.stdout.write("\n")
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
