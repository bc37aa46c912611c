"""The errors and signals every layer shares. Imports nothing from this project, so any
module may import it."""
from __future__ import annotations

import argparse
import signal


class ConfigError(ValueError):
    """Bad user input. The message is one line naming what is wrong and what is valid.

    A library module words ``message`` in its own terms ("HalfCheetah has no partition
    '3x3' (known: 2x3, 6x1)") and names the setting at fault in ``field`` (and, where it
    helps, the value given in ``value``). Settings and command-line flags share their
    names, so ``str()`` puts the flag in front for the one line the command line prints:
    ``--agent_conf: HalfCheetah has no partition '3x3' (known: 2x3, 6x1)``.
    """

    def __init__(self, message: str, *, field: str | None = None, value: object = None):
        super().__init__(message)
        self.message, self.field, self.value = message, field, value

    def __str__(self) -> str:
        if self.field is None:
            return self.message
        given = "" if self.value is None else f" {self.value}"
        return f"--{self.field}{given}: {self.message}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags raise :class:`ConfigError`, so that the entry point prints
    one line and exits with status 2, instead of argparse's usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


# Signals that stop a run with a checkpoint (exit 130): Ctrl-C, a kill or a scheduler's
# preemption, and a closed terminal or dropped ssh session (whose default action killed the
# run without one).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
