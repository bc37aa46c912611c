"""The only place that knows which algorithms exist, and the only code that compares their names.

Each algorithm class declares, as class attributes:

    name                 its ``--algo`` value
    family               "on-policy" or "off-policy": the runner that trains it (runners/__init__.py)
                         and the config fields it reads (a field's ``family``, train/config.py)
    action_kinds         the action spaces it supports: "continuous", "discrete"
    defaults             its own defaults, above the built-in ones and below the task file,
                         the --config file and the flags
    reads                the per-algorithm config fields it reads (train/config.py: the
                         optimisation, HATRPO, off-policy and networks settings): a flag for one
                         it does not list gets a has-no-effect warning
    compiles_actor_loss  whether --compile applies to its actor loss (feed-forward actors)

The classes load on first use (their modules import torch), so checking ``--algo`` and
parsing the command line need no torch.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any

from utils.errors import ConfigError

FAMILIES = ("on-policy", "off-policy")
ACTION_KINDS = ("continuous", "discrete")
DECLARED = ("name", "family", "action_kinds", "defaults", "reads", "compiles_actor_loss")

# --algo name -> "module:Class"
LOCATIONS = {
    "happo": "algorithms.happo:HAPPO",
    "hatrpo": "algorithms.hatrpo:HATRPO",
    "mappo": "algorithms.mappo:MAPPO",
    "ippo": "algorithms.ippo:IPPO",
    "hatd3": "algorithms.off_policy:HATD3",
    "haddpg": "algorithms.off_policy:HADDPG",
    "matd3": "algorithms.off_policy:MATD3",
    "maddpg": "algorithms.off_policy:MADDPG",
}
NAMES = tuple(LOCATIONS)


def check_name(name: str) -> None:
    """Raise ConfigError unless ``name`` is a registered algorithm."""
    if name not in LOCATIONS:
        close = difflib.get_close_matches(str(name), NAMES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--algo must be one of {', '.join(NAMES)}; got {name!r}{hint}")


def algorithm_class(name: str) -> type:
    """The class registered as ``name`` (imports its module, and so torch, on first use)."""
    check_name(name)
    module, _, attribute = LOCATIONS[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    missing = [key for key in DECLARED if key not in dir(cls)]
    if missing or cls.name != name or cls.family not in FAMILIES or not set(cls.action_kinds) <= set(ACTION_KINDS):
        raise TypeError(f"{LOCATIONS[name]} must declare {', '.join(DECLARED)} (name {name!r}, family one of "
                        f"{', '.join(FAMILIES)}, action_kinds among {', '.join(ACTION_KINDS)}); missing: {missing}")
    return cls


def algorithm_classes() -> list[type]:
    """Every registered class, in registration order."""
    return [algorithm_class(name) for name in NAMES]


def readers(field: str) -> list[type]:
    """The classes that list ``field`` in ``reads``."""
    return [cls for cls in algorithm_classes() if field in cls.reads]


def make_algorithm(config: Any, spec: Any, device: Any):
    """``config.algo``'s class built for ``spec`` (an envs.base.EnvSpec); ConfigError if the
    algorithm does not support the task's action space."""
    cls = algorithm_class(config.algo)
    kind = spec.agents[0].action_kind
    if kind not in cls.action_kinds:
        raise ConfigError(f"--algo {cls.name} supports {' and '.join(cls.action_kinds)} actions; "
                          f"{spec.name} has {kind} ones")
    return cls(config, spec, device)
