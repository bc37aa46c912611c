"""Command line of ``python -m train.train``: bad input exits 2 with one line on stderr
(``error: ...``), no traceback, and touches nothing already saved; flags, ``--no-x``
booleans, dashed aliases and YAML layering resolve as documented in train/config.py.

Almost everything runs ``train.train.main`` in-process; a few cases run the real command
to see the process's own exit status and stderr. One tiny real run (module fixture) backs
the checks that need an existing run directory.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from algorithms import registry
from train.config import CONFIG_DIR, OPTIONS, Config, config_from_dict, load_config
from train.train import main
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_rollout_threads", "2", "--episode_length", "50", "--hidden_sizes", "16,16", "--critic_epoch", "1",
        "--eval_episodes", "1", "--n_eval_rollout_threads", "1", "--device", "cpu", "--torch_threads", "1",
        "--no-progress", "--no-tensorboard"]
SMALL = [*TINY, "--ppo_epoch", "1", "--num_env_steps", "100"]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process. Flags meant to be rejected go after TINY and a small budget
    (later flags win), so that input wrongly accepted gives a failing test, not a full-size run."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- bad flags --------------------------------------------------------------------------------
BAD_FLAGS = {
    "unknown scenario": (["--scenario", "NoSuchBody"], ["--scenario", "NoSuchBody"]),
    "unknown partition": (["--agent_conf", "7x7"], ["--agent_conf", "7x7"]),
    "unknown algorithm": (["--algo", "nosuch"], ["--algo", "nosuch"]),
    "negative budget": (["--num_env_steps", "-5"], ["--num_env_steps", "-5"]),
    "zero budget": (["--num_env_steps", "0"], ["--num_env_steps"]),
    "zero threads": (["--n_rollout_threads", "0"], ["--n_rollout_threads"]),
    "non-numeric lr": (["--lr", "abc"], ["lr", "abc"]),
    "fractional int": (["--num_env_steps", "1.5"], ["num_env_steps", "1.5"]),
    "unknown flag": (["--learning_rate", "1"], ["--learning_rate"]),
    "misspelled flag": (["--num_env_step", "1000"], ["--num_env_step", "did you mean --num_env_steps?"]),
    "boolean with a value": (["--use_valuenorm", "false"], ["false", "--no-x"]),
    "abbreviated flag": (["--num_env", "100"], ["--num_env"]),  # no argparse prefix matching
    "missing value": (["--seed"], ["--seed"]),
    "bad boolean value": (["--share_param", "maybe"], ["maybe"]),
    "missing config file": (["--config", "/no/such/file.yaml"], ["/no/such/file.yaml"]),
    "missing resume dir": (["--resume", "/no/such/dir"], ["--resume", "/no/such/dir"]),
    "recurrent chunking": (["--use_recurrent_policy", "--episode_length", "25", "--data_chunk_length", "10"],
                           ["--episode_length", "--data_chunk_length"]),
    "bad device": (["--device", "tpu"], ["--device"]),
    "unknown env family": (["--env", "nosuch"], ["--env"]),
    "eval_only without model": (["--eval_only"], ["--model_dir"]),
    "eval_only missing model": (["--eval_only", "--model_dir", "/no/such/run"], ["--model_dir", "/no/such/run"]),
    "model_dir without eval_only": (["--model_dir", "/tmp"], ["--model_dir", "--eval_only", "--resume"]),
    "negative seed": (["--seed", "-1"], ["--seed", "-1"]),
    "seed beyond 2**32": (["--seed", "99999999999"], ["--seed", "99999999999"]),
    "negative clip": (["--clip_param", "-0.2"], ["--clip_param", "-0.2"]),
    "negative grad norm": (["--max_grad_norm", "-1"], ["--max_grad_norm", "-1"]),
    "negative entropy": (["--entropy_coef", "-1"], ["--entropy_coef", "-1"]),
    "nan clip": (["--clip_param", "nan"], ["--clip_param", "nan"]),
    "gamma above 1": (["--gamma", "1.5"], ["--gamma", "1.5"]),
    "nested exp_name": (["--exp_name", "a/b"], ["--exp_name", "a/b"]),
    "empty exp_name": (["--exp_name", ""], ["--exp_name"]),
    "flag of another env family": (["--map_name", "3m"], ["--map_name", "--env mamujoco", "--scenario"]),
    "body with no partition": (["--scenario", "InvertedPendulum"], ["--scenario", "no partition"]),
    "body that does not reproduce": (["--scenario", "Pusher", "--agent_conf", "3p"], ["--scenario Pusher", "seed"]),
    "one swimmer segment": (["--scenario", "ManySegmentSwimmer", "--agent_conf", "1x1"],
                            ["--agent_conf", "at least 2 segments", "'1x1'"]),
    "partition of another body": (["--agent_conf", "4x2"], ["--agent_conf", "known: 2x3, 6x1"]),
    "budget below one iteration": (["--num_env_steps", "50"], ["--num_env_steps", "50", "100 env steps"]),
}


@pytest.mark.parametrize("argv,needles", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, argv, needles):
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*SMALL, *argv, "--results_dir", str(results)])
    assert_usage_error(rc, err, *needles)
    assert not results.exists()  # rejected before anything is created


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--scenario", "NoSuchBody"], ["--learning_rate", "1"], ["--lr", "abc"]],
                         ids=["scenario", "unknown-flag", "lr"])
def test_bad_flags_real_process(tmp_path, argv):
    """The real command: status 2, exactly one stderr line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "train.train", *argv, "--results_dir", str(tmp_path / "r")],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=120)
    assert_usage_error(proc.returncode, proc.stderr, argv[0].lstrip("-"))
    assert proc.stdout == ""


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--num_env_steps" in out and "--no-use_valuenorm" in out and "--num-env-steps" in out


