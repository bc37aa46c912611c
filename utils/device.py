"""Device choice and torch thread count."""
from __future__ import annotations

import os
import time

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


def _idle_cores(cores: int, interval: float = 0.2) -> float:
    """How many of ``cores`` sat idle over ``interval`` seconds (Linux /proc/stat);
    ``cores`` where that cannot be read."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total (all CPUs)

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float(cores)
    if total1 <= total0:
        return float(cores)
    online = os.cpu_count() or cores
    return min(cores, online * (idle1 - idle0) / (total1 - total0))


def set_threads(requested: int) -> int:
    """Use ``requested`` intra-op threads, or, when 0 ("auto"), the cores left idle by
    other processes at start-up (sampled from /proc/stat over 0.2 s), from 1 to 4.

    Measured on the 2-core machine (docs/performance.md, HAPPO HalfCheetah 2x3 bench): on an
    idle machine 2 threads gave 5,308 env-steps/s against 4,701 with 1 thread (plus the
    concurrent critic thread); but with the other core busy, 2 threads collapsed a
    HATRPO run to 31 env-steps/s (threads spin-waiting on a core they do not get), so a
    busy machine gets 1 thread. Environments never step during an update here, so the
    update may use every free core; beyond 4 these small networks gain little.
    """
    if requested > 0:
        threads = requested
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        threads = max(1, min(4, int(_idle_cores(cores) + 0.5)))
    tune_allocator()
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads
