"""Runs that are processes on this machine (foreground, nohup, tmux): by PID, each PID
checked against its recorded start time before it is believed or signalled."""

from __future__ import annotations

import signal

from lnsp import procs
from lnsp.errors import LaunchError
from lnsp.rundir import RunRecord

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# A foreground run is started in its terminal, never launched: nohup and tmux start
# their runs themselves (nohup.py, tmux.py) and are operated here.
NOT_LAUNCHED = "a foreground run is started with lnsp train or lnsp run, not launched"


def plan(config, options: dict) -> dict:
    raise LaunchError(NOT_LAUNCHED)


def start(config, info: dict) -> None:
    raise LaunchError(NOT_LAUNCHED)


def notes(config, info: dict) -> list[str]:
    return []


def trainer_alive(run: RunRecord) -> bool:
    """The recorded trainer runs (not a later process that reused its PID)."""
    return procs.running(run.pid, run.start_time)


def supervisor_alive(run: RunRecord) -> bool:
    return procs.running(run.supervisor_pid, run.supervisor_start)


def alive(run: RunRecord) -> bool:
    return trainer_alive(run) or supervisor_alive(run)


def send(run: RunRecord, signum: int) -> None:
    """A stop goes to the supervisor when there is one: it notes the stop (so it never
    restarts after it) and passes it on. Other signals (a dump, SIGKILL) go to the
    trainer; between two trainers (a restart), to the supervisor, which passes them on."""
    to_supervisor = supervisor_alive(run) and (signum in STOPS or not trainer_alive(run))
    if to_supervisor:
        procs.send_signal(run.supervisor_pid, run.supervisor_start, signum, "supervisor")
    else:
        procs.send_signal(run.pid, run.start_time, signum, "trainer")


def kill(run: RunRecord) -> None:
    """SIGKILL to the trainer; the supervisor, told of the stop, then ends without a
    restart (operate.stop kills it too if it does not)."""
    if trainer_alive(run):
        procs.send_signal(run.pid, run.start_time, signal.SIGKILL, "trainer")
    elif supervisor_alive(run):
        procs.send_signal(run.supervisor_pid, run.supervisor_start, signal.SIGKILL,
                          "supervisor")


def kill_supervisor(run: RunRecord) -> None:
    if supervisor_alive(run):
        procs.send_signal(run.supervisor_pid, run.supervisor_start, signal.SIGKILL,
                          "supervisor")


def wait_gone(run: RunRecord, timeout: float) -> bool:
    """The trainer and its supervisor have both ended (a supervisor may restart it)."""
    trainer = run.pid if trainer_alive(run) else None
    supervisor = run.supervisor_pid if supervisor_alive(run) else None
    return procs.wait_gone([trainer, supervisor], timeout) and not alive(run)


def extra_status(run: RunRecord) -> dict:
    return {}  # PID and restarts are in every row already
