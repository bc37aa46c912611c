"""Atomic file writes and the one checkpoint format every runner uses.

A checkpoint is written to a temporary file in the same directory, flushed to disk and
renamed over the old one, so a crash (even SIGKILL mid-write) leaves either the old or
the new checkpoint, never half of one. ``checkpoints/last.pt`` holds everything needed to
continue exactly: config, networks, optimisers, value normalisers, counters, every RNG,
the environments' simulator states and the logger's position.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported where a checkpoint is written or read, so that importing this module
# (for CheckpointError, by the CLI's error handling) costs nothing at start-up.
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(f"could not write {path}: {reason}; the previous version is intact") from None


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    import torch

    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or a run directory's last one) or raise CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    import torch

    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / garbage files surface as many exception types
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a version-{CHECKPOINT_VERSION} checkpoint of this project")
    return payload