def test_unwritable_results_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    rc, out, err = run_main(capsys, [*TINY, "--results_dir", str(blocker / "results"), "--num_env_steps", "100"])
    assert_usage_error(rc, err, "--results_dir", str(blocker / "results"), "is a file")
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.slow
def test_wandb_without_a_login_is_one_line_and_leaves_no_run_dir(tmp_path, capsys, monkeypatch):
    """wandb.init faked to raise what the real one raises without an API key (no network)."""
    wandb = pytest.importorskip("wandb")

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    results = tmp_path / "results"
    rc, out, err = run_main(capsys, [*SMALL, "--tensorboard", "--wandb", "--results_dir", str(results)])
    assert_usage_error(rc, err, "--wandb", "wandb login", "WANDB_MODE=offline")
    assert not results.exists(), sorted(p.relative_to(tmp_path) for p in results.rglob("*"))


# -- config files -------------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", ["foo_bar: 3\n", "common:\n  foo_bar: 3\n", "happo:\n  foo_bar: 3\n"],
                         ids=["flat", "common", "algo-section"])
def test_config_unknown_key_names_file_and_key(tmp_path, capsys, text):
    path = write(tmp_path / "user.yaml", text)
    rc, out, err = run_main(capsys, [*SMALL, "--config", str(path), "--results_dir", str(tmp_path / "r")])
    assert_usage_error(rc, err, str(path), "foo_bar")


def test_config_unknown_key_hints_the_close_name(tmp_path, capsys):
    path = write(tmp_path / "user.yaml", "common:\n  num-env-steps: 3\n")
    rc, out, err = run_main(capsys, [*SMALL, "--config", str(path), "--results_dir", str(tmp_path / "r")])
    assert_usage_error(rc, err, str(path), "num-env-steps", "num_env_steps")


def test_config_unknown_key_in_another_algorithms_section(tmp_path, capsys):
    path = write(tmp_path / "user.yaml", "mappo:\n  ppo_epochs: 3\n")  # typo, while running happo
    # load_config, not main(): were the file accepted, main() would start a full-size run.
    with pytest.raises(ConfigError, match="ppo_epochs"):
        load_config(["--algo", "happo", "--config", str(path)])


@pytest.mark.parametrize("text,needles", [
    ("common: [1, 2\n  x: : :\n", ["not valid YAML"]),
    ("common:\n  lr: 0.1\n   bad: : x\n", ["not valid YAML (line 3, column 7)"]),
    ("- 1\n- 2\n", ["mapping"]),
    ("common: 5\n", ["common", "mapping"]),
    ("common:\n  lr: abc\n", ["lr", "abc"]),
    ("happo:\n  ppo_epoch: 2.5\n", ["ppo_epoch"]),
], ids=["malformed", "malformed-line", "top-level-list", "section-not-mapping", "bad-float", "bad-int"])
def test_bad_config_file(tmp_path, capsys, text, needles):
    path = write(tmp_path / "user.yaml", text)
    rc, out, err = run_main(capsys, [*SMALL, "--config", str(path), "--results_dir", str(tmp_path / "r")])
    assert_usage_error(rc, err, str(path), *needles)
    assert not (tmp_path / "r").exists()


