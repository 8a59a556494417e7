"""nohup backend: a detached process in its own session, stdin from /dev/null,
unbuffered output into the run directory, caffeinate on macOS."""

from __future__ import annotations

from lnsp.launch.command import caffeinate, detach, environment, trainer_argv
# Its runs are processes on this machine, operated as every native run is.
from lnsp.launch.native import (alive, extra_status, kill, kill_supervisor,  # noqa: F401
                                send, trainer_alive, wait_gone)
from lnsp.rundir import RunDir


def plan(config, options: dict) -> dict:
    return {"caffeinate": caffeinate()[0]}


def start(config, info: dict) -> None:
    detach(trainer_argv(config, info.get("command")), environment(config, "nohup"),
           RunDir(config.run_dir).console)


def notes(config, info: dict) -> list[str]:
    return [f"  {caffeinate()[1]}", f"  console output: {RunDir(config.run_dir).console}"]
