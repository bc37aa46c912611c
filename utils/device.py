"""Device choice and torch thread count."""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from utils.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine (use cpu or auto)", field="device", value=name)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}", field="device", value=name)
    return device


def tune_allocator() -> None:
    """Keep freed memory in the heap instead of returning it to the OS.

    glibc serves the multi-MB activations of an update with mmap/munmap, so every
    forward/backward page-faults its buffers in again; measured on the 2-core machine
    this doubled the time of element-wise ops (docs/performance.md). Raising the mmap and
    trim thresholds makes freed blocks reusable. Linux/glibc only; a no-op elsewhere.
    """
    try:
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


class CoreShare:
    """Splits the cores among the runs of this project on the machine (``--torch_threads 0``).

    Auto threads used to be chosen once, from the cores idle at start-up. Two runs started
    together both saw an idle machine and took 2 threads each on 2 cores: SMAX 3m HAPPO and
    HATRPO then ran at 465 and 231 env-steps/s instead of ~13,000 and ~7,000 (threads
    spin-waiting for a core they do not get). A run started beside a 2-thread run took 1
    thread and the first kept 2: 4,500 + 9,000 env-steps/s, where one thread each gives
    ~8,900 + 8,900. Now each run registers a file in ``directory`` and takes
    ``cores // live runs`` threads, re-read every iteration (``Runner`` calls
    :func:`rebalance_threads`), never more than ``cap``.

    A registration is named by the pid and holds the process's identity: its start time (a
    reused pid does not count), the boot and the pid namespace (runs in other containers
    sharing the temp directory are neither counted nor removed). It is written under a
    temporary name and renamed, so no reader ever sees half of one.
    """

    def __init__(self, cores: int, cap: int, directory: Path | None = None):
        self.cores, self.cap = cores, cap
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        self.directory = directory or Path(tempfile.gettempdir()) / f"harl-lite-runs-{user}"
        self.path = self.directory / str(os.getpid())
        self.identity = _identity(os.getpid())  # what this process's registration holds
        self.register()

    def register(self) -> None:
        """(Re)write this process's registration (also after a temp cleaner removed it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.identity))
        os.replace(tmp, self.path)

    def live_runs(self) -> int:
        """Registered runs whose process is still the one that registered (this one included)."""
        if not self.path.exists():
            self.register()
        here = self.identity
        live = 0
        for entry in self.directory.iterdir():
            if not entry.name.isdigit():  # a registration being written, or not ours
                continue
            try:
                theirs = json.loads(entry.read_text())
                same_namespace = (theirs["boot"], theirs["pid_ns"]) == (here["boot"], here["pid_ns"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # removed meanwhile, or unreadable: neither counted nor removed
            if not same_namespace:
                if theirs["boot"] != here["boot"]:
                    entry.unlink(missing_ok=True)  # from before a reboot: surely dead
                continue
            try:
                alive = _start_time(int(entry.name)) == theirs["start"]
            except OSError:  # no such process
                alive = False
            if alive:
                live += 1
            else:
                entry.unlink(missing_ok=True)  # left by a killed run
        return max(live, 1)

    def threads(self) -> int:
        return max(1, min(self.cap, self.cores // self.live_runs()))

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def _start_time(pid: int) -> float:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22)."""
    with open(f"/proc/{pid}/stat") as fh:
        return float(fh.read().rsplit(")", 1)[1].split()[19])


def _identity(pid: int) -> dict:
    """A registration's content: the process's start time, with this machine's boot id and
    this process's pid namespace."""
    with open("/proc/sys/kernel/random/boot_id") as fh:
        boot = fh.read().strip()
    return {"start": _start_time(pid), "boot": boot, "pid_ns": os.stat("/proc/self/ns/pid").st_ino}


_share: CoreShare | None = None  # this process's registration, with --torch_threads 0


def set_threads(requested: int) -> int:
    """Use ``requested`` intra-op threads, or, when 0 ("auto"), this run's share of the cores
    (:class:`CoreShare`), capped by the cores other processes left idle at start-up
    (sampled from /proc/stat over 0.2 s) and by 4.

    Measured on the 2-core machine (docs/performance.md, HAPPO HalfCheetah 2x3 bench): on an
    idle machine 2 threads gave 5,308 env-steps/s against 4,701 with 1 thread (plus the
    concurrent critic thread); but with the other core busy, 2 threads collapsed a
    HATRPO run to 31 env-steps/s (threads spin-waiting on a core they do not get), so a
    busy machine gets 1 thread. Environments never step during an update here, so the
    update may use every free core; beyond 4 these small networks gain little.
    """
    global _share
    if requested > 0:
        release_cores()  # an earlier auto run in this process must not rebalance this one
        threads = requested
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        try:
            if _share is None:  # registered before sampling: runs started together see each other
                _share = CoreShare(cores, cap=4)
            others = _share.live_runs() > 1
        except OSError:  # no /proc or no writable temp dir: the start-up sample alone
            _share, others = None, False
        idle = max(1, min(4, int(_idle_cores(cores) + 0.5)))
        if _share is None:
            threads = idle
        else:
            # Other runs' load is counted by the share; only other programs' load caps it.
            _share.cap = 4 if others else idle
            threads = _share.threads()
    tune_allocator()
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads


def rebalance_threads() -> tuple[int, int]:
    """With ``--torch_threads 0``: follow this run's share as other runs start and finish.

    Returns (threads before, threads now). A registry that cannot be read or written (a
    temp cleaner at work, a full disk) keeps the current count.
    """
    before = torch.get_num_threads()
    if _share is not None:
        try:
            threads = _share.threads()
        except OSError:
            threads = before
        if threads != before:
            torch.set_num_threads(threads)
    return before, torch.get_num_threads()


def release_cores() -> None:
    """Leave the share (the run is over): the other runs take the cores at their next iteration."""
    global _share
    if _share is not None:
        _share.close()
        _share = None


atexit.register(release_cores)  # a no-op unless this process still holds a share