def test_layering_defaults_task_yaml_user_file_flags(tmp_path):
    task = yaml.safe_load((CONFIG_DIR / "mamujoco" / "HalfCheetah-2x3.yaml").read_text())
    base = load_config(["--algo", "happo"])
    assert base.ppo_epoch == task["happo"]["ppo_epoch"] and base.clip_param == task["happo"]["clip_param"]
    assert base.n_rollout_threads == task["common"]["n_rollout_threads"]
    user = write(tmp_path / "user.yaml", "common:\n  ppo_epoch: 7\n  seed: 4\nhappo:\n  ppo_epoch: 9\n")
    assert load_config(["--config", str(user)]).ppo_epoch == 9  # algo section beats common
    assert load_config(["--config", str(user), "--algo", "hatrpo"]).ppo_epoch == 7
    flagged = load_config(["--config", str(user), "--ppo_epoch", "3"])
    assert flagged.ppo_epoch == 3 and flagged.seed == 4  # the flag wins, the rest of the file stays


def test_a_config_file_can_name_the_task_and_the_algorithm(tmp_path):
    """The task and algorithm a --config file names pick the task file, its section and the
    per-algorithm defaults, exactly as the same flags would."""
    pytest.importorskip("jaxmarl")
    def settings(argv):
        return {**load_config(argv).to_dict(), "config": ""}

    smax = write(tmp_path / "smax.yaml", "env: smax\nmap_name: 2s3z\n")
    assert settings(["--config", str(smax)]) == settings(["--env", "smax", "--map_name", "2s3z"])
    for algo in ("hatrpo", "mappo"):
        named = write(tmp_path / f"{algo}.yaml", f"common:\n  algo: {algo}\n")
        assert settings(["--config", str(named)]) == settings(["--algo", algo])
    assert settings(["--config", str(smax), "--map_name", "3m"]) == settings(["--env", "smax"])  # flags win
    with pytest.raises(ConfigError, match="smax.yaml: --map_name does not apply to --env mamujoco"):
        load_config(["--config", str(smax), "--env", "mamujoco"])  # the file is for another family
    # The flag picks the file's section: its own algo may not contradict it.
    clash = write(tmp_path / "clash.yaml", "hatrpo:\n  algo: mappo\n")
    with pytest.raises(ConfigError, match="section 'hatrpo' sets algo 'mappo'"):
        load_config(["--algo", "hatrpo", "--config", str(clash)])


@pytest.mark.parametrize("text,needles", [
    ("agent_conf: 7x7\n", ["--agent_conf", "7x7"]),
    ("eval_only: true\n", ["eval_only can only be given on the command line"]),
    ("common:\n  model_dir: /some/run\n", ["model_dir can only be given on the command line"]),
    ("hidden_sizes: [64.7, 32]\n", ["hidden_sizes", "64.7"]),
    ("hidden_sizes: [64, true]\n", ["hidden_sizes"]),
    ("gamma: true\n", ["gamma", "True"]),
    ("backtrack_coeff: 5\n", ["--backtrack_coeff must be in (0, 1)"]),
], ids=["bad-task", "eval_only", "model_dir", "float-list", "bool-in-list", "bool-float", "backtrack"])
def test_a_config_file_is_checked_like_the_flags(tmp_path, capsys, text, needles):
    path = write(tmp_path / "user.yaml", text)
    rc, out, err = run_main(capsys, [*SMALL, "--config", str(path), "--results_dir", str(tmp_path / "r")])
    assert_usage_error(rc, err, *needles)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_runs_config_yaml_passed_as_config_repeats_its_settings(finished_run, tmp_path, capsys):
    """config.yaml holds the command fields at their defaults, so it can start the same
    training again (into a new run directory), or the same settings for another --algo."""
    path = finished_run / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert all(saved[k] in ("", False) for k in ("config", "resume", "model_dir", "eval_only"))
    again = load_config(["--config", str(path), "--exp_name", "again"])
    assert {**again.to_dict(), "exp_name": "default", "config": ""} == saved
    assert load_config(["--config", str(path), "--algo", "hatrpo"]).algo == "hatrpo"  # the flag wins
    # Older versions wrote the --config file and the resumed directory into a run's config.yaml: ignored.
    old = write(tmp_path / "old.yaml", yaml.safe_dump({**saved, "config": "my.yaml", "resume": str(finished_run)}))
    capsys.readouterr()
    assert {**load_config(["--config", str(old)]).to_dict(), "config": ""} == saved
    err = capsys.readouterr().err
    assert "warning: " in err and "config 'my.yaml' ignored" in err and "resume" in err


