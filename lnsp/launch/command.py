"""The command and environment of a detached run, shared by the native launchers."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

from lnsp.guard.threads import policy_env, user_environment

OPEN_FILES = 4096


def environment(config, backend: str, ranks: int = 1) -> dict[str, str]:
    """The thread variables of the run's policy for each of `ranks` processes on this
    machine (the user's own values win), unbuffered output and faulthandler on."""
    user = user_environment()
    env = {k: user.get(k, v) for k, v in policy_env(config.threads, ranks).items()}
    env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", LNSP_BACKEND=backend)
    return env


def _raise_open_files() -> None:  # `ulimit -n 4096` for the child
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def detach(argv: list[str], env: dict[str, str], console: Path) -> None:
    """Start `argv` in a session of its own: stdin from /dev/null, output appended to
    `console`, a raised open-file limit; it outlives the shell that started it."""
    with open(console, "ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, env={**user_environment(), **env},
                         preexec_fn=_raise_open_files)


def caffeinate(platform: str = sys.platform) -> tuple[bool, str]:
    """Whether the supervisor holds a power assertion for each trainer (macOS), and why
    (or why not)."""
    if platform != "darwin":
        return False, f"caffeinate: not used ({platform} has no App Nap; it is macOS only)"
    if not shutil.which("caffeinate") and platform == sys.platform:
        return False, "caffeinate: not found on this Mac; App Nap may throttle the run"
    return True, ("caffeinate -i -s -w PID: each trainer holds the assertions against "
                  "idle and system sleep that a background computation needs")


def caffeinate_argv(pid: int, platform: str = sys.platform) -> list[str]:
    """The power assertion for one trainer: -i (no idle sleep, which also keeps App Nap
    off the process), -s (no system sleep on AC power), -w (held while PID lives, so a
    restart takes a new one). -d, the display, is not needed for a computation."""
    if not caffeinate(platform)[0]:
        return []
    return ["caffeinate", "-i", "-s", "-w", str(pid)]


def trainer_argv(config, command: list[str] | None = None, nproc: int = 0) -> list[str]:
    """The supervisor, which runs `python -m lnsp train`, holds caffeinate for it on
    macOS, and restarts it when it stalls or crashes (--max-restarts); for a user's
    command, `lnsp run` with the guard's settings, which does the same for it."""
    if command:
        from lnsp.config import GUARD_FIELDS

        return [sys.executable, "-m", "lnsp", "run", *config.to_argv(GUARD_FIELDS),
                *(["--nproc", str(nproc)] if nproc else []), "--", *command]
    return [sys.executable, "-u", "-X", "faulthandler", "-m", "lnsp", "supervise",
            *config.to_argv()]
