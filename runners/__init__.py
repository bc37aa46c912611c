"""The runner of each algorithm family (algorithms/registry.py: an algorithm's ``family``).

A runner is built as ``runner_class(config)(config, run_dir, device, checkpoint)``; its
module loads on first use (it imports torch).
"""
from __future__ import annotations

import importlib
from typing import Any

from algorithms.registry import algorithm_class

# family -> "module:Class"
RUNNERS = {
    "on-policy": "runners.runner:Runner",
    "off-policy": "runners.off_policy_runner:OffPolicyRunner",
}


def runner_class(config: Any) -> type:
    """The runner that trains ``config.algo``."""
    module, _, name = RUNNERS[algorithm_class(config.algo).family].partition(":")
    return getattr(importlib.import_module(module), name)
