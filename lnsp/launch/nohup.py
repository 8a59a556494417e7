"""nohup backend: a detached process in its own session, stdin from /dev/null,
unbuffered output into the run directory, caffeinate on macOS."""

from __future__ import annotations

import os
import resource
import subprocess

from lnsp.launch.command import OPEN_FILES, caffeinate, environment, trainer_argv
from lnsp.rundir import RunDir


def _raise_open_files() -> None:  # `ulimit -n 4096` for the child
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def plan(config, options: dict) -> dict:
    return {"caffeinate": bool(caffeinate()[0])}


def start(config, info: dict) -> None:
    rd = RunDir(config.run_dir)
    with open(rd.console, "ab") as out:
        subprocess.Popen(trainer_argv(config), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **environment(config, "nohup")},
                                preexec_fn=_raise_open_files)


def notes(config, info: dict) -> list[str]:
    return [f"  {caffeinate()[1]}", f"  console output: {RunDir(config.run_dir).console}"]
