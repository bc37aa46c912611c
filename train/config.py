"""One typed configuration for every run: defaults < task YAML < --config file < flags.

Every field below is a command-line flag (``--name`` and ``--name-with-dashes``);
booleans are ``--x/--no-x``. Task files live in ``configs/<env>/<task>.yaml`` and hold a
``common:`` section plus one section per algorithm; unknown keys are errors, never
silently dropped.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
ALGORITHMS = ("happo", "hatrpo", "mappo", "ippo")


class ConfigError(ValueError):
    """Bad user input. The message is one line naming the flag or file and what is valid."""


@dataclass
class Config:
    # --- experiment -------------------------------------------------------------------
    algo: str = "happo"  # happo | hatrpo | mappo | ippo
    env: str = "mamujoco"  # environment family: mamujoco | smax | smac
    exp_name: str = "default"  # free label, part of the run directory
    seed: int = 1
    results_dir: str = "results"
    config: str = ""  # extra YAML file (common:/<algo>: sections or flat keys)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 0  # 0 = auto: the cores left free at start-up, 1..4 (utils/device.py)
    resume: str = ""  # run directory to continue from its last checkpoint
    eval_only: bool = False  # evaluate --model_dir and exit, no training
    model_dir: str = ""  # run directory or checkpoint file for --eval_only
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "harl-lite"
    tensorboard: bool = True
    max_env_restarts: int = 0  # restarts allowed for failing environment copies
    progress: bool = True  # live progress line on the console

    # --- environment --------------------------------------------------------------------
    scenario: str = "HalfCheetah"  # MaMuJoCo body
    agent_conf: str = "2x3"  # MaMuJoCo agent partition, e.g. 2x3, 6x1, 9|8
    agent_obsk: int = 0  # MaMuJoCo: observe joints up to k hops away
    map_name: str = "3m"  # SMAC / SMAX map
    num_env_steps: int = 10_000_000
    n_rollout_threads: int = 20  # environments stepped in parallel
    n_env_workers: int = 1  # processes the rollout envs are split over (1 = in-process)
    episode_length: int = 200  # rollout length T per iteration
    use_eval: bool = True
    eval_interval: int = 25  # iterations between evaluations
    eval_episodes: int = 10
    n_eval_rollout_threads: int = 10
    log_interval: int = 5  # iterations between metrics rows
    save_interval: int = 25  # iterations between checkpoints

    # --- optimisation -------------------------------------------------------------------
    lr: float = 5e-4
    critic_lr: float = 5e-4
    opti_eps: float = 1e-5
    weight_decay: float = 0.0
    use_linear_lr_decay: bool = False
    gamma: float = 0.99
    gae_lambda: float = 0.95
    use_proper_time_limits: bool = True  # bootstrap truncated episodes from V(final state)
    ppo_epoch: int = 5
    critic_epoch: int = 5
    actor_num_mini_batch: int = 1
    critic_num_mini_batch: int = 1
    clip_param: float = 0.2
    entropy_coef: float = 0.01  # actor entropy bonus; load_config gives HATRPO 0 (ALGORITHM_DEFAULTS)
    value_loss_coef: float = 1.0
    max_grad_norm: float = 10.0
    use_huber_loss: bool = True
    huber_delta: float = 10.0
    use_clipped_value_loss: bool = True
    use_valuenorm: bool = True
    use_policy_active_masks: bool = True  # dead agents out of actor loss and entropy
    use_value_active_masks: bool = True  # dead agents out of per-agent critic losses
    fixed_order: bool = False  # ablation: update agents in index order, not shuffled
    share_param: bool = False  # one actor for all agents (on by default for MAPPO / IPPO; HAPPO/HATRPO step it once per agent)
    parallel_critic: bool = False  # also train the critic on its own thread with 2+ torch threads
    # (with 1 torch thread it always does: 1.25x on the 2-core bench; with 2+ they contend)

    # --- HATRPO -------------------------------------------------------------------------
    kl_threshold: float = 0.01
    ls_step: int = 10
    accept_ratio: float = 0.5
    backtrack_coeff: float = 0.8
    cg_iters: int = 10
    cg_damping: float = 0.1

    # --- networks -----------------------------------------------------------------------
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 128, 128])
    activation: str = "relu"  # relu | tanh
    use_feature_normalization: bool = True  # LayerNorm on the network input
    gain: float = 0.01  # orthogonal init gain of the action head
    std_x_coef: float = 1.0  # Gaussian std = sigmoid(log_std / x) * y
    std_y_coef: float = 0.5
    use_recurrent_policy: bool = False  # GRU actor and critic
    recurrent_n: int = 1
    data_chunk_length: int = 10

    # ---------------------------------------------------------------------------------
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
                     "opti_eps", "gain", "max_env_restarts", "agent_obsk", "torch_threads"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name} must be >= 0; got {getattr(self, name)}")
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
        if self.activation not in ("relu", "tanh"):
            raise ConfigError(f"--activation must be relu or tanh; got {self.activation!r}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
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
                  "progress", "wandb", "tensorboard", "max_env_restarts",
                  "num_env_steps", "parallel_critic")


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
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if kind == list[int]:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if isinstance(value, int):
                value = [value]
            return [int(v) for v in value]
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description="Train HAPPO / HATRPO / MAPPO / IPPO. Flags override configs/<env>/<task>.yaml.",
        epilog="Sweeps: a comma list in --algo, --seed, --scenario, --agent_conf or --map_name, or "
               "--seeds 1,2,3, runs every combination as a separate run (train/sweep.py); "
               "--max_parallel N bounds how many run at once (default: cores); "
               "--ray_address auto|local|<address> runs them as Ray tasks.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for name, f in FIELDS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kind = _FIELD_TYPES[name]
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction)
        elif kind == list[int]:  # "--hidden_sizes 64 64" and "--hidden_sizes 64,64" alike
            parser.add_argument(*flags, dest=name, nargs="+", metavar="N")
        else:
            parser.add_argument(*flags, dest=name, type=str, metavar=name.upper())
    return parser


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """Parse command-line flags into a dict of the flags actually given."""
    flags = vars(build_parser().parse_args(argv))
    # A list flag's words are joined back into the one string ``_coerce`` splits.
    return {k: " ".join(v) if isinstance(v, list) else v for k, v in flags.items()}


def task_config_path(values: dict[str, Any]) -> Path:
    from envs.registry import task_name  # local import: keeps config free of env imports

    return CONFIG_DIR / values["env"] / f"{task_name(values)}.yaml"


def load_config(argv: list[str]) -> Config:
    """Resolve the full configuration for a command line, validating everything."""
    flags = parse_flags(argv)
    values: dict[str, Any] = {}
    _apply(values, flags, "command line")
    defaults = Config()
    probe = {**defaults.to_dict(), **values}
    from envs.registry import check_task, check_task_flags  # env families and their task names

    check_task(probe)
    check_task_flags(probe["env"], values)
    resolved: dict[str, Any] = dict(ALGORITHM_DEFAULTS.get(probe["algo"], {}))
    task_file = task_config_path(probe)
    if task_file.exists():
        _apply(resolved, _sections(read_yaml(task_file), probe["algo"], task_file), str(task_file))
    if probe["config"]:
        user_file = Path(probe["config"])
        _apply(resolved, _sections(read_yaml(user_file), probe["algo"], user_file), str(user_file))
    resolved.update(values)  # flags win
    config = dataclasses.replace(defaults, **resolved)
    return config.validate()


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    values: dict[str, Any] = {}
    _apply(values, data, source)
    return dataclasses.replace(Config(), **values)


def save_config(config: Config, path: Path) -> None:
    from utils.checkpoint import atomic_write_bytes

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode())