@pytest.mark.slow
@pytest.mark.parametrize("argv,needles", [
    (["--algo", "hatrpo", "--lr", "0.1"], ["--lr has no effect", "--kl_threshold"]),
    (["--algo", "hatrpo", "--ppo-epoch", "3"], ["--ppo_epoch has no effect"]),
    (["--algo", "happo", "--kl_threshold", "0.1"], ["--kl_threshold has no effect", "hatrpo"]),
    (["--data_chunk_length", "5"], ["--data_chunk_length has no effect", "--use_recurrent_policy"]),
    (["--wandb_project", "x"], ["--wandb_project has no effect", "--wandb"]),
    (["--no-use_huber_loss", "--huber_delta", "3"], ["--huber_delta has no effect"]),
    (["--algo", "hatrpo", "--no-use_clipped_value_loss", "--clip_param", "0.1"],
     ["--clip_param has no effect", "--use_clipped_value_loss"]),
], ids=["hatrpo-lr", "hatrpo-epochs", "happo-kl", "chunks-without-gru", "project-without-wandb",
        "delta-without-huber", "hatrpo-clip-without-value-clip"])
def test_a_flag_the_run_does_not_read_gets_a_warning(tmp_path, capsys, argv, needles):
    rc, out, err = run_main(capsys, [*TINY, "--num_env_steps", "100", *argv, "--results_dir", str(tmp_path / "r")])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and all(n in warnings[0] for n in needles), err
    # The same values from a config file say nothing: a common: section serves every algorithm.
    path = write(tmp_path / "user.yaml", "common:\n  lr: 0.1\n  kl_threshold: 0.1\n  data_chunk_length: 5\n")
    capsys.readouterr()
    assert load_config(["--algo", "hatrpo", "--config", str(path)]).lr == 0.1
    assert load_config(["--algo", "happo", "--config", str(path)]).kl_threshold == 0.1
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_flags_without_evaluation_get_a_warning(tmp_path, capsys):
    rc, out, err = run_main(capsys, [*TINY, "--num_env_steps", "100", "--no-use_eval", "--eval_interval", "3",
                                     "--results_dir", str(tmp_path / "r")])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert [w.split()[1] for w in warnings] == ["--eval_episodes", "--n_eval_rollout_threads", "--eval_interval"]
    assert all("has no effect" in w and "--use_eval" in w for w in warnings), err


def test_the_registries_agree_with_what_they_register():
    """--algo is checked against the registry's names (no torch import); each class declares
    its name, family, action spaces, defaults, reads and whether its loss compiles; each env
    family needs its task flags for the does-not-apply check."""
    from envs.registry import FAMILIES, TASK_FLAGS
    from runners import RUNNERS, runner_class

    classes = registry.algorithm_classes()
    assert [cls.name for cls in classes] == list(registry.NAMES) == list(OPTIONS["algo"].choices)
    assert {cls.family for cls in classes} == set(RUNNERS) == set(registry.FAMILIES)
    for cls in classes:
        assert runner_class(Config(algo=cls.name)).__name__ == RUNNERS[cls.family].partition(":")[2]
    assert FAMILIES.keys() == TASK_FLAGS.keys()
    with pytest.raises(ConfigError, match="did you mean happo"):
        registry.check_name("hapo")


def test_an_algorithm_refuses_an_action_space_it_does_not_support():
    import torch

    from envs.base import AgentSpec, EnvSpec

    discrete = EnvSpec("x", (AgentSpec(3, "discrete", 4),) * 2, state_dim=4, episode_limit=10)
    for cls in registry.algorithm_classes():
        config = dataclasses.replace(Config(algo=cls.name, hidden_sizes=[8]), **cls.defaults)
        if "discrete" in cls.action_kinds:
            assert registry.make_algorithm(config, discrete, torch.device("cpu")).config is config
        else:
            with pytest.raises(ConfigError, match=f"--algo {cls.name} needs continuous actions"):
                registry.make_algorithm(config, discrete, torch.device("cpu"))


def test_no_algorithm_name_is_compared_outside_the_registry():
    """``algo == "hatrpo"`` and the like: an algorithm's behaviour belongs to its class."""
    import ast

    names = set(registry.NAMES)

    def literal_names(node) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value} & names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literal_names(e) for e in node.elts))
        return set()

    found = []
    for path in sorted(REPO.glob("*/*.py")):
        if path.parts[-2] not in ("algorithms", "envs", "runners", "train", "utils") or path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(literal_names(n) for n in (node.left, *node.comparators)):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found


def test_the_command_line_is_parsed_once(monkeypatch, tmp_path, capsys):
    import train.config

    calls = []
    build = train.config.build_parser
    monkeypatch.setattr(train.config, "build_parser", lambda: calls.append(1) or build())
    rc, out, err = run_main(capsys, [*SMALL, "--num_env_steps", "50", "--results_dir", str(tmp_path)])
    assert_usage_error(rc, err, "--num_env_steps")  # rejected after resolving: parsed, layered, validated
    assert len(calls) == 1


