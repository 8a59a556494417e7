"""Runs that are processes on this machine (foreground, nohup, tmux): by PID."""

from __future__ import annotations

import os

from lnsp import procs


def alive(run: dict) -> bool:
    return procs.alive(run.get("pid")) or procs.alive(run.get("supervisor_pid"))


def trainer_alive(run: dict) -> bool:
    return procs.alive(run.get("pid"))


def send(run: dict, signum: int) -> None:
    os.kill(run["pid"], signum)


def wait_gone(run: dict, timeout: float) -> bool:
    return procs.wait_gone(run["pid"], timeout)
