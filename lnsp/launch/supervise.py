"""The supervisor of a detached run: starts `lnsp train`, restarts it from last.pt
when it stalls (exit 3), crashes, or freezes so hard that its own watchdog cannot run
(stuck holding the GIL), at most --max-restarts times; never after a stop (a signal to
it, or `lnsp stop`'s request file). A stopped trainer (SIGSTOP, Ctrl-Z) is paused, not frozen.

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

from lnsp import procs
from lnsp.diagnose import hangbundle
from lnsp.guard.watchdog import BUNDLE_WAIT_S, VERDICT_WAIT_S, cause
from lnsp.guard.budgets import Goodput
from lnsp.guard.restarts import CRASH_LOOP_ATTEMPTS, RESTARTABLE, classify_ending, crash_loop
from lnsp.guard.dumps import native_stacks
from lnsp.errors import LaunchError
from lnsp.launch.command import caffeinate_argv
from lnsp.rundir import ExitCode, RunDir, RunLog, atomic_write, staleness

FROZEN_GRACE_S = 5.0  # past the stall timeout (at most): the trainer's own watchdog goes first
POLL_S = 0.5
# A poll this much later than due: the supervisor itself was paused (SIGSTOP, Ctrl-Z, a
# laptop's sleep), and as a rule the whole run with it: its clock restarts.
PAUSE_GAP_S = 5.0
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supervise(config) -> int:
    """Run the trainer under supervision; the process exit code (a death by a signal as
    128 + its number, as a shell reports it, never a negative code wrapped to 241)."""
    code = int(_supervise(config))
    return 128 - code if code < 0 else code


def _supervise(config) -> int:
    rd = RunDir(config.run_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    holder = rd.trainer_lock_holder()
    if holder is not None:  # refused before run.json is touched: that run is another's
        raise LaunchError(f"{rd.root}: a trainer is already running in this run directory "
                          f"(pid {holder or '?'}); stop it first (lnsp stop {rd.root})")
    log = RunLog(rd.log, echo=True)
    rd.clear_stop()  # a stop request of an earlier life of the run is not for this one
    rd.update_run(supervisor_pid=os.getpid(), supervisor_start=procs.start_time(),
                  max_restarts=config.max_restarts)
    child = {"proc": None, "start": None, "stop": False}

    def forward(signum, frame):  # a stop for the supervisor is a stop for the trainer
        # Noted before it is passed on: whatever the trainer does next (stops, or is
        # killed after the grace), no restart follows a stop.
        child["stop"] |= signum in STOPS
        proc = child["proc"]
        if signum == signal.SIGUSR1 and not dumpable(proc):
            return  # a dump asked for before the trainer's handler is in would kill it
        if proc is not None and proc.poll() is None:  # our child, not yet reaped
            try:
                procs.send_signal(proc.pid, child["start"], signum, "trainer")
            except LaunchError:
                pass  # it ended meanwhile: nothing to pass on

    def stopping() -> bool:
        return child["stop"] or rd.stop_requested()

    # In a container the engine's signals reach the init process, then this one: pass
    # each on (SIGUSR1 too, whose default action would end the supervisor). SIGHUP (a
    # tmux pane's terminal gone) is a graceful stop like SIGTERM.
    for signum in (*STOPS, signal.SIGUSR1):
        signal.signal(signum, forward)
    restarts, resume = 0, config.resume
    resumed_from = []  # the checkpoint step each attempt started from
    while True:
        if stopping():  # a stop that lands between two attempts ends the run
            log("[SUPERVISOR] stop requested: no further trainer is started")
            return ExitCode.DONE
        argv = trainer_argv(config, resume)
        started = time.time()
        resumed_from.append(rd.checkpoint_step() if resume else 0)
        child["proc"] = proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        child["start"] = procs.start_time(proc.pid) or started
        if child["stop"]:  # the stop landed while it was being started: pass it on
            forward(signal.SIGTERM, None)
        power = caffeinate_argv(proc.pid)  # macOS: App Nap would throttle it
        if power:
            subprocess.Popen(power, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        code = _watch(proc, rd, config, log, stopping)
        if code == ExitCode.DONE or stopping():  # never restart what was stopped
            if code != ExitCode.DONE:
                log(f"[SUPERVISOR] trainer ended after a stop request (exit code {code}); "
                    "not restarting")
            return code
        record = rd.read_exit()
        kind = classify_ending(code, record)
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


def dumpable(proc) -> bool:
    """The trainer has its SIGUSR1 dump handler installed (in its first second it has
    not, and SIGUSR1's default action ends a process). Where /proc cannot tell (macOS),
    the trainer is trusted: it installs the handler before anything else."""
    return proc is not None and procs.catches(proc.pid, signal.SIGUSR1) is not False


def trainer_argv(config, resume: bool) -> list[str]:
    """The trainer's command line (unbuffered, faulthandler on)."""
    return [sys.executable, "-u", "-X", "faulthandler", "-m", "lnsp", "train",
            *config.replace(resume=resume).to_argv()]





def _watch(proc: subprocess.Popen, rd: RunDir, config, log, stopping) -> int:
    """Wait for the trainer; kill it when it shows no life for too long. Its exit code.

    Life is judged on this supervisor's own monotonic clock (when it saw the heartbeat
    change), not on the heartbeat's wall-clock age: a pause of the run (SIGSTOP or
    Ctrl-Z of its processes, a laptop's sleep) moves the wall clock and not the run. A
    poll that comes far later than due (this process was paused) or a trainer in state
    T (stopped) restarts the clock. Past the budget it looks once more before acting."""
    alive = Liveness(proc.pid)
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        s = alive.judge(rd.read_heartbeat(), config)
        if not s.stale or stopping():  # after a stop, `lnsp stop` ends it (its grace)
            continue
        ended = rd.read_exit()
        if ended and ended.time >= alive.started:  # it said how it ended and is exiting
            continue  # (a plot after the last step can take seconds): not frozen
        log(f"[SUPERVISOR] trainer pid {proc.pid} frozen: no heartbeat for {s.idle:.1f}s "
            f"(budget {s.budget:g}s); dumping native stacks and killing it")
        stacks = native_stacks(proc.pid, timeout=10) or "(py-spy not available)\n"
        _charge_frozen_time(rd, proc.pid)
        atomic_write(rd.frozen_dump_path(proc.pid),
                     f"# frozen trainer pid {proc.pid}, heartbeat {s.idle:.1f}s old\n{stacks}")
        # Why it froze, before it is killed: the verdict goes into the log and exit.json.
        verdict = _explain(hangbundle.Explanation(rd, proc.pid, log=log).start(), proc)
        why = cause(verdict)
        if why:
            log(f"[SUPERVISOR] VERDICT {why} fix: {verdict['fix']} "
                f"(bundle {verdict.get('bundle')})")
        # A second look right before acting: the dump and the diagnosis took seconds.
        again = alive.second_look(proc, rd, config, stopping)
        if again is not None:
            log(f"[SUPERVISOR] trainer pid {proc.pid} not killed: {again}")
            continue
        try:
            procs.send_signal(proc.pid, alive.start, signal.SIGKILL, "trainer")
        except LaunchError:
            pass  # our own child, unreaped: only a failed start-time read lands here
        proc.wait()
        beat = rd.read_heartbeat()
        extra = {"verdict": verdict["kind"], "bundle": verdict.get("bundle")} if why else {}
        rd.write_exit("stalled", ExitCode.STALLED, beat.step if s.stepping and beat else 0,
                      cause=why or f"frozen: no heartbeat for {s.idle:.1f}s", frozen=True,
                      **extra)
        return ExitCode.STALLED


def _explain(job, proc: subprocess.Popen) -> dict | None:
    """The diagnosis's verdict, then its bundle, each waited for in slices: a trainer that
    ends meanwhile (its own watchdog got there first) is not waited on for seconds."""
    for event, limit in ((job.known, VERDICT_WAIT_S), (job.done, BUNDLE_WAIT_S)):
        end = time.monotonic() + limit
        while not event.wait(0.25) and proc.poll() is None and time.monotonic() < end:
            pass
    return job.verdict


class Liveness:
    """When the trainer last showed life, on this supervisor's monotonic clock."""

    def __init__(self, pid: int):
        self.pid, self.start = pid, procs.start_time(pid)
        self.started = time.time()  # wall clock: exit.json of this trainer is newer
        self.changed = self.polled = time.monotonic()
        self.seen = None  # the last heartbeat of this trainer, as seen
        self.stepping = False  # it has written a heartbeat: the stall budget applies

    def judge(self, beat, config, poll: bool = True):
        """Staleness now; `poll`: called from the poll loop, whose gaps tell a pause."""
        now = time.monotonic()
        if beat is not None and beat.pid == self.pid:  # an earlier trainer's does not count
            key = (beat.time, beat.step, beat.phase)
            if key != self.seen:
                self.seen, self.changed, self.stepping = key, now, True
        if (poll and now - self.polled > PAUSE_GAP_S) or procs.stopped(self.pid):
            self.changed = now  # a pause is not a stall
        self.polled = now
        return staleness(self.changed, self.stepping, config.stall_timeout,
                         config.startup_timeout, now, grace=FROZEN_GRACE_S)

    def second_look(self, proc, rd, config, stopping) -> str | None:
        """Why not to kill after all (it ended, said how it ended, beat again, is
        paused, or a stop came), or None: still frozen."""
        if proc.poll() is not None:
            return f"it ended (exit code {proc.returncode})"
        ended = rd.read_exit()
        if ended and ended.time >= self.started:
            return "it wrote exit.json"
        if stopping():
            return "a stop was requested"
        if not self.judge(rd.read_heartbeat(), config, poll=False).stale:
            return "it showed life again (or was paused)"
        return None


def _charge_frozen_time(rd: RunDir, pid: int) -> None:
    """A frozen trainer cannot account for its last seconds: they are stall time."""
    import psutil

    record = rd.read_goodput()
    if record.get("pid") != pid:
        return
    from lnsp.guard.watchdog import process_age

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
