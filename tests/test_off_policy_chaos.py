"""The crash test (train/chaos.py, scripts/chaos.sh) on the off-policy family: SIGKILL at
random moments, --resume after each, and the finished run's metrics equal an uninterrupted
run's row for row (the replay buffer's chunked checkpoints included)."""
import json

import pytest

pytest.importorskip("gymnasium_robotics")

from train.chaos import main as chaos_main  # noqa: E402


@pytest.mark.slow
def test_sigkills_then_resume_match_the_uninterrupted_hatd3_run(tmp_path, capsys):
    rc = chaos_main(["--algo", "hatd3", "--num_env_steps", "4000", "--n_rollout_threads", "2",
                     "--warmup_steps", "600", "--train_interval", "50", "--batch_size", "32",
                     "--hidden_sizes", "16,16", "--buffer_size", "1000", "--save_interval", "2",
                     "--torch_threads", "1", "--kills", "2", "--chaos_seed", "7",
                     "--chaos_dir", str(tmp_path / "chaos")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["ok"], result
    assert result["kills"] == 2 and result["all_rows_equal"] and result["no_gaps"]
