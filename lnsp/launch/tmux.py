"""tmux backend: a detached session named after the run; output on the pane and in
training.log. LNSP_TMUX_SOCKET selects a private server (tmux -L)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from lnsp.errors import LaunchError
from lnsp.rundir import ExitCode
from lnsp.launch.command import OPEN_FILES, caffeinate, environment, trainer_argv
# Its runs are processes on this machine, operated as every native run is.
from lnsp.launch.native import (alive, extra_status, kill, kill_supervisor,  # noqa: F401
                                send, trainer_alive, wait_gone)


def tmux(*args: str, socket: str | None = None) -> subprocess.CompletedProcess:
    if not shutil.which("tmux"):
        raise LaunchError("tmux is not installed (apt-get install tmux / brew install tmux)")
    base = ["tmux"] + (["-L", socket] if socket else [])
    return subprocess.run(base + list(args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


def shell_command(config, command: list[str] | None = None) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in environment(config, "tmux").items())
    return (f"cd {shlex.quote(os.getcwd())} && ulimit -n {OPEN_FILES} 2>/dev/null; "
            f"exec env {env} {shlex.join(trainer_argv(config, command))}")


def plan(config, options: dict) -> dict:
    socket = os.environ.get("LNSP_TMUX_SOCKET") or None
    session = options.get("session") or Path(config.run_dir).name.replace(".", "_")
    if tmux("has-session", "-t", f"={session}", socket=socket).returncode == 0:
        if not options.get("replace"):
            raise LaunchError(f"tmux session '{session}' already exists; "
                              "pass --replace or --session NAME")
        tmux("kill-session", "-t", f"={session}", socket=socket)
    return {"tmux_session": session, "tmux_socket": socket}


def start(config, info: dict) -> None:
    session, socket = info["tmux_session"], info["tmux_socket"]
    r = tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "50",
             shell_command(config, info.get("command")), socket=socket)
    if r.returncode != 0:
        raise LaunchError(f"tmux new-session failed: {r.stderr.strip()}", ExitCode.INTERNAL)


def notes(config, info: dict) -> list[str]:
    sock = f"-L {info['tmux_socket']} " if info.get("tmux_socket") else ""
    return [f"  {caffeinate()[1]}",
            f"  attach: tmux {sock}attach -t {info['tmux_session']}   (detach: Ctrl-b d)"]
