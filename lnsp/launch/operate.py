"""Operations on a live run: an all-thread dump that never kills it, a staged stop
(SIGTERM, grace, SIGKILL) and its log."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time

from lnsp import procs
from lnsp.diagnose.target import find_run
from lnsp.launch import LaunchError, backend
from lnsp.rundir import ExitCode, RunDir, RunRecord


def resolve_run(target: str, root: str = "runs") -> tuple[RunDir | None, dict]:
    """A run directory (and its run.json) from a PID or a path, found as `lnsp diagnose`
    finds it; a PID no run records is a foreground process of its own."""
    rd, run = find_run(target, root)
    if not target.isdigit():
        if run is None:
            raise LaunchError(f"{target}: not a run directory (no run.json)")
        return rd, run
    pid = int(target)
    if rd is None:
        return None, {"pid": pid, "backend": "foreground"}
    if (run or {}).get("pid") != pid:  # not the trainer run.json records: no identity yet
        run = {**(run or {}), "pid": pid, "start_time": None}
    return rd, run


def _record(target: str, root: str = "runs") -> tuple[RunDir | None, RunRecord]:
    """resolve_run's answer with its run.json as a record."""
    rd, run = resolve_run(target, root)
    return rd, RunRecord.of(run)


def check_dumpable(run: RunRecord) -> RunRecord:
    """Refuse unless the target is a live lnsp trainer with its SIGUSR1 handler:
    SIGUSR1's default action would kill it. The record to signal, pinned to the
    process found."""
    if run.backend in ("docker", "ddp-docker"):
        if not backend(run.backend).alive(run):
            raise LaunchError(f"the run's container(s) "
                              f"{(run.container_id or ','.join(run.containers))[:40]}"
                              " not running")
        return run
    pid = run.pid
    if not procs.alive(pid):
        raise LaunchError(f"process {pid} is not running")
    if not procs.is_trainer(pid, run.start_time):
        raise LaunchError(f"process {pid} is not an lnsp trainer "
                          f"({' '.join(procs.cmdline(pid))[:80]!r}); not signalling it")
    if procs.catches(pid, signal.SIGUSR1) is False:
        raise LaunchError(f"process {pid} has no SIGUSR1 handler installed yet; "
                          "SIGUSR1 would kill it, so no signal was sent")
    # Known by its command line just now: pinned to this process, not a later one with its PID.
    return run if run.start_time else dataclasses.replace(run, start_time=procs.start_time(pid))


def dump(target: str, root: str = "runs", native: bool = False, timeout: float = 30.0) -> str:
    rd, run = _record(target, root)
    run = check_dumpable(run)
    before = set(rd.dumps.glob("*.txt")) if rd else set()
    backend(run.backend).send(run, signal.SIGUSR1)
    if rd is None:
        return f"SIGUSR1 sent to {run.pid}: the dump is in the trainer's log"
    def fresh():
        return sorted(set(rd.dumps.glob("*.txt")) - before)

    if not procs.wait_for(fresh, timeout):
        raise LaunchError(f"no dump appeared in {rd.dumps} within {timeout:g}s "
                          "(the process may be frozen: try --native)", ExitCode.STALLED)
    newest = fresh()[-1]
    text = f"{newest}\n{newest.read_text()}"
    if native and run.backend not in ("docker", "ddp-docker"):
        from lnsp.guard.dumps import native_stacks

        text += "\nNative stacks (py-spy dump --native, from outside):\n" + (
            native_stacks(run.pid) or "(py-spy not available or not permitted)\n")
    return text


def stop(target: str, grace: float = 30.0) -> tuple[str, int]:
    """Stop a run: a request file its supervisor (or torchrun's restarts) obeys, then
    SIGTERM (to the supervisor when there is one, which passes it on), then after the
    grace SIGKILL. What happened and the exit code: 0 stopped (or not running), 3 killed
    after the grace (it did not stop in time)."""
    rd, run = _record(target)
    if rd is None:
        raise LaunchError(f"{target}: no run directory records this process; "
                          "name the run directory")
    ops = backend(run.backend)
    if not ops.alive(run):  # its recorded processes (PID and start time) are gone
        ended = rd.read_exit()
        return (f"{rd.root}: not running ({ended.state if ended else 'no exit record'})",
                ExitCode.DONE)
    rd.request_stop(grace)  # noted before any signal: nothing restarts after this
    asked = time.time()
    ops.send(run, signal.SIGTERM)
    if ops.wait_gone(run, grace):
        ended = rd.read_exit()
        return (f"{rd.root}: {ended.state if ended else 'ended'} at step "
                f"{ended.step if ended else '?'}; checkpoint {rd.last_checkpoint()}",
                ExitCode.DONE)
    run = rd.read_run_record() or run  # the trainer's PID changes on a restart
    ops.kill(run)
    if not ops.wait_gone(run, KILL_WAIT_S):
        ops.kill_supervisor(run)  # stopped itself (SIGSTOP), or not listening
        ops.wait_gone(run, KILL_WAIT_S)
    ended = rd.read_exit()
    if ended is None or ended.time < asked:
        rd.write_exit("stopped", 128 + signal.SIGKILL, ended.step if ended else _step(rd),
                      cause=f"did not stop within {grace:g}s of SIGTERM: killed (SIGKILL) "
                            "by lnsp stop", signal="SIGKILL")
    return (f"{rd.root}: did not stop within {grace:g}s of SIGTERM; killed (SIGKILL); "
            f"the last checkpoint is {rd.last_checkpoint()}", ExitCode.STALLED)


KILL_WAIT_S = 10.0


def _step(rd: RunDir) -> int:
    beat = rd.read_heartbeat()
    return beat.step if beat else 0


def logs(target: str, follow: bool = False, out=sys.stdout) -> None:
    """Print the log; with `follow`, keep printing until the run's process is gone."""
    rd, run = _record(target)
    if not rd.log.exists():
        raise LaunchError(f"{rd.log}: no log yet")
    ops = backend(run.backend)
    with open(rd.log) as f:
        out.write(f.read())
        out.flush()
        while follow:
            line = f.readline()
            if line:
                out.write(line)
                out.flush()
            elif ops.alive(rd.read_run_record() or run):  # pids change on a restart
                time.sleep(0.25)
            else:
                break
