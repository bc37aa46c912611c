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
# Each class's family, readable without importing it (checking a config needs no torch);
# algorithm_class checks it against the class's own declaration.
FAMILY_OF = {"happo": "on-policy", "hatrpo": "on-policy", "mappo": "on-policy", "ippo": "on-policy",
             "hatd3": "off-policy", "haddpg": "off-policy", "matd3": "off-policy", "maddpg": "off-policy"}
assert FAMILY_OF.keys() == LOCATIONS.keys() and set(FAMILY_OF.values()) <= set(FAMILIES)


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
    if (missing or cls.name != name or cls.family != FAMILY_OF[name]
            or not set(cls.action_kinds) <= set(ACTION_KINDS)):
        raise TypeError(f"{LOCATIONS[name]} must declare {', '.join(DECLARED)} (name {name!r}, family "
                        f"{FAMILY_OF[name]!r}, action_kinds among {', '.join(ACTION_KINDS)}); missing: {missing}")
    return cls


def algorithm_classes() -> list[type]:
    """Every registered class, in registration order."""
    return [algorithm_class(name) for name in NAMES]


def readers(field: str) -> list[type]:
    """The classes that list ``field`` in ``reads``."""
    return [cls for cls in algorithm_classes() if field in cls.reads]


def _one_of(names: list[str]) -> str:
    """``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def make_algorithm(config: Any, spec: Any, device: Any):
    """``config.algo``'s class built for ``spec`` (an envs.base.EnvSpec); ConfigError if the
    algorithm does not support the task's action space."""
    cls = algorithm_class(config.algo)
    kind = spec.agents[0].action_kind
    if kind not in cls.action_kinds:
        usable = [other.name for other in algorithm_classes() if kind in other.action_kinds]
        instead = f"; use {_one_of(usable)} there" if usable else ""
        raise ConfigError(f"--algo {cls.name} needs {' or '.join(cls.action_kinds)} actions and {spec.name} "
                          f"has {kind} ones{instead}")
    return cls(config, spec, device)
