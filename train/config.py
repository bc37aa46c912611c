"""One typed configuration for every run: defaults < task YAML < --config file < flags.

Every field below is a command-line flag (``--name`` and ``--name-with-dashes``);
booleans are ``--x/--no-x``. Task files live in ``configs/<env>/<task>.yaml`` and hold a
``common:`` section plus one section per algorithm; unknown keys are errors, never
silently dropped.

The comment after each field (continued on comment lines right below it) is that flag's
description in ``--help``, read from this source (``field_docs``); the ``# --- name ---``
headers group the flags there.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import io
import math
import os
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from utils.errors import STOP_SIGNALS, ConfigError  # noqa: F401  (re-exported)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
ALGORITHMS = ("happo", "hatrpo", "mappo", "ippo")
ACTIVATIONS = ("relu", "tanh")
OBS_MODES = ("local", "global")


@dataclass
class Config:
    # --- experiment -------------------------------------------------------------------
    algo: str = "happo"  # algorithm to train
    env: str = "mamujoco"  # environment family
    exp_name: str = "default"  # free label, part of the run directory
    seed: int = 1  # seeds torch, numpy and the environments; the run directory ends in seed-<n>
    results_dir: str = "results"  # runs go to <results_dir>/<env>/<task>/<algo>/<exp_name>/seed-<n>/
    config: str = ""  # extra YAML file (common:/<algo>: sections or flat keys)
    device: str = "auto"  # torch device; auto = cuda when available, else cpu
    torch_threads: int = 0  # 0 = auto: this run's share of the cores among this project's runs
    # on the machine, re-read every iteration, 1..4; a run alone at start-up takes at most the
    # cores other programs left idle (utils/device.py)
    compile: bool = True  # torch.compile the PPO-family actors' mini-batch loss (feed-forward
    # policies; ~1.4x faster actor updates on CPU, docs/performance.md). Costs ~10 s of compiling
    # in the first update (~2 s once inductor's on-disk cache is warm) and needs a C++ compiler
    # on the CPU (triton on CUDA); when compiling fails the run warns once and goes on without
    resume: str = ""  # run directory to continue from its last checkpoint
    eval_only: bool = False  # evaluate --model_dir and exit, no training
    model_dir: str = ""  # run directory or checkpoint file for --eval_only
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "harl-lite"  # Weights & Biases project, with --wandb
    tensorboard: bool = True  # also write TensorBoard events to <run dir>/tb
    max_env_restarts: int = 0  # restarts of a failed environment copy per run (each redoes its update)
    progress: bool = True  # progress line (steps, sps, ETA, return) on stdout every --log_interval

    # --- environment --------------------------------------------------------------------
    scenario: str = "HalfCheetah"  # MaMuJoCo body, e.g. HalfCheetah, Ant, Walker2d
    agent_conf: str = "2x3"  # MaMuJoCo agent partition, e.g. 2x3, 6x1, 9|8
    agent_obsk: int = 0  # MaMuJoCo, --obs_mode local: observe joints up to k hops away
    obs_mode: str = "local"  # MaMuJoCo: local = each agent sees its own joints (and --agent_obsk
    # hops); global = each agent sees the simulator's full observation plus a one-hot agent id,
    # the setting of the published HAPPO / HATRPO curves (docs/results.md)
    obs_standardise: bool = False  # MaMuJoCo, --obs_mode global: standardise each agent's
    # observation and the critic's state by its own mean and std, as the published code does
    map_name: str = "3m"  # SMAC / SMAX map
    num_env_steps: int = 10_000_000  # training budget: env steps summed over the rollout envs
    n_rollout_threads: int = 20  # environment copies per rollout, stepped together as one batch
    # (SMAX: one jit(vmap) call; MaMuJoCo: a loop, or split over --n_env_workers processes)
    n_env_workers: int = 1  # processes the rollout envs are split over (1 = in-process)
    env_worker_timeout: float = 300.0  # seconds an env worker may take to answer; one that takes
    # longer counts as hung: killed, then handled like a crashed one (--max_env_restarts); 0 = forever
    episode_length: int = 200  # rollout length T per iteration
    use_eval: bool = True  # evaluate the greedy policy every --eval_interval iterations and at the end
    eval_interval: int = 25  # iterations between evaluations
    eval_episodes: int = 10  # episodes per evaluation
    n_eval_rollout_threads: int = 10  # evaluation environments in parallel (at most --eval_episodes)
    log_interval: int = 5  # iterations between metrics rows
    save_interval: int = 25  # iterations between checkpoints

    # --- optimisation -------------------------------------------------------------------
    lr: float = 5e-4  # actor Adam learning rate (unused by HATRPO: its step size is --kl_threshold)
    critic_lr: float = 5e-4  # critic Adam learning rate
    opti_eps: float = 1e-5  # Adam epsilon
    weight_decay: float = 0.0  # Adam L2 weight decay
    use_linear_lr_decay: bool = False  # decay both learning rates linearly over --num_env_steps:
    # update k of K (from 0) uses lr (1 - k/K), as in HARL
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.95  # GAE lambda
    use_proper_time_limits: bool = True  # bootstrap truncated episodes from V(final state)
    ppo_epoch: int = 5  # actor epochs per update (HAPPO / MAPPO / IPPO)
    critic_epoch: int = 5  # critic epochs per update
    actor_num_mini_batch: int = 1  # mini-batches per actor epoch (HAPPO / MAPPO / IPPO)
    critic_num_mini_batch: int = 1  # mini-batches per critic epoch
    clip_param: float = 0.2  # PPO ratio clip; also the value clip of --use_clipped_value_loss
    entropy_coef: float = 0.01  # actor entropy bonus weight
    value_loss_coef: float = 1.0  # critic loss weight
    max_grad_norm: float = 10.0  # gradient norm clip of each Adam step (HATRPO: critics only)
    use_huber_loss: bool = True  # Huber loss on the value error instead of squared error
    huber_delta: float = 10.0  # Huber loss threshold
    use_clipped_value_loss: bool = True  # PPO-style value clipping: max of clipped and unclipped loss
    use_valuenorm: bool = True  # critics learn targets normalised by a running mean/std (ValueNorm)
    use_policy_active_masks: bool = True  # dead agents out of actor loss and entropy
    use_value_active_masks: bool = True  # dead agents out of per-agent critic losses
    fixed_order: bool = False  # ablation: update agents in index order, not shuffled
    share_param: bool = False  # one actor for all agents (HAPPO/HATRPO still step it once per agent)
    parallel_critic: bool = False  # also train the critic on its own thread with 2+ torch threads
    # (with 1 torch thread it always does: 1.25x on the 2-core bench; with 2+ they contend)

    # --- HATRPO -------------------------------------------------------------------------
    kl_threshold: float = 0.01  # trust region: bound delta on the mean KL(old || new) of each step
    ls_step: int = 10  # most backtracking line-search trials per step (none accepted: no step)
    accept_ratio: float = 0.5  # a trial needs improvement > accept_ratio x its linear prediction
    backtrack_coeff: float = 0.8  # line-search trial k tries backtrack_coeff**k of the full step
    cg_iters: int = 10  # most conjugate-gradient iterations solving H x = g for the step direction
    cg_damping: float = 0.1  # damping added to the Fisher matrix: (H + cg_damping I) x = g

    # --- off-policy (HATD3 / HADDPG / MATD3 / MADDPG) -------------------------------------
    buffer_size: int = 1_000_000  # replay buffer capacity in transitions (one per env step)
    batch_size: int = 1000  # transitions per gradient update
    warmup_steps: int = 10_000  # env steps of uniformly random actions before learning starts
    train_interval: int = 50  # vector env steps between training phases (one iteration)
    update_per_train: float = 1.0  # gradient updates per vector env step of each training phase
    polyak: float = 0.005  # target networks move this fraction towards the online ones per update
    n_step: int = 10  # n-step TD returns; a time-limit cut bootstraps, a termination does not
    expl_noise: float = 0.1  # std of the Gaussian exploration noise, as a fraction of the action range
    policy_noise: float = 0.2  # TD3 target-policy smoothing noise std (fraction of the action range)
    noise_clip: float = 0.5  # TD3 target-policy noise clip (fraction of the action range)
    policy_freq: int = 2  # TD3: actor and target updates every policy_freq critic updates

    # --- networks -----------------------------------------------------------------------
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 128, 128])  # actor and critic MLP widths
    activation: str = "relu"  # hidden-layer activation
    use_feature_normalization: bool = True  # LayerNorm on the network input
    gain: float = 0.01  # orthogonal init gain of the actor's output layer (action mean or logits)
    std_x_coef: float = 1.0  # Gaussian std = sigmoid(log_std / x) * y, log_std starting at x
    std_y_coef: float = 0.5  # y in --std_x_coef's formula: the largest std of a continuous action
    use_recurrent_policy: bool = False  # GRU actor and critic
    recurrent_n: int = 1  # GRU layers, with --use_recurrent_policy
    data_chunk_length: int = 10  # length of the GRU's training sequences, with --use_recurrent_policy

    # ---------------------------------------------------------------------------------
    @property
    def compiles_actor_loss(self) -> bool:
        """Whether ``--compile`` applies: the PPO family's feed-forward actors."""
        return self.compile and self.algo != "hatrpo" and not self.use_recurrent_policy

    def validate(self) -> "Config":
        if self.algo not in ALGORITHMS:
            raise ConfigError(f"--algo must be one of {', '.join(ALGORITHMS)}; got {self.algo!r}")
        for name in ("num_env_steps", "n_rollout_threads", "episode_length", "ppo_epoch",
                     "critic_epoch", "actor_num_mini_batch", "critic_num_mini_batch",
                     "eval_episodes", "n_eval_rollout_threads", "log_interval", "save_interval",
                     "eval_interval", "n_env_workers", "data_chunk_length", "cg_iters", "ls_step",
                     "recurrent_n"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"--{name} must be a positive integer; got {value}")
        for name in FIELDS:  # NaN and inf pass every comparison below the wrong way
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{name} must be a finite number; got {value}")
        for name in ("lr", "critic_lr", "gamma", "kl_threshold", "backtrack_coeff", "huber_delta",
                     "clip_param", "max_grad_norm", "std_x_coef", "std_y_coef"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0; got {getattr(self, name)}")
        for name in ("entropy_coef", "value_loss_coef", "cg_damping", "weight_decay", "accept_ratio",
                     "opti_eps", "gain", "max_env_restarts", "agent_obsk", "torch_threads",
                     "env_worker_timeout"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if not self.backtrack_coeff < 1:
            raise ConfigError(f"--backtrack_coeff must be in (0, 1): trial k tries backtrack_coeff**k "
                              f"of the full step; got {self.backtrack_coeff}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"--gamma must be in (0, 1]; got {self.gamma}")
        if not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"--gae_lambda must be in [0, 1]; got {self.gae_lambda}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32 - 1]; got {self.seed}")
        if not self.exp_name or self.exp_name in (".", "..") or "/" in self.exp_name or "\\" in self.exp_name:
            raise ConfigError(f"--exp_name must be a non-empty name without '/' (one directory level); "
                              f"got {self.exp_name!r}")
        if not self.hidden_sizes or min(self.hidden_sizes) <= 0:
            raise ConfigError(f"--hidden_sizes must be positive integers; got {self.hidden_sizes}")
        if self.obs_mode not in OBS_MODES:
            raise ConfigError(f"--obs_mode must be local or global; got {self.obs_mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"--activation must be relu or tanh; got {self.activation!r}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N]; got {self.device!r}")
        per_iteration = self.n_rollout_threads * self.episode_length
        if self.num_env_steps < per_iteration:
            raise ConfigError(f"--num_env_steps ({self.num_env_steps}) is less than one iteration: "
                              f"--n_rollout_threads x --episode_length = {per_iteration} env steps")
        if self.n_rollout_threads % self.n_env_workers:
            raise ConfigError(f"--n_rollout_threads ({self.n_rollout_threads}) must be divisible "
                              f"by --n_env_workers ({self.n_env_workers})")
        if self.use_recurrent_policy:
            if self.episode_length % self.data_chunk_length:
                raise ConfigError(f"--episode_length ({self.episode_length}) must be divisible by "
                                  f"--data_chunk_length ({self.data_chunk_length}) with a recurrent policy")
            n_chunks = self.n_rollout_threads * self.episode_length // self.data_chunk_length
            for name in ("actor_num_mini_batch", "critic_num_mini_batch"):
                if getattr(self, name) > n_chunks:
                    raise ConfigError(f"--{name} ({getattr(self, name)}) exceeds the {n_chunks} "
                                      "recurrent chunks per iteration")
        else:
            batch = self.n_rollout_threads * self.episode_length
            for name in ("actor_num_mini_batch", "critic_num_mini_batch"):
                if getattr(self, name) > batch:
                    raise ConfigError(f"--{name} ({getattr(self, name)}) exceeds the batch of "
                                      f"{batch} samples")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Defaults that differ by --algo, below the task file and the flags. HATRPO's objective in
# the paper has no entropy term; the PPO family's reference default is 0.01.
# MAPPO and IPPO are the shared-parameter baselines (one actor for all agents, as in Yu et
# al. 2022); --no-share_param gives one actor per agent, which unequal agents need.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {"hatrpo": {"entropy_coef": 0.0},
                                                 "mappo": {"share_param": True},
                                                 "ippo": {"share_param": True}}

_FIELD_TYPES = get_type_hints(Config)
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Fields that describe where a run lives or how it is driven, not what it computes: they
# may differ when a run is resumed (--config, --model_dir and --eval_only are refused there).
# Not --n_env_workers: a checkpoint holds the environments' state split over its workers.
RUNTIME_FIELDS = ("resume", "results_dir", "device", "torch_threads",
                  "progress", "wandb", "tensorboard", "max_env_restarts", "env_worker_timeout",
                  "num_env_steps", "parallel_critic", "compile")


def _coerce_int(value: Any) -> int:
    """An integer from YAML or the command line ("1e6" too); ValueError for 64.7 or true."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    if isinstance(value, str) and "e" in value.lower():
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError
        return int(as_float)
    return int(value)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a one-line ConfigError."""
    kind = _FIELD_TYPES[name]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind is int:
            return _coerce_int(value)
        if kind is float:
            if isinstance(value, bool):  # YAML's true is not 1.0
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if kind == list[int]:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce_int(v) for v in value]
    except (TypeError, ValueError):
        pass
    type_name = "a list of integers (e.g. 64,64)" if kind == list[int] else getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{source}: {name} expects {type_name}; got {value!r}")


