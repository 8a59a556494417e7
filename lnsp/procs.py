"""Questions about live processes: alive, an lnsp trainer, a SIGUSR1 handler installed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def is_trainer(pid: int, run: dict | None = None) -> bool:
    """The process runs `lnsp train` (the lnsp script or `python -m lnsp`), or is the
    trainer recorded in `run` (run.json) and not a later process that reused its PID."""
    if run and run.get("pid") == pid and run.get("start_time"):
        try:
            if psutil.Process(pid).create_time() <= run["start_time"] + 1:
                return True
        except psutil.Error:
            return False
    args = cmdline(pid)
    for i, arg in enumerate(args[:-1]):
        if (arg == "lnsp" or arg.endswith("/lnsp")) and args[i + 1] == "train":
            return True
    return False


def catches(pid: int, signum: int = signal.SIGUSR1) -> bool | None:
    """Whether the process has a handler for `signum` (/proc/PID/status SigCgt);
    None where /proc does not tell (macOS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        return None
    return None


def wait_for(gone, timeout: float, interval: float = 0.1) -> bool:
    """Poll `gone()` for up to `timeout` seconds; True once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            return True
        time.sleep(interval)
    return gone()


def wait_gone(pids: int | list[int | None] | None, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the processes to end (psutil.wait_procs, which
    knows a process by its start time, so a reused PID is not waited for); True when
    all have. A zombie has ended: only its parent can reap it, and it may not be us."""
    pids = [pids] if isinstance(pids, int) or pids is None else pids
    waiting = []
    for pid in pids:
        try:
            waiting.append(psutil.Process(pid)) if pid else None
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout
    while True:
        waiting = [p for p in waiting if _running(p)]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return not waiting
        _, waiting = psutil.wait_procs(waiting, timeout=min(0.5, left))


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
