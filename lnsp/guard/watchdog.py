"""The watchdog thread, the heartbeat writer and graceful stop.

The watchdog starts before data loading: a loose budget for start-up and the first
step, then `stall_timeout` between steps. On a stall it logs a [WATCHDOG] line, dumps
every thread and either keeps waiting or exits with code 3. A pause of the whole process
(Ctrl-Z then fg, SIGSTOP then SIGCONT, a laptop's sleep) is not a stall: its clocks
restart on SIGCONT, or when a tick arrives far later than due.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from lnsp.guard.phases import PAUSES, Phase
from lnsp.rundir import ExitCode, Heartbeat as HeartbeatRecord, RunDir, staleness

HOST = socket.gethostname()
TICK_S = 0.25
# A tick this much later than due: the whole process was paused (its threads all stopped),
# not the main thread stuck.
PAUSE_GAP_S = 5.0


VERDICT_WAIT_S = 15.0  # the watchdog waits this long for a verdict, then goes on without
BUNDLE_WAIT_S = 40.0  # before a stall exit, this long for the bundle to be complete


def cause(verdict: dict | None) -> str | None:
    """The one-line cause for exit.json and `lnsp status`."""
    if not verdict or verdict.get("kind") in (None, "error"):
        return None
    return f"{verdict['kind']}: {verdict['summary']}"


def own_threads() -> set[int]:
    """Native ids of lnsp's own helper threads in this process (watchdog, dump
    collector, the diagnosis itself): they move while the trainer is stuck, and must not
    make a stuck trainer look busy."""
    return {t.native_id for t in threading.enumerate()
            if t.name.startswith("lnsp-") and t.native_id is not None}


class Watchdog(threading.Thread):
    """Every phase change and every `progress()` is an event; the time since the last
    event is held against the current phase's budget: the start-up timeout until the
    first step, then what `PhaseBudgets` learned from the run's own steps (capped by
    the stall timeout). The same events charge the wall time to goodput categories,
    and step completions feed the slowdown detector."""

    def __init__(self, startup_timeout: float, stall_timeout: float, on_stall: str,
                 dumper, log, on_exit=None, label: str = "", describe=None, on_tick=(),
                 slow_window: float = 0.0, diagnose=None, busy=None):
        from lnsp.guard.budgets import Goodput, PhaseBudgets, PhaseClock, SlowDetector

        super().__init__(name="lnsp-watchdog", daemon=True)
        self.startup_timeout, self.stall_timeout = startup_timeout, stall_timeout
        self.on_stall, self.dumper, self.log = on_stall, dumper, log
        self.on_exit = on_exit  # called with the phase before a stall exit
        self.label = label
        self.describe = describe  # extra words for the stall line (which rank stalled)
        # Optional: starts the diagnosis of this process (an lnsp.diagnose.hangbundle.Explanation)
        # after the stall line and the dump, in its own thread, waited for with a bound.
        self.diagnose = diagnose
        # Optional (the guard of a user's script): True while the process is at work
        # (CPU), so a phase it did not name runs past its learned budget up to the stall
        # timeout, the hard ceiling; a process blocked at no CPU is judged at the budget.
        self.busy = busy
        self.on_tick = list(on_tick)  # called from this thread every tick (stop notices)
        self.started_steps = False
        self.budgets = PhaseBudgets(ceiling=stall_timeout)
        self.goodput = Goodput()
        self.clock = PhaseClock(self.goodput, Phase.STARTUP, now=_process_start_monotonic())
        self.slow = SlowDetector(window=slow_window) if slow_window > 0 else None
        self.slow_since: float | None = None
        self.stalled_interval = False  # the current interval was reported as a stall
        self.paused_interval = False  # the process was paused during the current interval
        self.continued = False  # set by the SIGCONT handler, cleared by the next tick
        self._phase = Phase.STARTUP
        self._changed: dict = {}  # budgets changed since the last step, logged at its end
        self._events = threading.Lock()
        self.last = time.monotonic()
        # Not `_stop`: threading.Thread._stop is a method that join() and is_alive()
        # call once the thread has ended; an Event there makes them raise TypeError.
        self._stopping = threading.Event()

    # ------------------------------------------------------------ events (main thread)
    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        # Before the first step only progress() resets the clock: the start-up budget
        # covers the whole first step (the probe's timeout is for the whole probe).
        self._event(name, reset=self.started_steps)

    def progress(self, phase: str | None = None) -> None:
        """A unit of work finished: reset the clock (and maybe change phase)."""
        self._event(phase or self._phase)

    def step_done(self) -> None:
        """An optimizer step finished: steps are guarded by learned budgets from now on."""
        self._event(Phase.STEP_END)
        self.started_steps = True
        if self._changed:
            changed, self._changed = self._changed, {}
            self.log(f"[WATCHDOG] {self.label}budgets learned (longest x "
                     f"{self.budgets.factor:g}, floor {self.budgets.floor:g}s, ceiling "
                     f"{self.budgets.ceiling:g}s): "
                     + ", ".join(f"{p} {b:.1f}s" for p, b in sorted(changed.items())))
        if self.slow:
            self.slow.step(time.monotonic())

    def _event(self, phase: str, reset: bool = True) -> None:
        phase = str(phase)  # a Phase or a script's own name: plain text in every record
        now = time.monotonic()
        with self._events:
            previous, stalled = self._phase, self.stalled_interval
            paused, self.paused_interval = self.paused_interval, False
            if stalled:  # the time of a reported stall is lost time
                self.clock.phase = Phase.STALLED
                self.stalled_interval = False
            spent = self.clock.enter(phase, now)
            # Neither a stall nor a pause is a duration to learn from: the budget would
            # grow to it.
            if self.started_steps and previous != Phase.STARTUP and not stalled and not paused:
                changed = self.budgets.observe(previous, spent)
                if changed is not None:
                    self._changed[previous] = changed
            if self.slow and phase in PAUSES:
                self.slow.pause(now)
            elif self.slow:
                self.slow.resume(now)
            self._phase = phase
            if reset:
                self.last = now

    def account(self) -> None:
        """Charge the time up to now to the current phase (goodput is read after)."""
        with self._events:
            self.clock.flush()

    def budget(self) -> float:
        if not self.started_steps:
            return self.startup_timeout
        return self.budgets.budget(self._phase)

    def stop(self) -> None:
        self._stopping.set()

    def start(self) -> None:
        # SIGCONT ends a pause of the whole process; its handler only notes it (handlers
        # are installed from the main thread, where the watchdog is started).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCONT, self._on_continue)
        super().start()

    def _on_continue(self, signum, frame) -> None:
        self.continued = True

    def _resumed(self, since: float, now: float) -> None:
        """The process was paused from about `since` to `now`: restart the stall clock,
        charge the gap to goodput as paused and keep it out of the learned budgets. A long
        pause (Ctrl-Z for minutes) is left out of the slowdown window too; short ones in
        a row are what a throttled run looks like (a CPU quota, App Nap), so they count."""
        with self._events:
            since = max(since, self.clock.since)
            current = self.clock.phase
            self.clock.enter(current, since)
            self.clock.phase = Phase.PAUSED
            self.clock.enter(current, now)
            self.paused_interval = True
            if self.slow and now - since > PAUSE_GAP_S:
                self.slow.skip(since, now)
            self.last = now

    # ------------------------------------------------------------ the thread
    def run(self) -> None:
        self._fired_at = None
        ticked = time.monotonic()
        while not self._stopping.wait(TICK_S):
            now = time.monotonic()
            # The wait alone came back far later than due: the whole process was paused.
            if self.continued or now - ticked > PAUSE_GAP_S:  # a pause, not a stall
                self.continued = False
                self._resumed(ticked, now)
            self._tick()
            ticked = time.monotonic()  # after the tick's own work (a dump, a diagnosis)

    def _tick(self) -> None:
        for tick in self.on_tick:
            tick()
        now = time.monotonic()
        self._check_slow(now)
        last, phase = self.last, self._phase
        # The one staleness check, with this phase's learned budget as the stall one.
        s = staleness(last, self.started_steps, self.budgets.budget(phase),
                      self.startup_timeout, now)
        idle, budget = s.idle, s.budget
        if not s.stale:
            self._fired_at = None
            return
        if self.busy and self.started_steps and idle <= self.stall_timeout and self.busy():
            return  # at work past the learned budget: judged at the stall timeout
        if self._fired_at == last:
            return  # already reported this stall; wait for progress
        self._fired_at = last
        self.stalled_interval = True
        self._report_stall(phase, idle, budget)
        verdict = self._verdict()
        if self.on_stall == "exit":
            self.log(f"[WATCHDOG] {self.label}exiting with code {int(ExitCode.STALLED)} "
                     "(--on-stall exit)")
            with self._events:
                self.clock.phase = Phase.STALLED
                self.clock.flush()
            if self.on_exit:
                self.on_exit(phase, verdict)
            os._exit(ExitCode.STALLED)

    def _verdict(self) -> dict | None:
        """The diagnosis of this stall, logged as a [WATCHDOG] VERDICT line; before a
        stall exit also the bundle, which the exit would otherwise cut short."""
        if not self.diagnose:
            return None
        job = self.diagnose()
        verdict = job.wait(VERDICT_WAIT_S)
        if verdict is None:
            self.log(f"[WATCHDOG] {self.label}no verdict within {VERDICT_WAIT_S:g}s; "
                     "the diagnosis goes on in the background")
            return None
        if verdict.get("kind") != "error":
            self.log(f"[WATCHDOG] {self.label}VERDICT {verdict['kind']}: {verdict['summary']} "
                     f"fix: {verdict['fix']} (bundle {verdict.get('bundle')})")
        if self.on_stall == "exit":
            job.wait(0, BUNDLE_WAIT_S)
        return verdict

    def _report_stall(self, phase: str, idle: float, budget: float) -> None:
        from lnsp.guard.mainthread import MainThreadProbe, describe

        kind = "start-up and first step" if not self.started_steps else (
            f"phase '{phase}', learned" if phase in self.budgets.learned() else
            f"phase '{phase}', not yet learned: the stall timeout")
        # One probe for the watchdog's life: a pending call that timed out still runs
        # when the main thread leaves native code, and calls the probe's ctypes
        # callback; a probe freed before then makes that call jump into freed memory
        # (a segfault once the memory is reused, e.g. by the diagnosis that follows).
        if getattr(self, "_probe", None) is None:
            self._probe = MainThreadProbe()
        where = describe(self._probe.runs_python(MAIN_THREAD_PROBE_S))
        extra = self.describe() if self.describe else ""
        self.log(f"[WATCHDOG] {self.label}no progress for {idle:.1f}s in phase '{phase}' "
                 f"(budget {budget:g}s for {kind}); {where}; dumping all threads"
                 + (f"; {extra}" if extra else ""))
        self.last_stall = {"phase": phase, "idle_s": round(idle, 1), "budget_s": budget,
                           "main_thread": where}
        self.dumper.dump("stall")

    def _check_slow(self, now: float) -> None:
        if not self.slow:
            return
        change = self.slow.check(now)
        if change == "slow":
            since = time.time()
            rate = self.slow.rate(now) or 0.0
            self.log(f"[SLOW] {self.label}{rate:.2f} steps/s over the last "
                     f"{self.slow.window:g}s, below a third of this run's best "
                     f"{self.slow.best:.2f}: {slow_context(self.slow.window)}")
            self.slow_since = since  # the heartbeat says slow once the log says why
        elif change == "recovered":
            self.slow_since = None
            self.log(f"[SLOW] {self.label}recovered: {self.slow.rate(now) or 0:.2f} steps/s "
                     f"(best {self.slow.best:.2f})")

    def stall_exit(self, phase: str, verdict: dict | None) -> dict:
        """exit.json's fields for this stall (beside state, code and step): the
        diagnosis as its cause when there is one, else the phase and the main thread."""
        stall = getattr(self, "last_stall", None) or {}
        extra = {"verdict": verdict["kind"], "bundle": verdict.get("bundle")} \
            if cause(verdict) else {}
        return {"cause": cause(verdict) or f"no progress in phase '{phase}'"
                + (f"; {stall['main_thread']}" if stall else ""), "phase": phase, **extra}

    def vitals(self) -> dict:
        """What the heartbeat carries besides the step: learned budgets, slowdown."""
        out = {"budgets": self.budgets.learned(), "slow": self.slow_since is not None}
        if self.slow and self.slow.best:
            out["best_steps_per_s"] = round(self.slow.best, 3)
        return out


MAIN_THREAD_PROBE_S = 1.0


def process_age(pid: int | None = None) -> float:
    """Seconds since this process (or `pid`) started. On Linux from its start tick in
    /proc/<pid>/stat against CLOCK_BOOTTIME, the clock that tick counts on: psutil's
    create_time() adds the boot time of /proc/stat, a whole second, so it can place the
    start up to a second early (0.87 s on one boot here: every attempt's start-up was
    counted that much too long)."""
    try:
        with open(f"/proc/{pid or 'self'}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil

        try:
            return max(0.0, time.time() - psutil.Process(pid).create_time())
        except psutil.Error:
            return 0.0


def process_started() -> float:
    """When this process started (Unix seconds): goodput counts from the exec."""
    return time.time() - process_age()


def _process_start_monotonic() -> float:
    """This process's start on the monotonic clock."""
    return time.monotonic() - process_age()


