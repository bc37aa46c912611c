"""Device choice and torch thread count."""
from __future__ import annotations

import os

import torch

from train.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def tune_allocator() -> None:
    """Keep freed memory in the heap instead of returning it to the OS.

    glibc serves the multi-MB activations of an update with mmap/munmap, so every
    forward/backward page-faults its buffers in again; measured on the 2-core machine
    this doubled the time of element-wise ops (docs/performance.md). Raising the mmap and
    trim thresholds makes freed blocks reusable. Linux/glibc only; a no-op elsewhere.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def set_threads(requested: int) -> int:
    """Use ``requested`` intra-op threads, or 1 when 0 ("auto").

    Measured on the 2-core machine (docs/performance.md): the networks here are small
    (batches of a few thousand rows, 128-wide layers), so extra intra-op threads mostly
    add synchronisation, and the environments want the other core.
    """
    threads = requested if requested > 0 else 1
    tune_allocator()
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads
