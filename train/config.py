"""One typed configuration for every run: defaults < per-algorithm defaults < task YAML
< --config file < flags.

Every ``Config`` field is a command-line flag (``--name`` and ``--name-with-dashes``;
booleans ``--x/--no-x``; lists ``--x 64 64`` or ``--x 64,64``; integers also as ``1e6``).
Each field says what it is in its metadata (``option``): its ``--help`` text and section,
its bounds, and its role (a runtime setting, a sweep axis, a machine setting, read by one
algorithm only, ...). Task files live in ``configs/<env>/<task>.yaml`` and hold a
``common:`` section plus one section per algorithm; unknown keys are errors, never
silently dropped.

The command line is parsed once (``parse_command_line``) into the flags given, plus the
sweep axes when it describes a sweep (train/sweep.py); ``resolve`` layers those flags over
the files into one validated ``Config``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, get_type_hints

import yaml

from algorithms import registry as algorithms
from envs import registry as envs
from utils.checkpoint import atomic_write_bytes
from utils.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


@dataclass(frozen=True)
class Option:
    """What a ``Config`` field is, beyond its type and default (``dataclasses.field`` metadata)."""

    help: str  # its --help text
    section: str  # its group in --help
    runtime: bool = False  # how the run is driven, not what it computes: may change on --resume
    machine: bool = False  # suits the machine rather than the experiment (devices, threads, processes)
    sweep_axis: int = 0  # > 0: a comma list of values makes a sweep; axes nest outermost first
    # Read by the algorithms that list it in ``reads`` (algorithms/registry.py) only; the
    # other fields every run reads.
    per_algorithm: bool = False
    command_only: bool = False  # says what the command does, not how a run trains: no file sets it
    ignored_in_files: bool = False  # command_only, but a file holding it gets a warning, not an error
    positive: bool = False  # must be > 0
    minimum: float | None = None  # must be >= minimum
    choices: Collection[str] = ()  # the values allowed
    applies_with: tuple[str, Any] | None = None  # (field, value): read only while that field has that value
    shown_default: str | None = None  # --help's default when the field's own default says nothing


def option(default: Any, help: str, **role: Any) -> Any:
    """A ``Config`` field with its ``Option`` (see there for ``role``'s keys)."""
    metadata = {"option": Option(help=help, **role)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=functools.partial(list, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_experiment = functools.partial(option, section="experiment")
_environment = functools.partial(option, section="environment")
_optimisation = functools.partial(option, section="optimisation", per_algorithm=True)
_hatrpo = functools.partial(option, section="HATRPO", per_algorithm=True)
_off_policy = functools.partial(option, section="off-policy (HATD3 / HADDPG / MATD3 / MADDPG)",
                                per_algorithm=True)
_networks = functools.partial(option, section="networks", per_algorithm=True)


@dataclass
class Config:
    # experiment
    algo: str = _experiment("happo", "algorithm to train", sweep_axis=2, choices=algorithms.NAMES)
    # The registry's live view: a family registered while running (tests/faulty_env.py) counts.
    env: str = _experiment("mamujoco", "environment family", choices=envs.FAMILIES.keys())
    exp_name: str = _experiment("default", "free label, part of the run directory")
    seed: int = _experiment(1, "seeds torch, numpy and the environments; the run directory ends in seed-<n>",
                            sweep_axis=3)
    results_dir: str = _experiment(
        "results", "runs go to <results_dir>/<env>/<task>/<algo>/<exp_name>/seed-<n>/", runtime=True)
    config: str = _experiment("", "extra YAML file (common:/<algo>: sections or flat keys)",
                              command_only=True, ignored_in_files=True)
    device: str = _experiment("auto", "torch device: auto | cpu | cuda[:N]; auto = cuda when available, else cpu",
                              runtime=True, machine=True)
    torch_threads: int = _experiment(
        0, "0 = auto: this run's share of the cores among this project's runs on the machine, re-read "
           "every iteration, 1..4; a run alone at start-up takes at most the cores other programs left "
           "idle (utils/device.py)", runtime=True, machine=True, minimum=0)
    compile: bool = _experiment(
        True, "torch.compile the actor's mini-batch loss where the algorithm allows it (HAPPO, MAPPO, IPPO "
              "with feed-forward policies; ~1.4x faster actor updates on CPU, docs/performance.md). Costs "
              "~10 s of compiling in the first update (~2 s once inductor's on-disk cache is warm) and needs "
              "a C++ compiler on the CPU (triton on CUDA); when compiling fails the run warns once and goes "
              "on without it", runtime=True, machine=True)
    resume: str = _experiment("", "run directory to continue from its last checkpoint", runtime=True,
                              command_only=True, ignored_in_files=True)
    eval_only: bool = _experiment(False, "evaluate --model_dir and exit, no training", command_only=True)
    model_dir: str = _experiment("", "run directory or checkpoint file for --eval_only", command_only=True)
    wandb: bool = _experiment(False, "also log to Weights & Biases (WANDB_MODE=offline works)", runtime=True)
    wandb_project: str = _experiment("harl-lite", "Weights & Biases project, with --wandb",
                                     applies_with=("wandb", True))
    tensorboard: bool = _experiment(True, "also write TensorBoard events to <run dir>/tb", runtime=True)
    max_env_restarts: int = _experiment(
        0, "restarts of a failed environment copy per run (each redoes its update)", runtime=True, minimum=0)
    progress: bool = _experiment(
        True, "progress line (steps, sps, ETA, return) on stdout every --log_interval", runtime=True)

    # environment
    scenario: str = _environment("HalfCheetah", "MaMuJoCo body, e.g. HalfCheetah, Ant, Walker2d", sweep_axis=1)
    agent_conf: str = _environment("2x3", "MaMuJoCo agent partition, e.g. 2x3, 6x1, 9|8", sweep_axis=1)
    agent_obsk: int = _environment(0, "MaMuJoCo, --obs_mode local: observe joints up to k hops away",
                                   sweep_axis=1, minimum=0, applies_with=("obs_mode", "local"))
    obs_mode: str = _environment(
        "local", "MaMuJoCo: local = each agent sees its own joints (and --agent_obsk hops); global = each "
                 "agent sees the simulator's full observation plus a one-hot agent id, the setting of the "
                 "published HAPPO / HATRPO curves (docs/results.md)", sweep_axis=1, choices=("local", "global"))
    obs_standardise: bool = _environment(
        False, "MaMuJoCo, --obs_mode global: standardise each agent's observation and the critic's state by "
               "its own mean and std, as the published code does", applies_with=("obs_mode", "global"))
    batched_step: bool = _environment(
        True, "MaMuJoCo: step the copies of a HalfCheetah, Walker2d, Ant or Humanoid (v5 bodies) with one "
              "batched computation of gymnasium's observation, reward and termination (envs/mujoco_step.py: "
              "the same values, 1.2-1.6x faster stepping); --no-batched_step calls gymnasium's step per copy",
        runtime=True, applies_with=("env", "mamujoco"))
    map_name: str = _environment("3m", "SMAC / SMAX map", sweep_axis=1)
    num_env_steps: int = _environment(10_000_000, "training budget: env steps summed over the rollout envs",
                                      runtime=True, positive=True)
    n_rollout_threads: int = _environment(
        20, "environment copies per rollout, stepped together as one batch (SMAX: one jit(vmap) call; "
            "MaMuJoCo: a loop, or split over --n_env_workers processes)", positive=True)
    n_env_workers: int = _environment(
        1, "processes the rollout envs are split over (1 = in-process); fixed for a run: its checkpoint "
           "holds the environments' state split over them", machine=True, positive=True)
    env_worker_timeout: float = _environment(
        300.0, "seconds an env worker may take to answer; one that takes longer counts as hung: killed, "
               "then handled like a crashed one (--max_env_restarts); 0 = forever",
        runtime=True, machine=True, minimum=0)
    episode_length: int = _environment(200, "rollout length T per iteration", positive=True)
    use_eval: bool = _environment(
        True, "evaluate the greedy policy every --eval_interval iterations and at the end")
    eval_interval: int = _environment(25, "iterations between evaluations", positive=True,
                                      applies_with=("use_eval", True))
    eval_episodes: int = _environment(10, "episodes per evaluation", positive=True,
                                      applies_with=("use_eval", True))
    n_eval_rollout_threads: int = _environment(
        10, "evaluation environments in parallel (at most --eval_episodes)", positive=True,
        applies_with=("use_eval", True))
    log_interval: int = _environment(5, "iterations between metrics rows", positive=True)
    save_interval: int = _environment(25, "iterations between checkpoints", positive=True)

    # optimisation
    lr: float = _optimisation(5e-4, "actor Adam learning rate (HATRPO's step size is --kl_threshold)",
                              positive=True)
    critic_lr: float = _optimisation(5e-4, "critic Adam learning rate", positive=True)
    opti_eps: float = _optimisation(1e-5, "Adam epsilon", minimum=0)
    weight_decay: float = _optimisation(0.0, "Adam L2 weight decay", minimum=0)
    use_linear_lr_decay: bool = _optimisation(
        False, "decay both learning rates linearly over --num_env_steps: update k of K (from 0) uses "
               "lr (1 - k/K), as in HARL")
    lr_decay_floor: float = _optimisation(
        0.0, "with --use_linear_lr_decay, the fraction of both learning rates the decay ends at: update k "
             "of K uses lr (f + (1 - f)(1 - k/K)); 0 = HARL's decay to 0", minimum=0,
        applies_with=("use_linear_lr_decay", True))
    gamma: float = _optimisation(0.99, "discount factor", positive=True)
    gae_lambda: float = _optimisation(0.95, "GAE lambda")
    use_proper_time_limits: bool = _optimisation(True, "bootstrap truncated episodes from V(final state)")
    ppo_epoch: int = _optimisation(5, "actor epochs per update (HAPPO / MAPPO / IPPO)", positive=True)
    critic_epoch: int = _optimisation(5, "critic epochs per update", positive=True)
    actor_num_mini_batch: int = _optimisation(1, "mini-batches per actor epoch (HAPPO / MAPPO / IPPO)",
                                              positive=True)
    critic_num_mini_batch: int = _optimisation(1, "mini-batches per critic epoch", positive=True)
    clip_param: float = _optimisation(
        0.2, "PPO ratio clip: the policy ratio is clipped to [1 - clip_param, 1 + clip_param]", positive=True)
    value_clip_param: float | None = _optimisation(
        None, "value clip of --use_clipped_value_loss: a new value counts as at most this far from the "
              "rollout's; unset in every file and flag, it is --clip_param's value (as every run before "
              "this flag had it)", positive=True,
        applies_with=("use_clipped_value_loss", True), shown_default="--clip_param's value")
    entropy_coef: float = _optimisation(0.01, "actor entropy bonus weight", minimum=0)
    value_loss_coef: float = _optimisation(1.0, "critic loss weight", minimum=0)
    max_grad_norm: float = _optimisation(10.0, "gradient norm clip of each Adam step (HATRPO: critics only)",
                                         positive=True)
    use_huber_loss: bool = _optimisation(True, "Huber loss on the value error instead of squared error")
    huber_delta: float = _optimisation(10.0, "Huber loss threshold", positive=True,
                                       applies_with=("use_huber_loss", True))
    use_clipped_value_loss: bool = _optimisation(
        True, "PPO-style value clipping: max of clipped and unclipped loss (clip: --value_clip_param)")
    use_valuenorm: bool = _optimisation(
        True, "critics learn targets normalised by a running mean/std (ValueNorm)")
    use_policy_active_masks: bool = _optimisation(True, "dead agents out of actor loss and entropy")
    use_value_active_masks: bool = _optimisation(True, "dead agents out of per-agent critic losses")
    fixed_order: bool = _optimisation(False, "ablation: update agents in index order, not shuffled")
    share_param: bool = _optimisation(
        False, "one actor for all agents (HAPPO/HATRPO still step it once per agent)")
    parallel_critic: bool = _optimisation(
        False, "also train the critic on its own thread with 2+ torch threads (with 1 torch thread it "
               "always does: 1.25x on the 2-core bench; with 2+ they contend)", runtime=True, machine=True)

    # HATRPO
    kl_threshold: float = _hatrpo(0.01, "trust region: bound delta on the mean KL(old || new) of each step",
                                  positive=True)
    ls_step: int = _hatrpo(10, "most backtracking line-search trials per step (none accepted: no step)",
                           positive=True)
    accept_ratio: float = _hatrpo(0.5, "a trial needs improvement > accept_ratio x its linear prediction",
                                  minimum=0)
    backtrack_coeff: float = _hatrpo(0.8, "line-search trial k tries backtrack_coeff**k of the full step; "
                                          "in (0, 1)", positive=True)
    cg_iters: int = _hatrpo(10, "most conjugate-gradient iterations solving H x = g for the step direction",
                            positive=True)
    cg_damping: float = _hatrpo(0.1, "damping added to the Fisher matrix: (H + cg_damping I) x = g", minimum=0)

    # off-policy (HATD3 / HADDPG / MATD3 / MADDPG)
    buffer_size: int = _off_policy(1_000_000, "replay buffer capacity in transitions (one per env step)",
                                   positive=True)
    batch_size: int = _off_policy(1000, "transitions per gradient update", positive=True)
    warmup_steps: int = _off_policy(10_000, "env steps of uniformly random actions before learning starts",
                                    minimum=0)
    train_interval: int = _off_policy(50, "vector env steps between training phases (one iteration)",
                                      positive=True)
    update_per_train: float = _off_policy(1.0, "gradient updates per vector env step of each training phase",
                                          positive=True)
    polyak: float = _off_policy(0.005, "target networks move this fraction towards the online ones per "
                                       "update; in (0, 1]", positive=True)
    n_step: int = _off_policy(10, "n-step TD returns; a time-limit cut bootstraps, a termination does not",
                              positive=True)
    expl_noise: float = _off_policy(0.1, "std of the Gaussian exploration noise, as a fraction of half the "
                                         "action range (MaMuJoCo's is [-1, 1]: half of it is 1)", minimum=0)
    policy_noise: float = _off_policy(0.2, "TD3 target-policy smoothing noise std (fraction of half the "
                                           "action range)", minimum=0)
    noise_clip: float = _off_policy(0.5, "TD3 target-policy noise clip (fraction of half the action range)",
                                    minimum=0)
    policy_freq: int = _off_policy(2, "TD3: actor and target updates every policy_freq critic updates",
                                   positive=True)
    preact_penalty: float = _off_policy(0.0, "weight of the mean squared pre-tanh activation in each actor's "
                                             "loss (0: none, as the reference); keeps actions from saturating "
                                             "for good", minimum=0)

    # networks
    hidden_sizes: list[int] = _networks([128, 128, 128], "actor and critic MLP widths")
    activation: str = _networks("relu", "hidden-layer activation", choices=("relu", "tanh"))
    use_feature_normalization: bool = _networks(True, "LayerNorm on the network input")
    gain: float = _networks(0.01, "orthogonal init gain of the actor's output layer (action mean or logits)",
                            minimum=0)
    std_x_coef: float = _networks(1.0, "Gaussian std = sigmoid(log_std / x) * y, log_std starting at x",
                                  positive=True)
    std_y_coef: float = _networks(0.5, "y in --std_x_coef's formula: the largest std of a continuous action",
                                  positive=True)
    use_recurrent_policy: bool = _networks(False, "GRU actor and critic")
    recurrent_n: int = _networks(1, "GRU layers, with --use_recurrent_policy", positive=True,
                                 applies_with=("use_recurrent_policy", True))
    data_chunk_length: int = _networks(10, "length of the GRU's training sequences, with --use_recurrent_policy",
                                       positive=True, applies_with=("use_recurrent_policy", True))

    @property
    def compiles_actor_loss(self) -> bool:
        """Whether ``--compile`` applies: an algorithm whose actor loss compiles, feed-forward actors."""
        return (self.compile and not self.use_recurrent_policy
                and algorithms.algorithm_class(self.algo).compiles_actor_loss)

    @property
    def off_policy(self) -> bool:
        """Whether ``--algo`` is of the off-policy family (algorithms/registry.py)."""
        return algorithms.FAMILY_OF[self.algo] == "off-policy"

    @property
    def steps_per_iteration(self) -> int:
        """Env steps of one iteration: a rollout of --episode_length vector steps (on-policy),
        or --train_interval vector steps before their updates (off-policy)."""
        return self.n_rollout_threads * (self.train_interval if self.off_policy else self.episode_length)

    @property
    def value_clip(self) -> float:
        """The value clip of ``--use_clipped_value_loss``: ``value_clip_param``, or while that
        is unset, ``clip_param`` (the one clip of the runs saved before value_clip_param existed)."""
        return self.clip_param if self.value_clip_param is None else self.value_clip_param

    def validate(self) -> "Config":
        algorithms.check_name(self.algo)
        for name, opt in OPTIONS.items():
            value = getattr(self, name)
            if opt.choices and value not in opt.choices:
                raise ConfigError(f"--{name} must be one of {', '.join(opt.choices)}; got {value!r}")
            if value is None or isinstance(value, (bool, str, list)):
                continue
            if isinstance(value, float) and not math.isfinite(value):  # NaN passes every bound below
                raise ConfigError(f"--{name} must be a finite number; got {value}")
            if opt.positive and not value > 0:
                kind = "a positive integer" if isinstance(value, int) else "> 0"
                raise ConfigError(f"--{name} must be {kind}; got {value}")
            if opt.minimum is not None and not value >= opt.minimum:
                raise ConfigError(f"--{name} must be >= {opt.minimum:g}; got {value}")
        if not self.backtrack_coeff < 1:
            raise ConfigError(f"--backtrack_coeff must be in (0, 1): trial k tries backtrack_coeff**k "
                              f"of the full step; got {self.backtrack_coeff}")
        for name in ("gamma", "polyak"):
            if not getattr(self, name) <= 1:
                raise ConfigError(f"--{name} must be in (0, 1]; got {getattr(self, name)}")
        if not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"--gae_lambda must be in [0, 1]; got {self.gae_lambda}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32 - 1]; got {self.seed}")
        if not self.exp_name or self.exp_name in (".", "..") or "/" in self.exp_name or "\\" in self.exp_name:
            raise ConfigError(f"--exp_name must be a non-empty name without '/' (one directory level); "
                              f"got {self.exp_name!r}")
        if not self.hidden_sizes or min(self.hidden_sizes) <= 0:
            raise ConfigError(f"--hidden_sizes must be positive integers; got {self.hidden_sizes}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N]; got {self.device!r}")
        per_iteration = self.n_rollout_threads * self.episode_length  # one on-policy batch
        if self.num_env_steps < self.steps_per_iteration:
            length = "--train_interval" if self.off_policy else "--episode_length"
            raise ConfigError(f"--num_env_steps ({self.num_env_steps}) is less than one iteration: "
                              f"--n_rollout_threads x {length} = {self.steps_per_iteration} env steps")
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
            for name in ("actor_num_mini_batch", "critic_num_mini_batch"):
                if getattr(self, name) > per_iteration:
                    raise ConfigError(f"--{name} ({getattr(self, name)}) exceeds the batch of "
                                      f"{per_iteration} samples")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
OPTIONS: dict[str, Option] = {name: f.metadata["option"] for name, f in FIELDS.items()}
_FIELD_TYPES = get_type_hints(Config)


def default_of(name: str) -> Any:
    field = FIELDS[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def fields_where(role: str) -> tuple[str, ...]:
    """The fields whose ``Option`` has ``role`` set (e.g. "runtime", "machine", "sweep_axis")."""
    return tuple(name for name, opt in OPTIONS.items() if getattr(opt, role))


# -- values from YAML and the command line -------------------------------------------------------
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
        if kind in (float, float | None):
            if value is None and kind != float:  # YAML null: unset (value_clip_param)
                return None
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
    type_name = {list[int]: "a list of integers (e.g. 64,64)", float | None: "float"}.get(
        kind, getattr(kind, "__name__", str(kind)))
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
        if key in algorithms.NAMES or key == "common":
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


def _file_settings(path: Path, algo: str | None) -> dict[str, Any]:
    """A YAML file's settings (flat keys, ``common:``, then the ``<algo>:`` section), coerced.
    ``algo``: the --algo flag; without one the file's own flat / common ``algo`` picks the
    section, else the default."""
    data = read_yaml(path)
    if algo is None:
        algo = str(_sections(data, "", path).get("algo", default_of("algo")))
    section = data.get(algo)
    if isinstance(section, dict) and str(section.get("algo", algo)) != algo:
        raise ConfigError(f"{path}: section {algo!r} sets algo {section['algo']!r}")
    values: dict[str, Any] = {}
    _apply(values, _sections(data, algo, path), str(path))
    values["algo"] = algo  # the flag, if any, over a flat / common algo: flags win
    for key in fields_where("command_only"):
        if key in values and values[key] != default_of(key):
            if not OPTIONS[key].ignored_in_files:
                raise ConfigError(f"{path}: {key} can only be given on the command line (--{key})")
            # A config.yaml of an older version holds the --config file and the resumed directory.
            print(f"warning: {path}: {key} {values[key]!r} ignored: only the command line sets "
                  f"--{key}", file=sys.stderr, flush=True)
        values.pop(key, None)
    return values


# -- the command line ------------------------------------------------------------------------------
# The sweep's own flags (train/sweep.py), not Config fields: name -> (metavar, help).
SWEEP_FLAGS = {
    "seeds": ("1,2,3", "one run per seed (instead of --seed)"),
    "max_parallel": ("N", "at most N runs at a time (default: the number of CPU cores; on a Ray "
                          "cluster given by --ray_address, no limit)"),
    "ray_address": ("ADDRESS", "run them as Ray tasks: auto | local | <host:port>"),
}


def spellings(name: str) -> list[str]:
    """``--name`` and, for a name with underscores, ``--name-with-dashes``."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


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


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def flag_help(name: str) -> str:
    """``--help`` text of one flag: its description, choices and default(s), with the
    defaults of the algorithms that have their own."""
    opt = OPTIONS[name]
    shown = f"default: {opt.shown_default or _show(default_of(name))}"
    overrides: dict[str, list[str]] = {}
    for cls in algorithms.algorithm_classes():
        if name in cls.defaults and cls.defaults[name] != default_of(name):
            overrides.setdefault(_show(cls.defaults[name]), []).append(cls.name)
    shown += "".join(f"; {', '.join(names)}: {value}" for value, names in overrides.items())
    if opt.choices:
        shown = f"{' | '.join(opt.choices)}; {shown}"
    return f"{opt.help} ({shown})".replace("%", "%%")  # argparse expands %(...)s in help strings


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written; each flag's aliases listed once with one metavar;
    a flag's help written when --help asks for it (it names the algorithms' own defaults,
    whose classes import torch)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=8)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, action.dest.upper())}"

    def _get_help_string(self, action: argparse.Action) -> str:
        return flag_help(action.dest) if action.dest in OPTIONS else super()._get_help_string(action)


_DESCRIPTION = f"""\
Train {' / '.join(name.upper() for name in algorithms.NAMES)} on one task.

Settings resolve as: built-in defaults < per-algorithm defaults < configs/<env>/<task>.yaml
< --config file < flags. The defaults shown are the built-in ones (with the per-algorithm
ones where they differ); the task file, when there is one, overrides them."""


def _epilog() -> str:
    axes = sorted(fields_where("sweep_axis"), key=lambda name: OPTIONS[name].sweep_axis)
    lines = textwrap.wrap(f"sweep (train/sweep.py; a comma list in {', '.join('--' + a for a in axes)} "
                          "makes one run per combination):", 88)
    for name, (metavar, text) in SWEEP_FLAGS.items():
        body = textwrap.wrap(text, 88 - 27)
        lines.append(f"  {f'--{name} {metavar}':<23}  {body[0]}")
        lines += [" " * 27 + line for line in body[1:]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m train.train``: every Config field, grouped by section, and
    the sweep flags (described in the epilog)."""
    parser = _Parser(
        prog="python -m train.train",
        usage="%(prog)s [-h] [--flag VALUE ...] [--switch | --no-switch ...]",
        description=_DESCRIPTION, epilog=_epilog(), formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    groups: dict[str, Any] = {}
    for name, opt in OPTIONS.items():
        if opt.section not in groups:
            groups[opt.section] = parser.add_argument_group(opt.section)
        # help=name: a placeholder, _HelpFormatter writes the text when --help asks for it.
        group, flags, kind = groups[opt.section], spellings(name), _FIELD_TYPES[name]
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=name)
        elif kind == list[int]:  # "--hidden_sizes 64 64" and "--hidden_sizes 64,64" alike
            group.add_argument(*flags, dest=name, nargs="+", metavar="N", help=name)
        else:
            metavar = {int: "INT", float: "FLOAT", float | None: "FLOAT"}.get(kind, name.upper())
            group.add_argument(*flags, dest=name, type=str, metavar=metavar, help=name)
    for name, (metavar, _) in SWEEP_FLAGS.items():
        parser.add_argument(*spellings(name), dest=name, type=str, metavar=metavar, help=argparse.SUPPRESS)
    return parser


@dataclass
class CommandLine:
    """``python -m train.train``'s argv, parsed once."""

    argv: list[str]
    flags: dict[str, Any]  # the Config fields given, typed (a sweep axis is in ``axes`` instead)
    axes: dict[str, list[Any]]  # sweep axes: field -> its values, outermost axis first
    sweep_flags: dict[str, str]  # the sweep's own flags given (max_parallel, ray_address)

    @property
    def is_sweep(self) -> bool:
        return bool(self.axes or self.sweep_flags)


def comma_list(name: str, value: str) -> list[str]:
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise ConfigError(f"--{name}: empty item in the list {value!r}")
    return list(dict.fromkeys(items))  # drop repeats, keep order


def parse_command_line(argv: list[str]) -> CommandLine:
    """Parse ``argv`` (ConfigError for a bad flag or value; ``--help`` prints and exits)."""
    given = vars(build_parser().parse_args(argv))
    sweep_flags = {name: given.pop(name) for name in SWEEP_FLAGS if name in given}
    raw_axes: dict[str, str] = {}
    if "seeds" in sweep_flags:
        if "seed" in given:
            raise ConfigError("give --seed or --seeds, not both")
        raw_axes["seed"] = sweep_flags.pop("seeds")
    for name in fields_where("sweep_axis"):
        if isinstance(given.get(name), str) and "," in given[name]:
            raw_axes[name] = given.pop(name)
    axes = {}
    for name in sorted(raw_axes, key=lambda n: OPTIONS[n].sweep_axis):
        axes[name] = [_coerce(name, item, "command line") for item in comma_list(name, raw_axes[name])]
    flags: dict[str, Any] = {}
    # A list flag's words are joined back into the one string ``_coerce`` splits.
    _apply(flags, {k: " ".join(v) if isinstance(v, list) else v for k, v in given.items()}, "command line")
    return CommandLine(list(argv), flags, axes, sweep_flags)


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """The Config fields given in ``argv``, typed (``parse_command_line``'s ``flags``)."""
    return parse_command_line(argv).flags


def flags_to_argv(flags: dict[str, Any]) -> list[str]:
    """Command-line tokens that ``parse_command_line`` reads back as ``flags``."""
    tokens: list[str] = []
    for name, value in flags.items():
        if isinstance(value, bool):
            tokens.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            tokens += [f"--{name}", _show(value) if isinstance(value, list) else str(value)]
    return tokens


# -- resolution ------------------------------------------------------------------------------------
# The launch scripts (scripts/train_mujoco.sh, scripts/train_smac.sh) set this to their env
# family: the env of a command whose flags and --config file name none. As an environment
# variable rather than an --env flag, it does not override a --config file's env.
DEFAULT_ENV_VARIABLE = "HARL_DEFAULT_ENV"


def base_defaults() -> Config:
    """``Config()`` with the launch script's env, if any (``DEFAULT_ENV_VARIABLE``)."""
    env = os.environ.get(DEFAULT_ENV_VARIABLE, "").strip()
    return dataclasses.replace(Config(), env=env) if env else Config()


def task_config_path(values: dict[str, Any]) -> Path:
    return CONFIG_DIR / values["env"] / f"{envs.task_name(values)}.yaml"


def resolve(flags: dict[str, Any], warn_unused: bool = True) -> Config:
    """The full configuration for the flags given (typed, ``parse_command_line``), validated.

    Precedence: defaults (with the launch script's env, ``base_defaults``) < the algorithm's
    defaults < task file < --config file < flags. The task (env, task flags) and the
    algorithm that pick the task file and the sections come from the flags and the --config
    file together. ``warn_unused``: a warning line on stderr for each flag this
    configuration does not read (``unused_flags``); a sweep warns once across its runs."""
    defaults = base_defaults()
    extra: dict[str, Any] = {}
    if flags.get("config"):
        extra_path = Path(flags["config"])
        extra = _file_settings(extra_path, flags.get("algo"))
    probe = {**defaults.to_dict(), **extra, **flags}
    algorithm = algorithms.algorithm_class(probe["algo"])
    envs.check_task(probe)
    envs.check_task_flags(probe["env"], flags)
    if extra:
        try:  # another family's task keys at non-default values: the file is for another env
            envs.check_task_flags(probe["env"], [k for k, v in extra.items() if v != getattr(defaults, k)])
        except ConfigError as exc:
            raise ConfigError(f"{extra_path}: {exc}") from None
    resolved: dict[str, Any] = {}
    _apply(resolved, algorithm.defaults, f"{algorithm.name}'s defaults")
    source = {key: f"the {algorithm.name} default" for key in resolved}  # where a value came from
    task_file = task_config_path(probe)
    if task_file.exists():
        section = _file_settings(task_file, algorithm.name)
        if (section.get("env", probe["env"]) != probe["env"]
                or envs.task_name({**probe, **section}) != envs.task_name(probe)):
            raise ConfigError(f"{task_file} names another task than {probe['env']} {envs.task_name(probe)}, "
                              "whose file it is")
        resolved.update(section)
        source.update({key: str(task_file) for key in section})
    resolved.update(extra)
    source.update({key: flags.get("config", "") for key in extra})
    resolved.update(flags)  # flags win
    for key in flags:
        source.pop(key, None)
    config = dataclasses.replace(defaults, **resolved)
    try:
        config.validate()
    except ConfigError as exc:  # name the file when the offending value is not a flag
        flag = re.match(r"--(\w+)", str(exc))
        named = exc.field or (flag.group(1) if flag else None)
        if named in source:
            raise ConfigError(f"{exc} ({named} is set in {source[named]})") from None
        raise
    for name, why in (unused_flags(config, flags) if warn_unused else {}).items():
        print(f"warning: --{name} has no effect here: {why}", file=sys.stderr, flush=True)
    return config


def load_config(command: list[str] | CommandLine, warn_unused: bool = True) -> Config:
    """``resolve`` of a command line (argv, or one already parsed) that is not a sweep."""
    if not isinstance(command, CommandLine):
        command = parse_command_line(command)
    if command.is_sweep:
        raise ConfigError("one run takes one value per flag; comma lists and --seeds, --max_parallel, "
                          "--ray_address make a sweep (python -m train.train or train.sweep)")
    return resolve(command.flags, warn_unused)


def unused_flags(config: Config, given: Any) -> dict[str, str]:
    """Among the flag names ``given``, those ``config`` does not read, with the reason. They
    are a warning, not an error, so that one set of flags can serve several algorithms;
    config files set them silently (a ``common:`` section serves every algorithm)."""
    reasons = {name: _unread_reason(config, name) for name in given if name in OPTIONS}
    return {name: why for name, why in reasons.items() if why}


def _unread_reason(config: Config, name: str) -> str | None:
    """Why ``config`` does not read field ``name``; None if it does."""
    algorithm = algorithms.algorithm_class(config.algo)
    opt = OPTIONS[name]
    if opt.per_algorithm and name not in algorithm.reads:
        if name == "clip_param" and config.value_clip_param is None \
                and not _unread_reason(config, "value_clip_param"):
            return None  # the value clip while value_clip_param is unset
        readers = algorithms.readers(name)
        why = f"only --algo {', '.join(cls.name for cls in readers)} read{'s' if len(readers) == 1 else ''} it"
        theirs = set().union(*(cls.reads for cls in readers))
        instead = sorted(f for f in algorithm.reads - theirs if OPTIONS[f].per_algorithm)
        if instead:
            why += f" (--algo {algorithm.name} reads {', '.join('--' + f for f in instead)} instead)"
        if name == "clip_param" and "value_clip_param" in algorithm.reads:
            why += "; it is the value clip of --use_clipped_value_loss while --value_clip_param is unset"
        return why
    if opt.applies_with and getattr(config, opt.applies_with[0]) != opt.applies_with[1]:
        field, value = opt.applies_with
        return f"it applies with --{field}" + ("" if value is True else f" {value}")
    if name == "compile" and config.compile and not config.compiles_actor_loss:
        if algorithm.compiles_actor_loss:
            return "it compiles feed-forward actors only (the GRU's loop over steps is not)"
        compiled = ", ".join(cls.name for cls in algorithms.algorithm_classes() if cls.compiles_actor_loss)
        return f"it compiles the PPO family's actor loss (--algo {compiled}), not --algo {algorithm.name}'s"
    return None


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    values: dict[str, Any] = {}
    _apply(values, data, source)
    return dataclasses.replace(Config(), **values)


def save_config(config: Config, path: Path) -> None:
    # Command-only fields at their defaults: the file holds how the run trains, and passed as
    # --config it starts the same training.
    saved = dataclasses.replace(config, **{k: default_of(k) for k in fields_where("command_only")})
    text = yaml.safe_dump(saved.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode())


def run_dir_for(config: Config) -> Path:
    """``<results_dir>/<env>/<task>/<algo>/<exp_name>/seed-<n>``."""
    return (Path(config.results_dir) / config.env / envs.task_name(config.to_dict()) / config.algo
            / config.exp_name / f"seed-{config.seed}")
