"""Launchers: one interface (start, alive, signal) with one backend per module."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A launch or an operation on a run that cannot be done: one line, an exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