def test_an_env_spec_mixing_action_kinds_is_refused():
    """The policies and buffers pick one head type from the spec: mixing kinds would break."""
    from envs.base import AgentSpec, EnvSpec

    EnvSpec("x", (AgentSpec(3, "discrete", 4), AgentSpec(5, "discrete", 2)), state_dim=4, episode_limit=10)
    with pytest.raises(ValueError, match="action_kind"):
        EnvSpec("x", (AgentSpec(3, "discrete", 4), AgentSpec(3, "continuous", 2)), state_dim=4, episode_limit=10)


def test_a_step_without_any_available_action_stops_the_run():
    import numpy as np
    from types import SimpleNamespace

    from runners.runner import NumericalError, Runner

    avail = np.ones((3, 4), bool)
    step = SimpleNamespace(reward=np.zeros(3), state=np.zeros((3, 2)), obs=[np.zeros((3, 2))],
                           terminated=np.zeros(3, bool), truncated=np.zeros(3, bool), avail_actions=[avail])
    runner = SimpleNamespace(env_steps=0, iteration=0, config=SimpleNamespace(n_rollout_threads=3))
    Runner._check_finite(runner, step, 0)
    avail[2] = False
    with pytest.raises(NumericalError, match="agent 0 has no available action in env 2"):
        Runner._check_finite(runner, step, 0)


def test_evaluation_inputs_get_the_buffers_dtypes():
    """An env handing out float64 observations trains (the buffers are float32) and must
    evaluate too: the policy's weights are float32."""
    import numpy as np
    import torch
    from types import SimpleNamespace

    from runners.evaluate import to_torch

    step = SimpleNamespace(obs=[np.zeros((2, 3), np.float64)], avail_actions=[np.ones((2, 4), np.int64)])
    obs, avail = to_torch(step, torch.device("cpu"))
    assert obs[0].dtype == torch.float32 and avail[0].dtype == torch.bool


def test_a_bad_value_from_a_file_names_the_file():
    """A value that fails validation names where it came from unless it was a flag: the
    3m file's 8 mini-batches exceed the 5 recurrent chunks of a 1 x 50 rollout."""
    small = ["--env", "smax", "--map_name", "3m", "--use_recurrent_policy", "--n_rollout_threads", "1",
             "--episode_length", "50", "--num_env_steps", "100"]
    with pytest.raises(ConfigError, match=r"\(8\) exceeds .* \(actor_num_mini_batch is set in .*configs/smax/3m\.yaml\)$"):
        load_config(small)
    with pytest.raises(ConfigError) as flagged:
        load_config([*small, "--actor_num_mini_batch", "9"])
    assert str(flagged.value).endswith("recurrent chunks per iteration")


def test_mappo_and_ippo_share_parameters_by_default():
    """Swimmer 2x1 has no task file: the per-algorithm defaults show."""
    bare = ["--scenario", "Swimmer", "--agent_conf", "2x1"]
    assert [load_config([*bare, "--algo", a]).share_param for a in ("happo", "hatrpo", "mappo", "ippo")] == \
        [False, False, True, True]
    assert load_config([*bare, "--algo", "mappo", "--no-share_param"]).share_param is False


