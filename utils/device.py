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
    """Use ``requested`` intra-op threads, or, when 0 ("auto"), the cores this process may
    run on, at most 4.

    Measured on the 2-core machine (docs/performance.md, HAPPO HalfCheetah 2x3 bench):
    2 threads with the critic trained after the actors gave 5,283 env-steps/s, 1 thread
    4,701 (3,763 without the concurrent critic thread), and 2 threads *plus* the critic
    thread 3,940 (the thread pools contend). Environments never step during an update
    here, so the update may use every core; beyond 4 these small networks gain little.
    """
    if requested > 0:
        threads = requested
    else:
        try:
            threads = min(len(os.sched_getaffinity(0)), 4)
        except AttributeError:  # not Linux
            threads = min(os.cpu_count() or 1, 4)
    tune_allocator()
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads
