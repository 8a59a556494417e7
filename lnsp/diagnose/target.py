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


def resolve(target: str, root: str = "runs") -> Target:
    """A live Python process from a PID or a run directory (its run.json's trainer)."""
    if target.isdigit():
        pid = int(target)
        run_dir, run = None, {}
        base = Path(root)
        for path in sorted(base.glob("*/run.json")) if base.is_dir() else []:
            info = read_json(path) or {}
            if info.get("pid") == pid and info.get("backend") != "docker":
                run_dir, run = path.parent, info
        if run_dir is None:
            args = procs.cmdline(pid)
            if "--run-dir" in args[:-1]:
                candidate = RunDir(args[args.index("--run-dir") + 1])
                if candidate.run.exists():
                    run_dir, run = candidate.root, read_json(candidate.run) or {}
    else:
        rd = RunDir(target)
        run = read_json(rd.run)
        if run is None:
            raise BadTarget(f"{target}: not a run directory (no run.json) and not a PID")
        if run.get("backend") == "docker":
            raise BadTarget(f"{target}: runs in a container; diagnose it inside: "
                            f"docker exec {str(run.get('container_id', ''))[:12]} lnsp diagnose 1")
        pid, run_dir = run.get("pid"), rd.root
        if not pid:
            raise BadTarget(f"{target}: run.json names no trainer PID yet")
    check_python(pid)
    return Target(pid, run_dir, run)


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
