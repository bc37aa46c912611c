"""The errors and signals every layer shares. Imports nothing from this project, so any
module may import it."""
from __future__ import annotations

import signal


class ConfigError(ValueError):
    """Bad user input. The message is one line naming what is wrong and what is valid."""


# Signals that stop a run with a checkpoint (exit 130): Ctrl-C, a kill or a scheduler's
# preemption, and a closed terminal or dropped ssh session (whose default action killed the
# run without one).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