def test_hatrpo_defaults_to_no_entropy_bonus_unless_a_file_or_flag_sets_one():
    """The PPO family's entropy default (0.01) is not HATRPO's (the paper's objective has none).
    Swimmer 2x1 has no task file, so the defaults show."""
    bare = ["--scenario", "Swimmer", "--agent_conf", "2x1"]
    assert load_config(bare + ["--algo", "happo"]).entropy_coef == 0.01
    assert load_config(bare + ["--algo", "hatrpo"]).entropy_coef == 0.0
    assert load_config(bare + ["--algo", "hatrpo", "--entropy_coef", "0.02"]).entropy_coef == 0.02
    # Real SMAC's files (loading them needs the game) say 0.01 in common, for the PPO family.
    for path in sorted((CONFIG_DIR / "smac").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["hatrpo"]["entropy_coef"] == 0.0, path.name


def test_booleans_and_dashed_aliases():
    assert load_config([]).use_valuenorm is True
    assert load_config(["--no-use_valuenorm"]).use_valuenorm is False
    assert load_config(["--no-use-valuenorm"]).use_valuenorm is False
    assert load_config(["--no-use_valuenorm", "--use_valuenorm"]).use_valuenorm is True  # last one wins
    config = load_config(["--num-env-steps", "12345", "--n-rollout-threads", "3", "--hidden-sizes", "8,4"])
    assert (config.num_env_steps, config.n_rollout_threads, config.hidden_sizes) == (12345, 3, [8, 4])
    # List flags take space- or comma-separated values; a non-integer names the flag.
    assert load_config(["--hidden_sizes", "8", "4", "--seed", "2"]).hidden_sizes == [8, 4]
    assert load_config(["--hidden_sizes", "8,", "4"]).hidden_sizes == [8, 4]
    with pytest.raises(ConfigError, match="hidden_sizes expects"):
        load_config(["--hidden_sizes", "8", "x"])
    assert load_config(["--num_env_steps", "1e4"]).num_env_steps == 10_000


@pytest.mark.parametrize("task_file", sorted(p.name for p in (CONFIG_DIR / "mamujoco").glob("*.yaml")))
@pytest.mark.parametrize("algo", ["happo", "hatrpo", "mappo", "ippo"])
def test_every_shipped_task_config_loads(task_file, algo):
    scenario, conf = Path(task_file).stem.split("-")
    config = load_config(["--scenario", scenario, "--agent_conf", conf.replace("_", "|"), "--algo", algo])
    assert config.algo == algo and config.scenario == scenario


def test_the_value_clip_is_its_own_flag_and_clip_params_while_unset(tmp_path):
    """--value_clip_param clips the critic's values; while no flag or file sets it, the value
    clip is --clip_param, as every run before the flag had it (old task files and saved
    config.yaml files hold clip_param only)."""
    bare = ["--scenario", "Swimmer", "--agent_conf", "2x1"]  # no task file
    assert load_config(bare).value_clip_param is None and load_config(bare).value_clip == 0.2
    assert load_config([*bare, "--clip_param", "0.1"]).value_clip == 0.1
    split = load_config([*bare, "--clip_param", "0.1", "--value_clip_param", "0.3"])
    assert (split.clip_param, split.value_clip) == (0.1, 0.3)
    user = write(tmp_path / "user.yaml", "common:\n  value_clip_param: 0.4\n")
    assert load_config([*bare, "--config", str(user), "--clip_param", "0.1"]).value_clip == 0.4
    old = {k: v for k, v in Config(clip_param=0.15).to_dict().items() if k != "value_clip_param"}
    assert config_from_dict(old, "old config.yaml").value_clip == 0.15
    with pytest.raises(ConfigError, match="--value_clip_param must be > 0"):
        load_config([*bare, "--value_clip_param", "0"])
    # HATRPO's task files set clip_param for the value clip alone: it still is.
    for path in sorted(CONFIG_DIR.glob("*/*.yaml")):
        section = yaml.safe_load(path.read_text()).get("hatrpo") or {}
        if "clip_param" in section and "value_clip_param" not in section and path.parent.name == "mamujoco":
            scenario, conf = path.stem.split("-")
            config = load_config(["--scenario", scenario, "--agent_conf", conf.replace("_", "|"), "--algo", "hatrpo"])
            assert config.value_clip == section["clip_param"], path


def test_value_loss_clips_by_the_value_clip():
    import torch

    from envs.base import AgentSpec, EnvSpec

    spec = EnvSpec("x", (AgentSpec(3, "continuous", 2),) * 2, state_dim=4, episode_limit=10)
    old, new, target = torch.zeros(1, 1), torch.ones(1, 1), torch.full((1, 1), 3.0)
    mask = torch.ones(1, 1, dtype=torch.bool)

    def loss(**settings):
        config = Config(hidden_sizes=[8], use_huber_loss=False, **settings)
        return float(registry.make_algorithm(config, spec, torch.device("cpu")).value_loss(new, old, target, mask))
    # max(unclipped 0.5 * 2^2, clipped 0.5 * (3 - clip)^2)
    assert loss(clip_param=0.5) == pytest.approx(0.5 * 2.5 ** 2)
    assert loss(clip_param=0.5, value_clip_param=0.1) == pytest.approx(0.5 * 2.9 ** 2)
    assert loss(clip_param=0.9, value_clip_param=0.5) == pytest.approx(0.5 * 2.5 ** 2)


# -- against an existing run -------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny finished happo run, started with a dashed alias, a YAML override and a --no-x flag."""
    pytest.importorskip("gymnasium_robotics")
    results = tmp_path_factory.mktemp("results")
    rc = main([*TINY, "--results_dir", str(results), "--algo", "happo", "--num-env-steps", "100",
               "--ppo_epoch", "3", "--no-use_valuenorm"])
    assert rc == 0
    return results / "mamujoco" / "HalfCheetah-2x3" / "happo" / "default" / "seed-1"


@pytest.mark.slow
def test_flags_end_up_in_the_runs_config(finished_run):
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    task = yaml.safe_load((CONFIG_DIR / "mamujoco" / "HalfCheetah-2x3.yaml").read_text())
    assert saved["ppo_epoch"] == 3 != task["happo"]["ppo_epoch"]  # the flag beat the task YAML
    assert saved["clip_param"] == task["happo"]["clip_param"]  # untouched YAML values stay
    assert saved["use_valuenorm"] is False
    assert saved["num_env_steps"] == 100
    assert (finished_run / "metrics.csv").read_text().splitlines()[-1].startswith("100,")


@pytest.mark.slow
def test_new_run_into_an_existing_run_dir_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    rc, out, err = run_main(capsys, [*TINY, "--results_dir", str(finished_run.parents[4]), "--algo", "happo",
                                     "--num_env_steps", "200"])
    assert_usage_error(rc, err, str(finished_run), "--resume")
    assert snapshot(finished_run) == before  # old metrics.csv, checkpoint, config untouched


@pytest.mark.slow
def test_resume_cannot_change_what_the_run_computes(finished_run, capsys):
    before = snapshot(finished_run)
    rc, out, err = run_main(capsys, ["--resume", str(finished_run), "--lr", "0.1", "--num_env_steps", "200"])
    assert_usage_error(rc, err, "--lr", "resum")
    assert snapshot(finished_run) == before


@pytest.mark.slow
def test_resume_cannot_change_the_env_workers(finished_run, capsys):
    """The checkpoint holds the environments' state split over the run's workers (resuming
    with another count raised KeyError in set_state, both ways)."""
    before = snapshot(finished_run)
    rc, out, err = run_main(capsys, ["--resume", str(finished_run), "--n_env_workers", "2",
                                     "--num_env_steps", "200"])
    assert_usage_error(rc, err, "--n_env_workers cannot change when resuming (the run used 1)")
    assert snapshot(finished_run) == before


@pytest.mark.slow
def test_a_run_another_process_trains_is_refused(finished_run, tmp_path, capsys):
    """Two processes on one run directory (a --resume while it still trains, a sweep re-run
    beside an orphaned run) would interleave metrics.csv rows and overwrite checkpoints."""
    from train.train import lock_run_dir

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    held: list[int] = []
    lock_run_dir(run, held)  # as the training process holds it (another open file: a conflict)
    before = snapshot(run)
    try:
        rc, out, err = run_main(capsys, ["--resume", str(run), "--num_env_steps", "200"])
    finally:
        os.close(held.pop())
    assert_usage_error(rc, err, str(run), "in use by another training process")
    assert snapshot(run) == before
    rc, out, err = run_main(capsys, ["--resume", str(run), "--num_env_steps", "200"])
    assert rc == 0, err  # released with its holder


@pytest.mark.slow
def test_a_run_saved_before_value_clip_param_resumes_with_clip_param_as_its_value_clip(finished_run, tmp_path,
                                                                                     capsys):
    from train.train import resume_config
    from utils.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    checkpoint = load_checkpoint(run)
    del checkpoint["config"]["value_clip_param"]  # as saved before the flag existed
    save_checkpoint(run, checkpoint)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["value_clip_param"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    config, _ = resume_config({"resume": str(run), "num_env_steps": 200})
    assert config.value_clip_param is None and config.value_clip == saved["clip_param"]
    rc, out, err = run_main(capsys, ["--resume", str(run), "--num_env_steps", "200"])
    assert rc == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["value_clip_param"] is None


@pytest.mark.slow
def test_resume_keeps_the_runs_results_dir(finished_run, tmp_path, capsys):
    """--results_dir does not move a resumed run: a warning says so, and config.yaml keeps the
    directory the run was made in (it used to record the ignored one)."""
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    made_in = yaml.safe_load((run / "config.yaml").read_text())["results_dir"]
    elsewhere = tmp_path / "elsewhere"
    rc, out, err = run_main(capsys, ["--resume", str(run), "--num_env_steps", "200", "--results_dir", str(elsewhere)])
    assert rc == 0, err
    assert "warning: --results_dir has no effect with --resume" in err and str(run) in err
    assert yaml.safe_load((run / "config.yaml").read_text())["results_dir"] == made_in
    assert not elsewhere.exists()


def test_resume_with_garbage_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    garbage = os.urandom(333) + b"\x00not a checkpoint"
    (run / "checkpoints" / "last.pt").write_bytes(garbage)
    (run / "metrics.csv").write_text("env_steps\n100\n")
    before = snapshot(run)
    rc, out, err = run_main(capsys, ["--resume", str(run), "--num_env_steps", "200"])
    assert_usage_error(rc, err, "--resume", str(run / "checkpoints" / "last.pt"))
    assert snapshot(run) == before and (run / "checkpoints" / "last.pt").read_bytes() == garbage


@pytest.mark.slow
def test_resume_with_truncated_checkpoint(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    (run / "checkpoints").mkdir(parents=True)
    data = (finished_run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 2])
    rc, out, err = run_main(capsys, ["--resume", str(run)])
    assert_usage_error(rc, err, "--resume", "corrupt")
    assert (run / "checkpoints" / "last.pt").read_bytes() == data[: len(data) // 2]


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text("env_steps\n")
    rc, out, err = run_main(capsys, ["--resume", str(tmp_path)])
    assert_usage_error(rc, err, "--resume", "no checkpoint")


@pytest.mark.slow
def test_garbage_checkpoint_real_process(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"\x80\x04garbage" * 10)
    proc = subprocess.run([sys.executable, "-m", "train.train", "--resume", str(tmp_path)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert_usage_error(proc.returncode, proc.stderr, "--resume")
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == b"\x80\x04garbage" * 10


@pytest.mark.slow
def test_launch_scripts_take_paths_from_the_callers_directory(tmp_path):
    """``bash scripts/train_*.sh`` from another directory: a relative --results_dir lands
    there (not in the repository), and the missing-StarCraft error is one line, status 2."""
    env = {k: v for k, v in os.environ.items() if k != "SC2PATH"}
    env["SC2PATH"] = str(tmp_path / "no-starcraft")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_mujoco.sh"), *SMALL, "--results_dir", "rel",
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [summary] = list((tmp_path / "rel").rglob("summary.json"))
    # The scripts' env is only a default (HARL_DEFAULT_ENV): --eval_only and --resume use the
    # run's own, whichever script launches them (an --env flag would be refused there).
    for script in ("train_mujoco.sh", "train_smac.sh"):
        for flags in (["--eval_only", "--model_dir", "rel/" + str(summary.parent.relative_to(tmp_path / "rel")),
                       "--eval_episodes", "1", "--n_eval_rollout_threads", "1"],
                      ["--resume", str(summary.parent)]):
            proc = subprocess.run(["bash", str(REPO / "scripts" / script), *flags], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (script, flags, proc.stderr)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_smac.sh"), "--env", "smac", "--map_name", "3s5z"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert_usage_error(proc.returncode, proc.stderr, "install_sc2.sh", "--env smax")
    # A --config file's env beats the script's default env (train_smac.sh: smax), as a
    # run's own config.yaml must: the script used to add --env smax, which trained SMAX 3m.
    (tmp_path / "smac_run.yaml").write_text("env: smac\nmap_name: 3m\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_smac.sh"), "--config", "smac_run.yaml",
                           *SMALL, "--results_dir", "rel2", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert_usage_error(proc.returncode, proc.stderr, "install_sc2.sh", "--env smax")


def test_the_launch_scripts_env_is_a_default_below_config_files_and_flags(monkeypatch, tmp_path):
    from train.config import DEFAULT_ENV_VARIABLE

    smax_file = tmp_path / "smax.yaml"
    smax_file.write_text("env: smax\nmap_name: 2s3z\n")
    lr_file = tmp_path / "lr.yaml"
    lr_file.write_text("lr: 0.001\n")
    monkeypatch.setenv(DEFAULT_ENV_VARIABLE, "mamujoco")  # scripts/train_mujoco.sh
    config = load_config(["--config", str(smax_file)])
    assert (config.env, config.map_name) == ("smax", "2s3z")
    monkeypatch.setenv(DEFAULT_ENV_VARIABLE, "smax")  # scripts/train_smac.sh
    assert (load_config([]).env, load_config([]).map_name) == ("smax", "3m")
    assert (load_config(["--config", str(lr_file)]).env, load_config(["--config", str(lr_file)]).lr) == ("smax", 0.001)
    assert load_config(["--env", "mamujoco"]).env == "mamujoco"
    monkeypatch.delenv(DEFAULT_ENV_VARIABLE)
    assert load_config([]).env == "mamujoco"


@pytest.mark.slow
def test_a_file_system_without_directory_locks_still_trains(tmp_path, capsys, monkeypatch):
    """Some network file systems refuse flock on a directory (ENOLCK): the run goes on
    without the lock rather than being taken for one another process trains."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    rc, out, err = run_main(capsys, [*TINY, "--num_env_steps", "100", "--results_dir", str(tmp_path / "r")])
    assert rc == 0, err
