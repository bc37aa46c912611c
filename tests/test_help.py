"""``python -m train.train --help``: every flag with its description (the field's ``Option``
in train/config.py), in full, its default and, where there is a fixed set, its choices;
flags grouped by the sections of ``Config``; the sweep flags named in the epilog."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from algorithms import registry
from envs.registry import FAMILIES
from train.config import FIELDS, OPTIONS, SWEEP_FLAGS, Config, build_parser, parse_command_line, parse_flags
from train.train import main
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECTIONS = {"experiment": "seed", "environment": "num_env_steps", "optimisation": "gamma",
            "HATRPO": "kl_threshold", "networks": "hidden_sizes",
            "off-policy (HATD3 / HADDPG / MATD3 / MADDPG)": "polyak"}
# Fields that once had no description, so --help showed nothing but the flag for them.
ONCE_UNDESCRIBED = ("seed", "results_dir", "wandb_project", "tensorboard", "num_env_steps", "use_eval",
                    "eval_episodes", "n_eval_rollout_threads", "lr", "critic_lr", "opti_eps",
                    "weight_decay", "use_linear_lr_decay", "gamma", "gae_lambda", "ppo_epoch",
                    "critic_epoch", "actor_num_mini_batch", "critic_num_mini_batch", "clip_param",
                    "value_loss_coef", "max_grad_norm", "use_huber_loss", "huber_delta",
                    "use_clipped_value_loss", "use_valuenorm", "kl_threshold", "ls_step", "accept_ratio",
                    "backtrack_coeff", "cg_iters", "cg_damping", "hidden_sizes", "std_y_coef",
                    "recurrent_n", "data_chunk_length")


@pytest.fixture(scope="module")
def help_text() -> str:
    return build_parser().format_help()


def blocks(text: str) -> dict[str, tuple[str, str]]:
    """``--name`` -> (its help, its group heading), read from the formatted help."""
    out: dict[str, tuple[str, str]] = {}
    heading, name = "", None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            heading, name = line[:-1], None
        elif re.match(r"  --\w", line):
            name = line.split()[0].rstrip(",")
            out[name] = ("", heading)
        elif name and line.startswith("        "):
            out[name] = ((out[name][0] + " " + line.strip()).strip(), heading)  # lines joined by a space
        else:
            name = None
    return out


def squash(text: str) -> str:
    """Without whitespace: argparse wraps lines (also after hyphens)."""
    return "".join(text.split())


def shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return '""' if value == "" else str(value)


def test_every_flag_has_its_full_description_and_its_default(help_text):
    """The whole description, as the field's metadata holds it, then the default: the
    comment scraper this replaced cut --compile's description mid-sentence."""
    found = blocks(help_text)
    defaults = Config()
    for name, opt in OPTIONS.items():
        assert f"--{name}" in found, name
        text = found[f"--{name}"][0]
        assert squash(text).startswith(squash(opt.help) + "("), (name, text)
        default = opt.shown_default or shown(getattr(defaults, name))
        assert re.search(rf"\((\S+ \| )*[^()]*default: {re.escape(default)}[;)]", text), (name, text)
    assert found["--compile"][0].startswith("torch.compile") and "goes on without it (default: true)" in \
        " ".join(found["--compile"][0].split())


@pytest.mark.parametrize("name", ONCE_UNDESCRIBED)
def test_once_undescribed_fields_now_have_a_description(name):
    assert len(OPTIONS[name].help.split()) >= 2, name


def test_defaults_lists_and_per_algorithm_defaults(help_text):
    found = blocks(help_text)
    assert "(default: 0.99)" in found["--gamma"][0]
    assert "default: 128,128,128" in found["--hidden_sizes"][0]
    assert "default: 10000000" in found["--num_env_steps"][0]
    assert 'default: ""' in found["--resume"][0]
    assert "default: true" in found["--use_valuenorm"][0]
    for cls in registry.algorithm_classes():
        for name, value in cls.defaults.items():
            if value == FIELDS[name].default:
                continue
            assert re.search(rf"; ([a-z0-9]+, )*{cls.name}(, [a-z0-9]+)*: {re.escape(shown(value))}[;)]",
                             found[f"--{name}"][0]), (cls.name, name, found[f"--{name}"][0])
    assert "hatrpo: 0.0" in found["--entropy_coef"][0]
    assert "mappo, ippo: true" in found["--share_param"][0]
    assert "default: --clip_param's value" in found["--value_clip_param"][0]


def test_choices(help_text):
    found = blocks(help_text)
    assert " | ".join(registry.NAMES) in found["--algo"][0]
    assert " | ".join(FAMILIES) in found["--env"][0] and "mamujoco" in found["--env"][0]
    assert "relu | tanh" in found["--activation"][0]
    assert "auto | cpu | cuda[:N]" in found["--device"][0]


def test_flags_grouped_by_section(help_text):
    found = blocks(help_text)
    for section, example in SECTIONS.items():
        assert f"\n{section}:\n" in help_text, section
        assert found[f"--{example}"][1] == section, example
    for name, opt in OPTIONS.items():
        assert found[f"--{name}"][1] == opt.section in SECTIONS, name


