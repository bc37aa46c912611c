"""utils/device.py's auto thread count: runs on one machine split its cores (CoreShare),
re-read every iteration. Other runs are stood in for by sleeping child processes."""
from __future__ import annotations

import json
import os
import shutil
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


def register(directory, pid: int, **changes) -> None:
    """A registration as CoreShare writes it, with ``changes`` to its identity fields."""
    (directory / str(pid)).write_text(json.dumps({**device._identity(pid), **changes}))


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
    started = device._identity(sleeper.pid)["start"]
    register(tmp_path, sleeper.pid, start=started - 1)  # an older process's, pid since reused
    (tmp_path / "notes.txt").write_text("not a registration")
    assert share.live_runs() == 1 and share.threads() == 2
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / str(sleeper.pid)).exists()
    share.close()


def test_registrations_being_written_or_from_elsewhere_are_left_alone(tmp_path, sleeper):
    """A reader may see another run's file while it is written (empty): that run must not be
    deleted. Runs in another pid namespace (container) cannot be checked: ignored, kept;
    registrations from before a reboot are removed."""
    share = device.CoreShare(cores=2, cap=4, directory=tmp_path)
    (tmp_path / str(sleeper.pid)).write_text("")
    assert share.live_runs() == 1 and (tmp_path / str(sleeper.pid)).exists()
    register(tmp_path, sleeper.pid, pid_ns=-1)
    assert share.live_runs() == 1 and (tmp_path / str(sleeper.pid)).exists()
    register(tmp_path, sleeper.pid, boot="another boot")
    assert share.live_runs() == 1 and not (tmp_path / str(sleeper.pid)).exists()
    register(tmp_path, sleeper.pid)
    assert share.live_runs() == 2
    share.close()


def test_a_removed_registry_is_rebuilt(tmp_path, sleeper):
    share = device.CoreShare(cores=2, cap=4, directory=tmp_path / "runs")
    shutil.rmtree(tmp_path / "runs")  # a temp cleaner
    assert share.threads() == 2 and share.path.exists()
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
        assert device.rebalance_threads() == (2, 1) and torch.get_num_threads() == 1
        sleeper.kill()
        sleeper.wait()
        assert device.rebalance_threads() == (1, 2)  # it ended: the cores come back
        shutil.rmtree(registry)  # a temp cleaner: the run goes on, registered again
        assert device.rebalance_threads() == (2, 2) and (registry / str(os.getpid())).exists()
        # An explicit count afterwards (same process) leaves the share: nothing rebalances it.
        assert device.set_threads(3) == 3 and device._share is None
        assert not (registry / str(os.getpid())).exists()
        assert device.rebalance_threads() == (3, 3)
    finally:
        device.release_cores()
        torch.set_num_threads(before)


def test_a_cuda_device_the_machine_lacks_is_one_line(monkeypatch):
    """cuda:N past the machine's devices failed deep inside torch at the first tensor moved
    there; a misspelling such as cudaX failed in torch.device. Both are a ConfigError now
    (a GPU machine is stood in for: CUDA available, one device)."""
    from train.config import Config, ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"--device cuda:1: this machine has 1 CUDA device\(s\), cuda:0..cuda:0"):
        device.resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="--device must be auto, cpu or cuda"):
        Config(device="cudaX").validate()
