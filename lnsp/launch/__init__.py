"""Launchers: one interface (`Backend`) with one backend per module (nohup, tmux,
docker, ddp, ddp-docker; native for runs started in the foreground).

The run's state lives in its run directory, so status, dump, stop and logs work the
same for every backend: each asks the backend of run.json only whether the run's
processes live and how to signal them.
"""

from __future__ import annotations

import importlib
import time
from typing import Protocol, cast, runtime_checkable

from lnsp.errors import LaunchError, RunDirError
from lnsp.observe.status import Processes
from lnsp.rundir import ExitCode, RunDir, RunRecord

__all__ = ["Backend", "LaunchError", "backend", "start"]


MODULES = {"nohup": "nohup", "tmux": "tmux", "docker": "docker", "ddp": "ddp",
           "ddp-docker": "ddp_docker"}
COMMAND_BACKENDS = ("nohup", "tmux", "ddp", "docker")  # backends that run a user's command (lnsp run)


@runtime_checkable
class Backend(Processes, Protocol):
    """What every backend module has, so no caller asks which operations one has: a
    backend with nothing to do for one (no supervisor of its own to kill, nothing to
    add to the status row) has it as a no-op. `run` is run.json's record."""

    def plan(self, config, options: dict) -> dict:
        """The launch facts for run.json, checked before anything starts (a container
        name that is free, a tmux session): a refusal here leaves nothing behind."""

    def start(self, config, info: dict) -> None:
        """Start the run detached; `info` is plan's answer and the user's command."""

    def notes(self, config, info: dict) -> list[str]:
        """Lines for the user after the start (where to attach, the containers)."""

    def send(self, run: RunRecord, signum: int) -> None:
        """A signal to the run's processes (a dump, a stop), each checked to be ours."""

    def kill(self, run: RunRecord) -> None:
        """SIGKILL to the trainer(s): the last stage of a stop."""

    def kill_supervisor(self, run: RunRecord) -> None:
        """SIGKILL to a supervisor that outlived its killed trainer (stopped, deaf)."""

    def wait_gone(self, run: RunRecord, timeout: float) -> bool:
        """Whether every process of the run ended within `timeout` seconds."""


def backend(name: str) -> Backend:
    """The module of a backend by its run.json name; a run started in the foreground
    (or by an unknown launcher) is plain processes on this machine."""
    return cast(Backend, importlib.import_module(f"lnsp.launch.{MODULES.get(name, 'native')}"))


def _undo(rd: RunDir, created: bool, before: dict | None) -> None:
    """A launch that failed leaves no half-made run behind: a folder it made is removed,
    an existing run's run.json is put back as it was."""
    import shutil

    if created:
        shutil.rmtree(rd.root, ignore_errors=True)
    elif before is None:
        rd.run.unlink(missing_ok=True)
    else:
        from lnsp.rundir import write_json

        write_json(rd.run, before)


def start(name: str, config, options: dict) -> str:
    """Start a detached run; returns what to tell the user."""
    command = options.get("command")
    if command:  # a user's command under the guard: refused here when it cannot run
        if name not in COMMAND_BACKENDS:
            raise LaunchError(f"lnsp launch {name} does not take a command yet; use one of "
                              f"{', '.join(COMMAND_BACKENDS)} (or lnsp run in the foreground)")
        from lnsp.launch.runner import prepare

        prepare(command, int(options.get("nproc") or 2) if name == "ddp" else 0)
    else:
        from lnsp.data.dataset import load

        load(config.data, config.ctx_len)  # bad input fails here, not in the background
    rd = RunDir(config.run_dir)
    if rd.exists() and not config.resume:
        raise RunDirError(f"{rd.root}: run directory already holds a run; "
                          "pass --resume to continue it or choose another --run-dir")
    holder = rd.trainer_lock_holder()
    if holder is not None:  # --resume of a run that is still running
        raise RunDirError(f"{rd.root}: a trainer is already running in this run directory "
                          f"(pid {holder or '?'}); stop it first (lnsp stop {rd.root})")
    module = backend(name)
    # run.json gets the launch facts before the process exists: the trainer and the
    # supervisor add their own PIDs to it, so nothing is written by two at once.
    info = module.plan(config, options)
    created, before = not rd.root.exists(), rd.read_run() if rd.run.exists() else None
    rd.root.mkdir(parents=True, exist_ok=True)
    rd.clear_stop()  # an earlier stop of this run is not a stop of this launch
    rd.update_run(backend=name, launch_time=time.time(), **info)
    try:
        module.start(config, {**info, "command": command})
    except Exception as e:  # the run never started: leave the folder as it was
        _undo(rd, created, before)
        if isinstance(e, LaunchError):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise LaunchError(f"lnsp launch {name}: the run could not be started "
                          f"({type(e).__name__}: {first}); nothing was left in {rd.root}",
                          ExitCode.INTERNAL) from None
    lines = [f"Started {name} run: {rd.root}"]
    lines += module.notes(config, info)
    lines += [f"  status: lnsp status {rd.root}      (make status)",
              f"  logs:   lnsp logs {rd.root} -f     (make logs RUN={rd.root})",
              f"  dump:   lnsp dump {rd.root}        (make dump RUN={rd.root})",
              f"  stop:   lnsp stop {rd.root}        (make stop RUN={rd.root})"]
    return "\n".join(lines)
