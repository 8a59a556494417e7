"""The command and environment of a detached run, shared by the native launchers."""

from __future__ import annotations

import os
import shutil
import sys

from lnsp.threads import policy_env

OPEN_FILES = 4096


def environment(config, backend: str, ranks: int = 1) -> dict[str, str]:
    """The thread variables of the run's policy for each of `ranks` processes on this
    machine (the user's own values win), unbuffered output and faulthandler on."""
    env = {k: os.environ.get(k, v) for k, v in policy_env(config.threads, ranks).items()}
    env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", LNSP_BACKEND=backend)
    return env


def caffeinate(platform: str = sys.platform) -> tuple[list[str], str]:
    """The prefix that keeps macOS from napping or sleeping a background run, and why
    (or why not) it is used."""
    if platform != "darwin":
        return [], f"caffeinate: not used ({platform} has no App Nap; it is macOS only)"
    if not shutil.which("caffeinate") and platform == sys.platform:
        return [], "caffeinate: not found on this Mac; App Nap may throttle the run"
    return ["caffeinate", "-dims"], "caffeinate -dims: App Nap and sleep cannot throttle the run"


def trainer_argv(config, platform: str = sys.platform) -> list[str]:
    """caffeinate (macOS) + the supervisor, which runs `python -m lnsp train` and
    restarts it when it stalls or crashes (--max-restarts)."""
    prefix, _ = caffeinate(platform)
    return prefix + [sys.executable, "-u", "-X", "faulthandler", "-m", "lnsp", "supervise",
                     *config.to_argv()]
