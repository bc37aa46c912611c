"""bash scripts/bench.sh's contract: a last-line JSON with the figures the throughput issue
names, on the reference implementation's 20 x 200 HalfCheetah rollout unless told otherwise."""
import json
import resource
import subprocess
import sys
import time

import pytest
import torch

from train import bench


def test_given_recognises_every_spelling():
    assert bench.given(["--episode_length", "9"], "episode_length")
    assert bench.given(["--episode-length=9"], "episode_length")
    assert not bench.given(["--episode_lengthx", "9", "--env"], "episode_length")


@pytest.mark.slow
def test_bench_prints_the_figures_on_the_reference_rollout(capsys):
    rc = bench.main(["--iterations", "2", "--hidden_sizes", "16,16", "--ppo_epoch", "1", "--critic_epoch", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "summary.json" not in out  # the run's own lines name a temporary directory
    assert "20x200" in result["workload"] and "happo" in result["workload"]
    assert result["workload"].endswith("compile=off")  # the suite runs eager (tests/conftest.py)
    assert result["env_steps"] == 2 * 20 * 200
    assert result["sps"] > 0 and result["env_only_sps"] > 0 and result["peak_rss_mb"] > 0
    # In-process envs: no child lives through the run, so the peak is this process's own
    # (the git call recording the run's revision must not add this process's size again).
    own_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert result["peak_rss_mb"] <= own_mb + 1.0
    assert {"env", "inference", "buffer", "update"} <= set(result["seconds"])


def test_bench_rejects_bad_input(capsys):
    assert bench.main(["--iterations", "0"]) == 2
    assert bench.main(["--algo", "nope"]) == 2
    assert bench.main(["--num-env-steps", "5000"]) == 2  # the benchmark's own: would be overridden
    assert bench.main(["--no-use_eval"]) == 2
    assert bench.main(["--tensorboard"]) == 2
    assert bench.main(["--progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("error: ") for line in err)
    if not torch.cuda.is_available():  # --device=cuda was replaced by the CPU without a word
        assert bench.main(["--device=cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert err[5] == "error: --progress is set by the benchmark (its last line is the result)"
    assert "--num_env_steps is set by the benchmark (use --iterations)" in err[2]


def test_child_peaks_counts_the_memory_of_live_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(150 * 2**20); "
                              "x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and bench._peak_kib(child.pid) < 150 * 1024:
            time.sleep(0.2)
        own = bench._peak_kib(child.pid) / 1024  # the child's own peak: its 150 MB, not ours
        assert 150 <= own < 300
        time.sleep(1.0)  # children younger than a second are not counted yet
        peaks = bench.ChildPeaks()
        peaks.sample()
        assert peaks.peak_kib / 1024 >= own  # it, plus any other child of this process
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_bench_of_the_off_policy_family_measures_updating_iterations(capsys):
    rc = bench.main(["--algo", "hatd3", "--iterations", "3", "--hidden_sizes", "16,16", "--batch_size", "32",
                     "--n_rollout_threads", "2", "--train_interval", "10"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["workload"].startswith("hatd3 mamujoco/HalfCheetah-2x3 2x10 batch=32 updates/iteration=10")
    assert result["env_steps"] == 3 * 2 * 10
    # the warm-up is the first iteration alone: the measured ones update
    assert result["seconds"]["update"] > 0 and {"critic", "actor", "sample"} <= set(result["update_seconds"])
    assert result["seconds"]["update"] >= sum(result["update_seconds"].values()) * 0.99
