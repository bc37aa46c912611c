"""utils/device.py's auto thread count: runs on one machine split its cores (CoreShare),
re-read every iteration. Other runs are stood in for by sleeping child processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from utils import device

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def register(directory, pid: int, started: float | None = None) -> None:
    (directory / str(pid)).write_text(str(device._start_time(pid) if started is None else started))


def test_live_runs_split_the_cores(tmp_path, sleeper):
    share = device.CoreShare(cores=4, cap=4, directory=tmp_path)
    assert share.live_runs() == 1 and share.threads() == 4
    register(tmp_path, sleeper.pid)
    assert share.live_runs() == 2 and share.threads() == 2
    share.cap = 1
    assert share.threads() == 1
    sleeper.kill()
    sleeper.wait()
    assert share.live_runs() == 1  # its file is left behind, as by a killed run
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(os.getpid())]  # and removed
    share.close()
    assert not list(tmp_path.iterdir())


def test_a_reused_pid_or_a_stray_file_does_not_count(tmp_path, sleeper):
    share = device.CoreShare(cores=2, cap=4, directory=tmp_path)
    register(tmp_path, sleeper.pid, started=device._start_time(sleeper.pid) - 1)  # an older process's
    (tmp_path / "notes.txt").write_text("not a registration")
    assert share.live_runs() == 1 and share.threads() == 2
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / str(sleeper.pid)).exists()
    share.close()


def test_auto_threads_follow_the_other_runs(tmp_path, monkeypatch, sleeper):
    device.release_cores()
    monkeypatch.setattr(device.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(device, "_idle_cores", lambda cores, interval=0.2: float(cores))
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        assert device.set_threads(0) == 2  # alone on an idle 2-core machine
        registry = device._share.directory
        register(registry, sleeper.pid)  # a second run starts
        assert device.rebalance_threads() == 1 == torch.get_num_threads()
        sleeper.kill()
        sleeper.wait()
        assert device.rebalance_threads() == 2  # it ended: the cores come back
        device.release_cores()
        assert not (registry / str(os.getpid())).exists()
        assert device.set_threads(3) == 3 and device._share is None  # explicit: no share
    finally:
        device.release_cores()
        torch.set_num_threads(before)
