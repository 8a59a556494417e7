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

from lnsp import hangbundle
from lnsp.budgets import RESTARTABLE, Goodput, classify_ending, crash_loop
from lnsp.dumps import native_stacks
from lnsp.launch.command import caffeinate_argv
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
    resumed_from = []  # the checkpoint step each attempt started from
    while True:
        argv = trainer_argv(config, resume)
        started = time.time()
        resumed_from.append(rd.checkpoint_step() if resume else 0)
        child["proc"] = proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        power = caffeinate_argv(proc.pid)  # macOS: App Nap would throttle it
        if power:
            subprocess.Popen(power, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        code = _watch(proc, rd, config, started, log)
        if code == ExitCode.DONE or child["stop"]:  # never restart what was stopped
            return code
        record = rd.read_exit()
        kind = classify_ending(code, _record_dict(record))
        if not RESTARTABLE.get(kind, True):
            if config.max_restarts:
                log(f"[SUPERVISOR] trainer ended: {kind} (exit code {code}); a restart "
                    "would repeat it: not restarting")
            return code
        if restarts >= config.max_restarts:
            if config.max_restarts:
                log(f"[SUPERVISOR] giving up after {restarts} restarts (exit code {code})")
            return code
        if crash_loop(resumed_from + [rd.checkpoint_step()]):
            cause = (record.cause if record and record.cause else kind)
            log(f"[SUPERVISOR] crash loop: the last {CRASH_LOOP_ATTEMPTS} attempts all "
                f"started from step {resumed_from[-1]} and made no progress past it; "
                f"each ended: {cause}. Not restarting (exit code {int(ExitCode.CRASH_LOOP)})")
            rd.write_exit("failed", ExitCode.CRASH_LOOP, record.step if record else 0,
                          cause=f"crash loop: {CRASH_LOOP_ATTEMPTS} attempts from step "
                                f"{resumed_from[-1]} without progress; each: {cause}",
                          ending=kind, attempts=len(resumed_from))
            return ExitCode.CRASH_LOOP
        restarts += 1
        resume = True
        rd.update_run(restarts=restarts)
        log(f"[SUPERVISOR] trainer ended: {kind} (exit code {code}); restart {restarts}/"
            f"{config.max_restarts} from {rd.last_checkpoint()}")


def trainer_argv(config, resume: bool) -> list[str]:
    """The trainer's command line (unbuffered, faulthandler on)."""
    return [sys.executable, "-u", "-X", "faulthandler", "-m", "lnsp", "train",
            *config.replace(resume=resume).to_argv()]


CRASH_LOOP_ATTEMPTS = 3  # the first attempt and two restarts


def _record_dict(record) -> dict:
    if record is None:
        return {}
    return {"state": record.state, "cause": record.cause or "", **record.extra}


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
        ended = rd.read_exit()
        if ended and ended.time >= started:  # it has said how it ended and is exiting
            continue  # (a plot after the last step can take seconds): not frozen
        log(f"[SUPERVISOR] trainer pid {proc.pid} frozen: no heartbeat for {s.idle:.1f}s "
            f"(budget {s.budget:g}s); dumping native stacks and killing it")
        stacks = native_stacks(proc.pid, timeout=10) or "(py-spy not available)\n"
        _charge_frozen_time(rd, proc.pid)
        atomic_write(rd.frozen_dump_path(proc.pid),
                     f"# frozen trainer pid {proc.pid}, heartbeat {s.idle:.1f}s old\n{stacks}")
        # Why it froze, before it is killed: the verdict goes into the log and exit.json.
        job = hangbundle.Explanation(rd, proc.pid, log=log).start()
        verdict = job.wait(hangbundle.VERDICT_WAIT_S, hangbundle.BUNDLE_WAIT_S)
        why = hangbundle.cause(verdict)
        if why:
            log(f"[SUPERVISOR] VERDICT {why} fix: {verdict['fix']} "
                f"(bundle {verdict.get('bundle')})")
        proc.kill()
        proc.wait()
        extra = {"verdict": verdict["kind"], "bundle": verdict.get("bundle")} if why else {}
        rd.write_exit("stalled", ExitCode.STALLED, beat.step if s.stepping else 0,
                      cause=why or f"frozen: no heartbeat for {s.idle:.1f}s", frozen=True,
                      **extra)
        return ExitCode.STALLED


def _charge_frozen_time(rd: RunDir, pid: int) -> None:
    """A frozen trainer cannot account for its last seconds: they are stall time."""
    import psutil

    record = rd.read_goodput()
    if record.get("pid") != pid:
        return
    from lnsp.watchdog import process_age

    try:
        psutil.Process(pid)  # still there (unreaped)
    except psutil.Error:
        return
    lived = process_age(pid)
    missing = lived - float(record.get("attempt_wall_s", 0.0))
    if missing <= 0:
        return
    goodput = Goodput()
    goodput.restore(record.get("seconds"))
    goodput.add("stalled", missing)
    rd.write_goodput({**record, **goodput.summary(), "attempt_wall_s": round(lived, 3)})


def restart_refused(rd: RunDir) -> tuple[str, int] | None:
    """For a job that torchrun's agent restarts (it restarts on any failure): why this
    attempt should not run, and its exit code, or None. Every rank asks before the
    rendezvous, from the same files, so all give the same answer."""
    record = rd.read_exit()
    if record is None:
        return None
    kind = classify_ending(record.exit_code, _record_dict(record))
    if not RESTARTABLE.get(kind, True):
        return (f"the last attempt ended: {kind} ({record.cause or record.state}); a restart "
                "would repeat it: not running", int(record.exit_code) or 1)
    steps = rd.read_run().get("attempts_from", []) + [rd.checkpoint_step()]
    if crash_loop(steps):
        return (f"crash loop: the last restarts made no progress past step {steps[-1]}; "
                f"each ended: {record.cause or kind}", int(ExitCode.CRASH_LOOP))
    return None
