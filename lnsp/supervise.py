"""The supervisor of a detached run: starts `lnsp train`, restarts it from last.pt
when it stalls (exit 3), crashes, or freezes so hard that its own watchdog cannot run
(stopped, or stuck holding the GIL), at most --max-restarts times.

A frozen trainer is seen from outside by its heartbeat's age; it is dumped with
py-spy (native frames), killed and restarted. torchrun's elastic agent restarts on
exit codes alone and cannot see a frozen process, hence this small loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lnsp.dumps import native_stacks
from lnsp.rundir import ExitCode, RunDir, RunLog, atomic_write, run_staleness

FROZEN_GRACE_S = 5.0  # past the stall timeout (at most): the trainer's own watchdog goes first
POLL_S = 0.5


def supervise(config) -> int:
    rd = RunDir(config.run_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    log = RunLog(rd.log, echo=True)
    rd.update_run(supervisor_pid=os.getpid(), max_restarts=config.max_restarts)
    child = {"proc": None, "stop": False}

    def forward(signum, frame):  # a stop for the supervisor is a stop for the trainer
        child["stop"] |= signum != signal.SIGUSR1
        if child["proc"] and child["proc"].poll() is None:
            child["proc"].send_signal(signum)

    # In a container the engine's signals reach the init process, then this one: pass
    # each on (SIGUSR1 too, whose default action would end the supervisor).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    restarts, resume = 0, config.resume
    while True:
        argv = [sys.executable, "-u", "-X", "faulthandler", "-m", "lnsp", "train",
                *config.replace(resume=resume).to_argv()]
        started = time.time()
        child["proc"] = proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        code = _watch(proc, rd, config, started, log)
        if code in (ExitCode.DONE, ExitCode.BAD_INPUT) or child["stop"]:  # never restart what was stopped
            return code
        if restarts >= config.max_restarts:
            if config.max_restarts:
                log(f"[SUPERVISOR] giving up after {restarts} restarts (exit code {code})")
            return code
        restarts += 1
        resume = True
        rd.update_run(restarts=restarts)
        log(f"[SUPERVISOR] trainer ended with exit code {code}; restart {restarts}/"
            f"{config.max_restarts} from {rd.last_checkpoint()}")


def _watch(proc: subprocess.Popen, rd: RunDir, config, started: float, log) -> int:
    """Wait for the trainer; kill it when its heartbeat is too old. Its exit code."""
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        beat = rd.read_heartbeat()
        s = run_staleness(beat, proc.pid, started, config.stall_timeout,
                          config.startup_timeout, time.time(), grace=FROZEN_GRACE_S)
        if not s.stale:
            continue
        log(f"[SUPERVISOR] trainer pid {proc.pid} frozen: no heartbeat for {s.idle:.1f}s "
            f"(budget {s.budget:g}s); dumping native stacks and killing it")
        stacks = native_stacks(proc.pid, timeout=10) or "(py-spy not available)\n"
        atomic_write(rd.frozen_dump_path(proc.pid),
                     f"# frozen trainer pid {proc.pid}, heartbeat {s.idle:.1f}s old\n{stacks}")
        proc.kill()
        proc.wait()
        rd.write_exit("stalled", ExitCode.STALLED, beat.step if s.stepping else 0,
                      cause=f"frozen: no heartbeat for {s.idle:.1f}s", frozen=True)
        return ExitCode.STALLED