def slow_context(window: float) -> str:
    """What can be seen from inside when a run crawls: this process's CPU share, CPU
    quota throttling, swapping, who else uses the CPU, and on macOS the power assertion."""
    try:
        import psutil
    except ImportError:  # the guard in a user's interpreter that lacks it
        return "nothing visible from inside (psutil is not installed here)"
    me = psutil.Process()
    parts = []
    try:
        cpu = me.cpu_percent(interval=0.2)
        parts.append(f"this process used {cpu:.0f}% CPU (of {psutil.cpu_count()} cores)")
    except psutil.Error:
        pass
    try:
        st = me.status()
        parts.append(f"state {st}")
    except psutil.Error:
        pass
    from lnsp import system

    quota = system.cgroup_cpu()
    if quota and quota["cores"]:
        parts.append(f"CPU quota {quota['cores']:.2f} cores, throttled "
                     f"{quota['nr_throttled']} times")
    swap = psutil.swap_memory()
    if swap.total and swap.used:
        parts.append(f"swap in use {swap.used / 2**20:.0f} MB (in {swap.sin / 2**20:.0f} MB, "
                     f"out {swap.sout / 2**20:.0f} MB since boot)")
    busy = []
    for p in psutil.process_iter(["pid", "name", "cpu_percent"]):
        if p.info["pid"] != me.pid and (p.info["cpu_percent"] or 0) > 20:
            busy.append(f"{p.info['name']} (pid {p.info['pid']}) {p.info['cpu_percent']:.0f}%")
    if busy:
        parts.append("other busy processes: " + ", ".join(busy[:3]))
    # caffeinate holds the assertion for this PID as a sibling (started by the
    # supervisor or lnsp run with -w PID), not as a parent.
    if system.is_macos() and not system.caffeinate_held(me.pid):
        parts.append("no caffeinate power assertion: App Nap throttles a background process "
                     "(start it with lnsp launch, which holds `caffeinate -i -s -w PID`)")
    return "; ".join(parts) or "nothing visible from inside"


