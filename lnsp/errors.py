"""The one error type of lnsp: an LnspError carries the exit code the command ends
with; the CLI turns it into one line on stderr (never a traceback), in one place."""

from __future__ import annotations

from lnsp.rundir import ExitCode


class LnspError(Exception):
    """A failure the user is told about in one line; `exit_code` is the process's."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = ExitCode(exit_code)


class DataError(LnspError, ValueError):
    """Bad input: one line naming the file and the problem."""

    exit_code = ExitCode.BAD_INPUT


class ConfigError(LnspError, ValueError):
    """One or more settings are invalid; the message names every one of them."""

    exit_code = ExitCode.BAD_INPUT


class RunDirError(LnspError):
    """The run directory conflicts with the request (a run there already, none to resume)."""

    exit_code = ExitCode.BAD_INPUT


class LaunchError(LnspError, RuntimeError):
    """A launch or an operation on a run that cannot be done."""

    exit_code = ExitCode.BAD_INPUT


class TrainingError(LnspError, RuntimeError):
    """The run cannot go on (a non-finite loss): it ends with exit code 1."""

    exit_code = ExitCode.INTERNAL


class CollectiveError(TrainingError):
    """A collective failed: a rank stalled (timeout, code 3), was lost (its process or
    node gone, named by the survivors: code 3) or left the job otherwise (code 1)."""

    lost: tuple[int, ...] = ()  # the ranks that are gone
