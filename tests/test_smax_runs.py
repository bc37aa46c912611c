"""Short real SMAX (jaxmarl) training runs through the same runner, buffer and checkpoint
as MaMuJoCo: discrete actions with availability masks, dead agents, win rate, with and
without recurrent (GRU) policies, for HAPPO and HATRPO (and MAPPO with shared parameters)."""
import csv
import json

import pytest
import yaml

from train.train import main

pytestmark = pytest.mark.slow  # real SMAX training runs

TINY = ["--env", "smax", "--map_name", "3m", "--n_rollout_threads", "4", "--episode_length", "20",
        "--hidden_sizes", "16", "--ppo_epoch", "2", "--critic_epoch", "2", "--eval_episodes", "4",
        "--n_eval_rollout_threads", "4", "--num_env_steps", "160", "--log_interval", "1",
        "--no-tensorboard", "--no-progress", "--data_chunk_length", "10"]


@pytest.mark.parametrize("algo,recurrent", [("happo", False), ("hatrpo", False), ("happo", True),
                                            ("hatrpo", True), ("mappo", True)])
def test_smax_run_writes_metrics_win_rate_and_resumes(tmp_path, algo, recurrent):
    flags = [*TINY, "--algo", algo, "--results_dir", str(tmp_path),
             "--use_recurrent_policy" if recurrent else "--no-use_recurrent_policy"]
    assert main(flags) == 0
    run = tmp_path / "smax" / "3m" / algo / "default" / "seed-1"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["env_steps"]) for r in rows] == [80, 160]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 160 and 0.0 <= summary["eval_win_rate"] <= 1.0
    assert "train_win_rate" in rows[0] and rows[-1]["eval_win_rate"] != ""
    agents = ["agent0", "agent1", "agent2"] if algo != "mappo" else ["shared"]
    for name in agents:
        if algo == "hatrpo":  # every step inside the run's trust region, or rejected
            kl_threshold = yaml.safe_load((run / "config.yaml").read_text())["kl_threshold"]
            assert kl_threshold == 0.03  # configs/smax/3m.yaml
            for r in rows:
                assert float(r[f"{name}/kl_max"]) < kl_threshold or float(r[f"{name}/accepted"]) == 0.0
        else:
            assert f"{name}/clip_fraction" in rows[0]
    # resume continues the step count exactly
    assert main(["--resume", str(run), "--num_env_steps", "240"]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["env_steps"]) for r in rows] == [80, 160, 240]
