"""Launchers: one interface with one backend per module (nohup, tmux, docker, ddp,
ddp-docker).

Each backend module has `start(config, options) -> dict` (what goes into run.json),
`alive(run) -> bool` and `send(run, signum)`. The run's state lives in its run
directory, so status, dump, stop and logs work the same for every backend.
"""

from __future__ import annotations

import importlib
import time

from lnsp.errors import LaunchError, RunDirError
from lnsp.rundir import RunDir

__all__ = ["LaunchError", "backend", "start"]


MODULES = {"docker": "docker", "ddp": "ddp", "ddp-docker": "ddp_docker"}


def backend(name: str):
    """The module that operates a backend's runs (nohup, tmux and foreground runs are
    plain processes on this machine)."""
    return importlib.import_module(f"lnsp.launch.{MODULES.get(name, 'native')}")


def start(name: str, config, options: dict) -> str:
    """Start a detached run; returns what to tell the user."""
    from lnsp.data import load

    load(config.data, config.ctx_len)  # bad input fails here, not in the background
    rd = RunDir(config.run_dir)
    if rd.exists() and not config.resume:
        raise RunDirError(f"{rd.root}: run directory already holds a run; "
                          "pass --resume to continue it or choose another --run-dir")
    holder = rd.trainer_lock_holder()
    if holder is not None:  # --resume of a run that is still running
        raise RunDirError(f"{rd.root}: a trainer is already running in this run directory "
                          f"(pid {holder or '?'}); stop it first (lnsp stop {rd.root})")
    module = importlib.import_module(f"lnsp.launch.{MODULES.get(name, name)}")
    # run.json gets the launch facts before the process exists: the trainer and the
    # supervisor add their own PIDs to it, so nothing is written by two at once.
    info = module.plan(config, options)
    rd.root.mkdir(parents=True, exist_ok=True)
    rd.clear_stop()  # an earlier stop of this run is not a stop of this launch
    rd.update_run(backend=name, launch_time=time.time(), **info)
    module.start(config, info)
    lines = [f"Started {name} run: {rd.root}"]
    lines += module.notes(config, info) if hasattr(module, "notes") else []
    lines += [f"  status: lnsp status {rd.root}      (make status)",
              f"  logs:   lnsp logs {rd.root} -f     (make logs RUN={rd.root})",
              f"  dump:   lnsp dump {rd.root}        (make dump RUN={rd.root})",
              f"  stop:   lnsp stop {rd.root}        (make stop RUN={rd.root})"]
    return "\n".join(lines)
