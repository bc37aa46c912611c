"""Helpers for tests that drive a real ``python -m train.train`` process."""
from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


def interrupt_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 120,
                   stop: signal.Signals = signal.SIGINT, **popen_kwargs) -> tuple[subprocess.Popen, str, str]:
    """Start ``cmd``, wait until ``ready()`` (or the process ends, or ``timeout``), send it
    ``stop`` (SIGINT: Ctrl-C) once if still running, and wait for it. Returns (process,
    stdout, stderr)."""
    proc = subprocess.Popen(cmd, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                                    **popen_kwargs})
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(stop)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err
