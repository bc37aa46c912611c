"""One process trains a run directory at a time: an flock on the directory itself, which
leaves no file behind and which the kernel releases when the process ends."""
from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking (try_lock returns None)
    fcntl = None


def try_lock(directory: Path) -> int | None:
    """Lock ``directory``: the descriptor holding the lock (closing it releases it), or None
    where no lock is possible (not POSIX, or a file system that refuses flock on
    directories, as some NFS set-ups do). Raises BlockingIOError while another process
    holds it."""
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def held_elsewhere(directory: Path) -> bool:
    """True while another process (or descriptor) holds ``directory``'s lock."""
    try:
        fd = try_lock(directory)
    except BlockingIOError:
        return True
    if fd is not None:
        os.close(fd)
    return False
