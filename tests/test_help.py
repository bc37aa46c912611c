"""``python -m train.train --help``: every flag with its description (the field's comment
in train/config.py), its default and, where there is a fixed set, its choices; flags
grouped by the sections of ``Config``; the sweep flags named in the epilog."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from envs.registry import FAMILIES
from train.config import (ALGORITHM_DEFAULTS, ALGORITHMS, FIELDS, Config, ConfigError, build_parser,
                          field_docs, parse_flags)
from train.train import main

REPO = Path(__file__).resolve().parent.parent
SECTIONS = {"experiment": "seed", "environment": "num_env_steps", "optimisation": "gamma",
            "HATRPO": "kl_threshold", "networks": "hidden_sizes",
            "off-policy (HATD3 / HADDPG / MATD3 / MADDPG)": "polyak"}
# Fields that once had no comment, so --help showed nothing but the flag for them.
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


def test_every_flag_has_a_description_and_its_default(help_text):
    found = blocks(help_text)
    defaults = Config()
    for name in FIELDS:
        assert f"--{name}" in found, name
        text = found[f"--{name}"][0]
        description = re.sub(r"\s*\([^()]*default: [^()]*\)$", "", text)
        assert description and description != text, (name, text)
        assert squash(field_docs()[name][1]) in squash(text), (name, text)
        assert f"default: {shown(getattr(defaults, name))}" in text, (name, text)


@pytest.mark.parametrize("name", ONCE_UNDESCRIBED)
def test_once_undescribed_fields_now_have_a_comment(name):
    assert len(field_docs()[name][1].split()) >= 2, name


def test_defaults_lists_and_per_algorithm_defaults(help_text):
    found = blocks(help_text)
    assert "(default: 0.99)" in found["--gamma"][0]
    assert "default: 128,128,128" in found["--hidden_sizes"][0]
    assert "default: 10000000" in found["--num_env_steps"][0]
    assert 'default: ""' in found["--resume"][0]
    assert "default: true" in found["--use_valuenorm"][0]
    for algo, values in ALGORITHM_DEFAULTS.items():
        for name in values:
            assert f"{algo}" in found[f"--{name}"][0] and "default:" in found[f"--{name}"][0]
    assert "hatrpo: 0.0" in found["--entropy_coef"][0]
    assert "mappo, ippo: true" in found["--share_param"][0]


def test_choices(help_text):
    found = blocks(help_text)
    assert " | ".join(ALGORITHMS) in found["--algo"][0]
    assert " | ".join(FAMILIES) in found["--env"][0] and "mamujoco" in found["--env"][0]
    assert "relu | tanh" in found["--activation"][0]
    assert "auto | cpu | cuda[:N]" in found["--device"][0]


def test_flags_grouped_by_section(help_text):
    found = blocks(help_text)
    for section, example in SECTIONS.items():
        assert f"\n{section}:\n" in help_text, section
        assert found[f"--{example}"][1] == section, example
    for name in FIELDS:
        assert found[f"--{name}"][1] == field_docs()[name][0] in SECTIONS, name


def test_aliases_and_booleans_listed(help_text):
    assert "--num_env_steps, --num-env-steps INT" in help_text
    assert "--use_valuenorm, --no-use_valuenorm, --use-valuenorm, --no-use-valuenorm" in help_text
    assert "--hidden_sizes, --hidden-sizes N [N ...]" in help_text


def test_description_and_sweep_flags(help_text):
    flat = " ".join(help_text.split())
    assert "configs/<env>/<task>.yaml" in flat and "per-algorithm defaults" in flat
    for flag in ("--seeds", "--max_parallel", "--ray_address"):
        line = next(line for line in help_text.splitlines() if line.strip().startswith(flag + " "))
        assert len(line.split()) > 3, line  # the flag, a value and a description
    for flag in ("--seeds", "--max_parallel", "--ray_address"):  # still not this parser's flags
        with pytest.raises(ConfigError):
            build_parser().parse_args([flag, "1"])


def test_parsing_unchanged():
    assert parse_flags([]) == {}
    assert parse_flags(["--gamma", "0.9", "--no-use-valuenorm", "--hidden-sizes", "64", "64"]) == {
        "gamma": "0.9", "use_valuenorm": False, "hidden_sizes": "64 64"}
    with pytest.raises(ConfigError, match="did you mean --num_env_steps"):
        parse_flags(["--num_env_step", "5"])


def test_main_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m train.train")
    assert "discount factor" in out


def test_help_subprocess():
    proc = subprocess.run([sys.executable, "-m", "train.train", "--help"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m train.train"), proc.stdout[:200]
    assert proc.stderr == ""
    for name in FIELDS:
        assert f"--{name}" in proc.stdout, name


def test_help_imports_no_environment():
    code = ("import sys; from train.config import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m.startswith(('envs.mamujoco', 'envs.smax', "
            "'envs.smac', 'jax', 'torch', 'gymnasium'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@dataclass
class _Sample:
    # --- first -----------------------------------------------------------------------
    plain: int = 1  # a plain comment
    hashed: str = "a#b"  # the '#' in the default is no comment
    spread: list[int] = field(default_factory=lambda: [1,
                                                       2])  # after a default over two lines
    continued: bool = False  # starts here
    # and goes on here
    # and here

    # a note after a blank line belongs to nothing
    # --- second ------------------------------------------------------------------------
    bare: float = 0.5
    # a comment after an uncommented field is not its description
    last: str = "x"  # 50%: percent signs too

    # ---------------------------------------------------------------------------------
    def method(self) -> None:
        plain: int = 2  # a local annotation, not a field
        del plain


def test_field_docs_extraction():
    docs = field_docs(_Sample)
    assert docs == {
        "plain": ("first", "a plain comment"),
        "hashed": ("first", "the '#' in the default is no comment"),
        "spread": ("first", "after a default over two lines"),
        "continued": ("first", "starts here and goes on here and here"),
        "bare": ("second", ""),
        "last": ("second", "50%: percent signs too"),
    }
    assert [f.name for f in dataclasses.fields(_Sample)] == list(docs)


@pytest.mark.parametrize("script", ["train_mujoco.sh", "train_smac.sh", "plot.sh"])
def test_launch_scripts_ignore_an_exported_cdpath(script, tmp_path):
    """With CDPATH exported, `cd <relative dir>` prints the directory, which the scripts'
    $(cd ... && pwd) captured twice: every launch script failed before running anything."""
    proc = subprocess.run(["bash", f"scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, CDPATH=f".:{tmp_path}"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout, proc.stdout[:300]
