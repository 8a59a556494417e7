"""Runs that are processes on this machine (foreground, nohup, tmux): by PID."""

from __future__ import annotations

import os

from lnsp import procs


def trainer_alive(run: dict) -> bool:
    """The recorded trainer runs (not a later process that reused its PID)."""
    return procs.alive(run.get("pid")) and procs.is_trainer(run["pid"], run)


def alive(run: dict) -> bool:
    return trainer_alive(run) or procs.alive(run.get("supervisor_pid"))


def send(run: dict, signum: int) -> None:
    """To the trainer; between two trainers (a restart), to the supervisor, which
    passes it on."""
    os.kill(run["pid"] if trainer_alive(run) else run["supervisor_pid"], signum)


def wait_gone(run: dict, timeout: float) -> bool:
    """The trainer and its supervisor have both ended (a supervisor may restart it)."""
    trainer = run.get("pid") if trainer_alive(run) else None
    return procs.wait_gone([trainer, run.get("supervisor_pid")], timeout) and not alive(run)
