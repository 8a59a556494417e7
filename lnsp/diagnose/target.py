"""What `lnsp diagnose` looks at: a PID or a run directory, resolved to a live Python
process (and its run, when one records it). Refused in one line, exit code 2."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lnsp import procs, system
from lnsp.errors import LnspError
from lnsp.rundir import ExitCode, RunDir, read_json


class BadTarget(LnspError):
    """The target is not something to diagnose: one line, exit code 2."""

    exit_code = ExitCode.BAD_INPUT


@dataclass
class Target:
    pid: int
    run_dir: Path | None = None
    run: dict = field(default_factory=dict)


def find_run(target: str, root: str = "runs") -> tuple[RunDir | None, dict | None]:
    """The run a PID or a path names: its directory and run.json (None where it has no
    run.json). A PID is looked for among the runs under `root` (the last by name, the
    newest, that records it as its trainer; a container's trainer has a PID of its own
    namespace), then in its own command line's --run-dir; (None, None) when neither
    names a run. The one lookup of `lnsp diagnose`, `dump`, `stop` and `logs`."""
    if not target.isdigit():
        rd = RunDir(target)
        return rd, read_json(rd.run)
    pid, found = int(target), (None, None)
    for rd in RunDir.runs_under(root):
        run = read_json(rd.run) or {}
        if run.get("pid") == pid and run.get("backend") != "docker":
            found = rd, run
    if found[0] is None:
        args = procs.cmdline(pid)
        if "--run-dir" in args[:-1]:
            rd = RunDir(args[args.index("--run-dir") + 1])
            found = rd, read_json(rd.run)
    return found


def resolve(target: str, root: str = "runs") -> Target:
    """A live Python process from a PID or a run directory (its run.json's trainer)."""
    rd, run = find_run(target, root)
    if target.isdigit():
        pid = int(target)
        if run is None:  # no run, or a --run-dir that has no run.json yet
            rd, run = None, {}
    else:
        if run is None:
            raise BadTarget(f"{target}: not a run directory (no run.json) and not a PID")
        if run.get("backend") == "docker":
            raise BadTarget(f"{target}: runs in a container; diagnose it inside: "
                            f"docker exec {str(run.get('container_id', ''))[:12]} lnsp diagnose 1")
        pid = run.get("pid")
        if not pid:
            raise BadTarget(f"{target}: run.json names no trainer PID yet")
    check_python(pid)
    return Target(pid, rd.root if rd else None, run)


def check_python(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise BadTarget(f"process {pid} has exited (a zombie waiting for its parent)")
        exe = proc.exe() or proc.name()
    except psutil.NoSuchProcess:
        raise BadTarget(f"no such process: {pid}") from None
    except psutil.AccessDenied:
        raise BadTarget(f"process {pid}: access denied (run as its user or as root)") from None
    name = os.path.basename(exe)
    # A macOS framework build runs as .../Python.app/Contents/MacOS/Python.
    if system.is_python(exe):
        return
    # An interpreter under another name that loads a shared libpython (an embedding
    # program, a renamed binary); only /proc tells, on Linux.
    if system.has_proc():
        try:
            if "libpython" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            pass
    raise BadTarget(f"process {pid} is not a Python process ({name})")
