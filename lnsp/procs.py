"""Questions about live processes (alive, an lnsp trainer, a SIGUSR1 handler installed,
stopped) and the one way lnsp signals one: only a process proven to be the recorded one."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil

from lnsp.errors import LaunchError

# psutil's create_time() adds the boot time of /proc/stat, whole seconds that the clock's
# adjustments can move: a process is the recorded one within this much.
START_TOLERANCE_S = 1.0


def start_time(pid: int | None = None) -> float | None:
    """When the process (this one by default) was created, Unix seconds: the start time
    recorded next to every PID lnsp writes. None when it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process(pid: int | None, started: float | None) -> bool:
    """The process now at `pid` is the one recorded with `started`: its creation time,
    or any moment it was seen alive (run.json's `start_time`). A process that reused the
    PID was created after the recorded one ended, so after both; one created no later
    than `started` is the recorded one."""
    if not pid or started is None:
        return False
    created = start_time(pid)
    return created is not None and created <= started + START_TOLERANCE_S


def running(pid: int | None, started: float | None) -> bool:
    """The recorded process still runs (not a zombie, not a later one with its PID)."""
    return alive(pid) and same_process(pid, started)


def send_signal(pid: int | None, started: float | None, signum: int,
                what: str = "process") -> None:
    """Every signal lnsp sends goes through here: to `pid` only while it is the process
    recorded with `started` (see same_process). Otherwise a LaunchError (one line, exit
    code 2) and no signal: a PID alone may by now name anyone's process."""
    name = signal.Signals(signum).name
    if not pid:
        raise LaunchError(f"no {what} PID recorded; no {name} sent")
    if started is None:
        raise LaunchError(f"{what} {pid}: no start time recorded with its PID, so it "
                          f"cannot be told from a later process; no {name} sent")
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except psutil.Error:
        raise LaunchError(f"{what} {pid} is not running; no {name} sent") from None
    if created > started + START_TOLERANCE_S:
        raise LaunchError(f"{what} {pid} is not the recorded one (that PID now names a "
                          f"process started {created - started:.0f}s later: "
                          f"{' '.join(cmdline(pid))[:60]!r}); no {name} sent")
    try:  # psutil checks once more that the PID still names the process it opened
        proc.send_signal(signum)
    except psutil.Error:
        raise LaunchError(f"{what} {pid} ended before {name} could be sent") from None


def stopped(pid: int | None) -> bool:
    """The process is stopped (SIGSTOP, Ctrl-Z: state T): paused, not frozen."""
    try:
        return bool(pid) and psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


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


def is_trainer(pid: int, start_time: float | None = None) -> bool:
    """The trainer that run.json records as started at `start_time`, and not a later
    process that reused its PID; with no record of it, a process that runs `lnsp train`
    (the lnsp script or `python -m lnsp`)."""
    if start_time:
        return same_process(pid, start_time)
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