def test_aliases_and_booleans_listed(help_text):
    assert "--num_env_steps, --num-env-steps INT" in help_text
    assert "--use_valuenorm, --no-use_valuenorm, --use-valuenorm, --no-use-valuenorm" in help_text
    assert "--hidden_sizes, --hidden-sizes N [N ...]" in help_text


def test_description_and_sweep_flags(help_text):
    flat = " ".join(help_text.split())
    assert "configs/<env>/<task>.yaml" in flat and "per-algorithm defaults" in flat
    assert "a comma list in --scenario, --agent_conf, --agent_obsk, --obs_mode, --map_name, --algo, --seed" in flat
    for name, (_, text) in SWEEP_FLAGS.items():
        line = next(line for line in help_text.splitlines() if line.strip().startswith(f"--{name} "))
        assert len(line.split()) > 3, line  # the flag, a value and a description
        assert squash(text) in squash(help_text), name
        assert blocks(help_text)[f"--{name}"][1] not in SECTIONS  # in the epilog, not a run's flag


def test_parsing():
    assert parse_flags([]) == {}
    assert parse_flags(["--gamma", "0.9", "--no-use-valuenorm", "--hidden-sizes", "64", "64", "--num_env_steps",
                        "1e6", "--seed=3"]) == {
        "gamma": 0.9, "use_valuenorm": False, "hidden_sizes": [64, 64], "num_env_steps": 1_000_000, "seed": 3}
    with pytest.raises(ConfigError, match="did you mean --num_env_steps"):
        parse_flags(["--num_env_step", "5"])
    command = parse_command_line(["--seeds", "3,1,3", "--algo", "hatrpo,happo", "--map-name", "3m",
                                  "--max_parallel", "2"])
    assert command.is_sweep and command.flags == {"map_name": "3m"} and command.sweep_flags == {"max_parallel": "2"}
    assert list(command.axes.items()) == [("algo", ["hatrpo", "happo"]), ("seed", [3, 1])]  # outermost first
    assert not parse_command_line(["--seed", "1"]).is_sweep
    with pytest.raises(ConfigError, match="seed expects int; got 'x'"):
        parse_command_line(["--seed", "1,x"])
    with pytest.raises(ConfigError, match="not both"):
        parse_command_line(["--seed", "1", "--seeds", "2,3"])


def test_main_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m train.train")
    assert "discount factor" in out


@pytest.mark.slow
def test_help_subprocess():
    proc = subprocess.run([sys.executable, "-m", "train.train", "--help"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m train.train"), proc.stdout[:200]
    assert proc.stderr == ""
    for name in FIELDS:
        assert f"--{name}" in proc.stdout, name


@pytest.mark.slow
def test_parsing_imports_no_torch_and_help_no_environment():
    """A bad flag is reported without importing torch; --help imports the algorithm classes
    (their own defaults) but no environment family."""
    code = ("import sys\n"
            "from train.config import build_parser, parse_command_line\n"
            "from utils.errors import ConfigError\n"
            "def loaded(): return sorted(m for m in sys.modules if m.startswith(('envs.mamujoco', 'envs.smax', "
            "'envs.smac', 'jax', 'torch', 'gymnasium')))\n"
            "parse_command_line(['--algo', 'hatrpo', '--seeds', '1,2', '--hidden_sizes', '8', '8'])\n"
            "try: parse_command_line(['--lr', 'x'])\n"
            "except ConfigError: pass\n"
            "print(loaded())\n"
            "build_parser().format_help()\n"
            "print([m for m in loaded() if not m.startswith('torch')])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"], proc.stdout


def test_every_field_declares_its_role():
    """Help and section for every field; the sweep axes, runtime, machine and command-only
    fields as the command line, --resume and sweeps use them; every per-algorithm field read
    by some algorithm, and every name an algorithm reads a field."""
    assert all(opt.help and opt.section for opt in OPTIONS.values())
    axes = sorted((name for name, opt in OPTIONS.items() if opt.sweep_axis), key=lambda n: OPTIONS[n].sweep_axis)
    assert axes == ["scenario", "agent_conf", "agent_obsk", "obs_mode", "map_name", "algo", "seed"]
    assert {name for name, opt in OPTIONS.items() if opt.command_only} == {"config", "resume", "model_dir", "eval_only"}
    assert {name for name, opt in OPTIONS.items() if opt.runtime} >= {"num_env_steps", "device", "compile"}
    assert not OPTIONS["n_env_workers"].runtime  # a checkpoint holds the envs split over the workers
    assert {"device", "torch_threads", "n_env_workers"} <= {name for name, opt in OPTIONS.items() if opt.machine}
    for name, opt in OPTIONS.items():
        assert not opt.per_algorithm or registry.readers(name), name
    for cls in registry.algorithm_classes():
        assert cls.reads <= FIELDS.keys() and cls.defaults.keys() <= FIELDS.keys(), cls.name


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_mujoco.sh", "train_smac.sh", "plot.sh"])
def test_launch_scripts_ignore_an_exported_cdpath(script, tmp_path):
    """With CDPATH exported, `cd <relative dir>` prints the directory, which the scripts'
    $(cd ... && pwd) captured twice: every launch script failed before running anything."""
    proc = subprocess.run(["bash", f"scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, CDPATH=f".:{tmp_path}"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout, proc.stdout[:300]