class Heartbeat:
    """heartbeat.json, replaced atomically after every optimizer step, and a check
    that resident memory does not keep growing past the first epoch's level."""

    def __init__(self, path, log, margin_mb: float):
        self.path, self.log, self.margin_mb = path, log, margin_mb
        self.baseline_mb = None
        self.warned_at = None

    @staticmethod
    def rss_mb() -> float:
        """Resident memory now, from /proc (the guard's interpreter may lack psutil);
        elsewhere psutil, else the peak (ru_maxrss: bytes on macOS, KiB on Linux)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            pass
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

    def beat(self, epoch: int, step: int, phase: str, loss: float, samples_per_s: float,
             extra: dict | None = None, at: float | None = None) -> None:
        """`at`: when the step was done (Unix seconds), if not now."""
        RunDir(Path(self.path).parent).write_heartbeat(HeartbeatRecord(
            pid=os.getpid(), time=at or time.time(), host=HOST, epoch=epoch, step=step, phase=phase,
            loss=loss, samples_per_s=samples_per_s, rss_mb=round(self.rss_mb(), 1),
            extra=extra or {}), self.path)

    def epoch_end(self, epoch: int) -> None:
        rss = self.rss_mb()
        if self.baseline_mb is None:
            self.baseline_mb = rss
        elif rss > self.baseline_mb + self.margin_mb and self.warned_at != epoch:
            self.warned_at = epoch
            self.log(f"[MEMORY] warning: resident memory {rss:.0f} MB is "
                     f"{rss - self.baseline_mb:.0f} MB above the first epoch's "
                     f"{self.baseline_mb:.0f} MB (margin {self.margin_mb:g} MB): a leak?")


class GracefulStop:
    """SIGTERM, SIGINT or SIGHUP (the terminal went away: a closed window, a killed tmux
    session) asks for a stop at the next step boundary; a second SIGINT exits at once.
    The handler only sets a flag (a write to the log from inside it could re-enter a
    write the main thread was making); `announce`, called from the loop and the
    watchdog's thread, logs the request once.

    `asks`: whether the program looks at `requested` at its boundaries. lnsp's trainer
    does; a user's script under the guard may never ask (lnsp.guard.should_stop()), and
    then the signal ends it as plain Python would: KeyboardInterrupt on SIGINT,
    SystemExit otherwise, with `requested` set, so its ending is recorded as stopped."""

    def __init__(self, log, asks: bool = True):
        self.log = log
        self.asks = asks
        self.requested: str | None = None
        self._announced = False
        self._lock = threading.Lock()

    def install(self) -> "GracefulStop":
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            os.write(2, b"second SIGINT: exiting now\n")  # async-signal-safe
            os._exit(ExitCode.INTERRUPTED)
        self.requested = signal.Signals(signum).name
        if not self.asks:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    def announce(self, words: str = "stopping after the current step") -> None:
        """Log a pending request, once (never from the signal handler)."""
        if not self.requested or self._announced:
            return
        with self._lock:
            if self._announced:
                return
            self._announced = True
        self.log(f"{self.requested} received: {words}")