def _apply(values: dict[str, Any], mapping: dict[str, Any], source: str) -> None:
    for key, value in mapping.items():
        if key not in FIELDS:
            close = [f for f in FIELDS if f.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        values[key] = _coerce(key, value, source)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def _sections(data: dict[str, Any], algo: str, path: Path) -> dict[str, Any]:
    """Flatten a task file: ``common:`` then the ``<algo>:`` section. Flat keys are allowed."""
    merged: dict[str, Any] = {}
    for key, value in data.items():
        if key in ALGORITHMS or key == "common":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: section {key!r} must be a mapping")
            _apply({}, value, f"{path} [{key}]")  # every section is checked, not just --algo's
        elif key not in FIELDS:
            _apply({}, {key: value}, str(path))  # raises with a hint
        else:
            merged[key] = value
    merged.update(data.get("common") or {})
    merged.update(data.get(algo) or {})
    return merged


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as a ConfigError (one line, exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            token = message[len(prefix):].split()[0]
            if token.lower() in ("true", "false", "yes", "no", "0", "1"):
                message += " (booleans take no value: --x or --no-x)"
            elif token.startswith("--"):
                known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
                close = difflib.get_close_matches(token.partition("=")[0], known, n=1, cutoff=0.75)
                if close:
                    message += f" (did you mean {close[0]}?)"
        raise ConfigError(message)


_SECTION = re.compile(r"#\s*---+\s*(.*?)\s*-*\s*$")  # "# --- name ----": a section; no name ends it


def field_docs(cls: type | None = None) -> dict[str, tuple[str, str]]:
    """``name -> (section, description)`` for each field of ``cls`` (default Config), read
    from the class source: a field's trailing ``# comment``, joined with any comment-only
    lines right below it, under the last ``# --- section ---`` header. The comments are the
    only copy of the descriptions; ``--help`` shows them."""
    return dict(_field_docs(Config if cls is None else cls))


@functools.lru_cache(maxsize=None)
def _field_docs(cls: type) -> tuple[tuple[str, tuple[str, str]], ...]:
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source to read: flags without descriptions
        return ()
    docs: dict[str, list[str]] = {}
    sections: dict[str, str] = {}
    section, current, last, last_row = "", None, None, 0
    depth, brackets, line_start = 0, 0, True  # depth 1: the class body
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for k, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.lstrip().startswith("#"):  # a comment on a line of its own
                header = _SECTION.match(tok.string)
                if header:
                    section, last = header.group(1), None
                elif last is not None and tok.start[0] == last_row + 1:
                    docs[last].append(text)  # the description goes on
                    last_row = tok.start[0]
                else:
                    last = None
            elif current is not None and current not in docs:
                docs[current], last, last_row = [text], current, tok.start[0]
            continue
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            depth += {tokenize.INDENT: 1, tokenize.DEDENT: -1}.get(tok.type, 0)
            if tok.type == tokenize.NEWLINE:
                current = None
            line_start = brackets == 0
            continue
        if (line_start and depth == 1 and tok.type == tokenize.NAME and tok.string in names
                and tokens[k + 1].string == ":"):
            current = tok.string
            sections[current] = section
        if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
            brackets += 1
        elif tok.type == tokenize.OP and tok.string in (")", "]", "}"):
            brackets -= 1
        line_start = False
    return tuple((name, (sections.get(name, ""), " ".join(t for t in docs.get(name, []) if t)))
                 for name in names)


def _choices() -> dict[str, tuple[str, ...]]:
    from envs.registry import FAMILIES  # names only: the family modules load on first use

    return {"algo": ALGORITHMS, "env": tuple(FAMILIES), "activation": ACTIVATIONS, "obs_mode": OBS_MODES,
            "device": ("auto", "cpu", "cuda[:N]")}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def flag_help(name: str, docs: dict[str, tuple[str, str]], choices: dict[str, tuple[str, ...]]) -> str:
    """``--help`` text of one flag: its description, choices and default(s)."""
    default = FIELDS[name].default
    if default is dataclasses.MISSING:
        default = FIELDS[name].default_factory()
    shown = f"default: {_show(default)}"
    overrides: dict[str, list[str]] = {}
    for algo, values in ALGORITHM_DEFAULTS.items():
        if name in values:
            overrides.setdefault(_show(values[name]), []).append(algo)
    shown += "".join(f"; {', '.join(algos)}: {value}" for value, algos in overrides.items())
    if name in choices:
        shown = f"{' | '.join(choices[name])}; {shown}"
    text = f"{docs[name][1]} ({shown})" if docs.get(name, ("", ""))[1] else f"({shown})"
    return text.replace("%", "%%")  # argparse expands %(...)s in help strings


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written; each flag's aliases listed once with one metavar."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=8)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, action.dest.upper())}"


_DESCRIPTION = """\
Train HAPPO / HATRPO / MAPPO / IPPO on one task.

Settings resolve as: built-in defaults < per-algorithm defaults < configs/<env>/<task>.yaml
< --config file < flags. The defaults shown are the built-in ones (with the per-algorithm
ones where they differ); the task file, when there is one, overrides them."""

_EPILOG = """\
sweep (train/sweep.py; a comma list in --algo, --seed or a task flag (--scenario,
--agent_conf, --agent_obsk, --map_name) makes one run per combination):
  --seeds 1,2,3            one run per seed (instead of --seed)
  --max_parallel N         at most N runs at a time (default: the number of CPU cores;
                           on a Ray cluster given by --ray_address, no limit)
  --ray_address ADDRESS    run them as Ray tasks: auto | local | <host:port>"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m train.train",
        usage="%(prog)s [-h] [--flag VALUE ...] [--switch | --no-switch ...]",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    docs, choices = field_docs(), _choices()
    groups: dict[str, Any] = {}
    for name, f in FIELDS.items():
        section = docs.get(name, ("", ""))[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(section) if section else parser
        group = groups[section]
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kind = _FIELD_TYPES[name]
        text = flag_help(name, docs, choices)
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=text)
        elif kind == list[int]:  # "--hidden_sizes 64 64" and "--hidden_sizes 64,64" alike
            group.add_argument(*flags, dest=name, nargs="+", metavar="N", help=text)
        else:
            metavar = {int: "INT", float: "FLOAT"}.get(kind, name.upper())
            group.add_argument(*flags, dest=name, type=str, metavar=metavar, help=text)
    return parser


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """Parse command-line flags into a dict of the flags actually given."""
    flags = vars(build_parser().parse_args(argv))
    # A list flag's words are joined back into the one string ``_coerce`` splits.
    return {k: " ".join(v) if isinstance(v, list) else v for k, v in flags.items()}


def task_config_path(values: dict[str, Any]) -> Path:
    from envs.registry import task_name  # local import: keeps config free of env imports

    return CONFIG_DIR / values["env"] / f"{task_name(values)}.yaml"


# What a command line does with a run rather than how the run trains: a YAML file cannot set
# them (a run's config.yaml holds them at their defaults, so it can be passed as --config).
# eval_only / model_dir in a file are an error (the file asks for something else than training);
# config / resume are ignored with a warning (config.yaml files written before 244de2d hold
# the --config file and the resumed directory they came from).
COMMAND_FIELDS = ("config", "resume", "model_dir", "eval_only")
IGNORED_IN_FILES = ("config", "resume")


def _file_settings(path: Path, algo: str | None) -> dict[str, Any]:
    """A YAML file's settings (flat keys, ``common:``, then the ``<algo>:`` section), coerced.
    ``algo``: the --algo flag; without one the file's own flat / common ``algo`` picks the
    section, else the default."""
    data = read_yaml(path)
    if algo is None:
        algo = str(_sections(data, "", path).get("algo", Config.algo))
    section = data.get(algo)
    if isinstance(section, dict) and str(section.get("algo", algo)) != algo:
        raise ConfigError(f"{path}: section {algo!r} sets algo {section['algo']!r}")
    values: dict[str, Any] = {}
    _apply(values, _sections(data, algo, path), str(path))
    values["algo"] = algo  # the flag, if any, over a flat / common algo: flags win
    for key in COMMAND_FIELDS:
        if key in values and values[key] != FIELDS[key].default:
            if key not in IGNORED_IN_FILES:
                raise ConfigError(f"{path}: {key} can only be given on the command line (--{key})")
            print(f"warning: {path}: {key} {values[key]!r} ignored: only the command line sets "
                  f"--{key}", file=sys.stderr, flush=True)
        values.pop(key, None)
    return values


# The launch scripts (scripts/train_mujoco.sh, scripts/train_smac.sh) set this to their env
# family: the env of a command whose flags and --config file name none. As an environment
# variable rather than an --env flag, it does not override a --config file's env.
DEFAULT_ENV_VARIABLE = "HARL_DEFAULT_ENV"


def base_defaults() -> Config:
    """``Config()`` with the launch script's env, if any (``DEFAULT_ENV_VARIABLE``)."""
    env = os.environ.get(DEFAULT_ENV_VARIABLE, "").strip()
    return dataclasses.replace(Config(), env=env) if env else Config()


def load_config(argv: list[str], warn_unused: bool = True) -> Config:
    """Resolve the full configuration for a command line, validating everything.

    Precedence: defaults (with the launch script's env, ``base_defaults``) < per-algorithm
    defaults < task file < --config file < flags. The
    task (env, task flags) and the algorithm that pick the task file and the sections come
    from the flags and the --config file together. ``warn_unused``: a warning line on stderr
    for each flag this configuration does not read (``unused_flags``); a sweep warns once
    across its runs instead."""
    flags = parse_flags(argv)
    values: dict[str, Any] = {}
    _apply(values, flags, "command line")
    defaults = base_defaults()
    from envs.registry import check_task, check_task_flags, task_name  # env families and their task names

    extra: dict[str, Any] = {}
    if values.get("config"):
        extra_path = Path(values["config"])
        extra = _file_settings(extra_path, values.get("algo"))
    probe = {**defaults.to_dict(), **extra, **values}
    check_task(probe)
    check_task_flags(probe["env"], values)
    if extra:
        try:  # another family's task keys at non-default values: the file is for another env
            check_task_flags(probe["env"], [k for k, v in extra.items() if v != getattr(defaults, k)])
        except ConfigError as exc:
            raise ConfigError(f"{extra_path}: {exc}") from None
    resolved: dict[str, Any] = dict(ALGORITHM_DEFAULTS.get(probe["algo"], {}))
    source = {key: f"the {probe['algo']} default" for key in resolved}  # where a value came from
    task_file = task_config_path(probe)
    if task_file.exists():
        section = _file_settings(task_file, probe["algo"])
        if (section.get("env", probe["env"]) != probe["env"]
                or task_name({**probe, **section}) != task_name(probe)):
            raise ConfigError(f"{task_file} names another task than {probe['env']} {task_name(probe)}, "
                              "whose file it is")
        resolved.update(section)
        source.update({key: str(task_file) for key in section})
    resolved.update(extra)
    source.update({key: values.get("config", "") for key in extra})
    resolved.update(values)  # flags win
    for key in values:
        source.pop(key, None)
    config = dataclasses.replace(defaults, **resolved)
    try:
        config.validate()
    except ConfigError as exc:  # name the file when the offending value is not a flag
        named = re.match(r"--(\w+)", str(exc))
        if named and named.group(1) in source:
            raise ConfigError(f"{exc} ({named.group(1)} is set in {source[named.group(1)]})") from None
        raise
    for name, why in (unused_flags(config, values) if warn_unused else {}).items():
        print(f"warning: --{name} has no effect here: {why}", file=sys.stderr, flush=True)
    return config


def unused_flags(config: Config, given: Any) -> dict[str, str]:
    """Among the flag names ``given``, those ``config`` does not read, with the reason. They
    are a warning, not an error, so that one set of flags can serve several algorithms;
    config files set them silently (a ``common:`` section serves every algorithm)."""
    ppo = config.algo != "hatrpo"
    reasons = {
        **({name: f"only --algo hatrpo reads it (--algo {config.algo} takes clipped PPO steps)"
            for name in ("kl_threshold", "ls_step", "accept_ratio", "backtrack_coeff", "cg_iters",
                         "cg_damping")} if ppo else {}),
        **({name: "HATRPO's actor takes one natural-gradient step per update, sized by "
                  "--kl_threshold (--lr, --ppo_epoch and --actor_num_mini_batch are the PPO family's)"
            for name in ("lr", "ppo_epoch", "actor_num_mini_batch")} if not ppo else {}),
        **({name: "it applies with --use_recurrent_policy"
            for name in ("recurrent_n", "data_chunk_length")} if not config.use_recurrent_policy else {}),
        **({"wandb_project": "it applies with --wandb"} if not config.wandb else {}),
        **({"obs_standardise": "it applies with --obs_mode global"} if config.obs_mode != "global" else
           {"agent_obsk": "every agent sees the full observation with --obs_mode global"}),
        **({"huber_delta": "it applies with --use_huber_loss"} if not config.use_huber_loss else {}),
        **({name: "it applies with --use_eval" for name in ("eval_interval", "eval_episodes",
                                                            "n_eval_rollout_threads")}
           if not config.use_eval else {}),
        **({"clip_param": "--algo hatrpo reads it only as the value clip of --use_clipped_value_loss"}
           if not ppo and not config.use_clipped_value_loss else {}),
        **({} if not config.compile else  # --no-compile: nothing compiles, as asked
           {"compile": "it compiles the PPO family's actor loss; HATRPO's Fisher-vector products "
                       "need double backward, which compiled graphs do not give"} if not ppo else
           {"compile": "it compiles feed-forward actors only (the GRU's loop over steps is not)"}
           if config.use_recurrent_policy else {}),
    }
    return {name: reasons[name] for name in given if name in reasons}


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    values: dict[str, Any] = {}
    _apply(values, data, source)
    return dataclasses.replace(Config(), **values)


def save_config(config: Config, path: Path) -> None:
    from utils.checkpoint import atomic_write_bytes

    # COMMAND_FIELDS at their defaults: the file holds how the run trains, and passed as
    # --config it starts the same training.
    saved = dataclasses.replace(config, **{k: FIELDS[k].default for k in COMMAND_FIELDS})
    text = yaml.safe_dump(saved.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode())

