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
from lnsp.rundir import RunDir, RunLog, atomic_write, read_json, update_json, write_json

FROZEN_GRACE_S = 5.0  # past the stall timeout (at most): the trainer's own watchdog goes first
POLL_S = 0.5
DONE, BAD_INPUT = 0, 2


def supervise(config) -> int:
    rd = RunDir(config.run_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    log = RunLog(rd.log, echo=True)
    update_json(rd.run, supervisor_pid=os.getpid(), max_restarts=config.max_restarts)
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
        if code in (DONE, BAD_INPUT) or child["stop"]:  # never restart what was stopped
            return code
        if restarts >= config.max_restarts:
            if config.max_restarts:
                log(f"[SUPERVISOR] giving up after {restarts} restarts (exit code {code})")
            return code
        restarts += 1
        resume = True
        update_json(rd.run, restarts=restarts)
        log(f"[SUPERVISOR] trainer ended with exit code {code}; restart {restarts}/"
            f"{config.max_restarts} from {rd.last_checkpoint()}")


def _watch(proc: subprocess.Popen, rd: RunDir, config, started: float, log) -> int:
    """Wait for the trainer; kill it when its heartbeat is too old. Its exit code."""
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        beat = read_json(rd.heartbeat) or {}
        fresh = beat.get("pid") == proc.pid
        last = beat["time"] if fresh else started
        budget = config.stall_timeout if fresh else config.startup_timeout
        budget += min(FROZEN_GRACE_S, budget)
        age = time.time() - last
        if age <= budget:
            continue
        log(f"[SUPERVISOR] trainer pid {proc.pid} frozen: no heartbeat for {age:.1f}s "
            f"(budget {budget:g}s); dumping native stacks and killing it")
        stacks = native_stacks(proc.pid, timeout=10) or "(py-spy not available)\n"
        rd.dumps.mkdir(parents=True, exist_ok=True)
        atomic_write(rd.dumps / f"dump-frozen-{proc.pid}-{time.strftime('%Y%m%d-%H%M%S')}.txt",
                     f"# frozen trainer pid {proc.pid}, heartbeat {age:.1f}s old\n{stacks}")
        proc.kill()
        proc.wait()
        write_json(rd.exit, {"state": "stalled", "exit_code": 3, "time": time.time(),
                             "step": beat.get("step", 0) if fresh else 0, "frozen": True})
        return 3
