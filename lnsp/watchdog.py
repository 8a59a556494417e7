"""The watchdog thread, the heartbeat writer and graceful stop.

The watchdog starts before data loading: a loose budget for start-up and the first
step, then `stall_timeout` between steps. On a stall it logs a [WATCHDOG] line, dumps
every thread and either keeps waiting or exits with code 3.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil

from lnsp.rundir import ExitCode, Heartbeat as HeartbeatRecord, RunDir, staleness

HOST = socket.gethostname()
TICK_S = 0.25


class Watchdog(threading.Thread):
    def __init__(self, startup_timeout: float, stall_timeout: float, on_stall: str,
                 dumper, log, on_exit=None, label: str = "", describe=None, on_tick=()):
        super().__init__(name="lnsp-watchdog", daemon=True)
        self.startup_timeout, self.stall_timeout = startup_timeout, stall_timeout
        self.on_stall, self.dumper, self.log = on_stall, dumper, log
        self.on_exit = on_exit  # called with the phase before a stall exit
        self.label = label
        self.describe = describe  # extra words for the stall line (which rank stalled)
        self.on_tick = list(on_tick)  # called from this thread every tick (stop notices)
        self.phase = "startup"
        self.started_steps = False
        self.last = time.monotonic()
        # Not `_stop`: threading.Thread._stop is a method that join() and is_alive()
        # call once the thread has ended; an Event there makes them raise TypeError.
        self._stopping = threading.Event()

    def progress(self, phase: str | None = None) -> None:
        """A unit of work finished: reset the clock (and leave start-up)."""
        self.last = time.monotonic()
        if phase:
            self.phase = phase

    def first_step_done(self) -> None:
        self.started_steps = True
        self.progress()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        fired_at = None
        while not self._stopping.wait(TICK_S):
            for tick in self.on_tick:
                tick()
            last = self.last
            s = staleness(last, self.started_steps, self.stall_timeout, self.startup_timeout,
                          time.monotonic())
            if not s.stale:
                fired_at = None
                continue
            if fired_at == last:
                continue  # already reported this stall; wait for progress
            fired_at = last
            extra = self.describe() if self.describe else ""
            self.log(f"[WATCHDOG] {self.label}no progress for {s.idle:.1f}s in phase "
                     f"'{self.phase}' (budget {s.budget:g}s for {s.kind}); dumping all threads"
                     + (f"; {extra}" if extra else ""))
            self.dumper.dump("stall")
            if self.on_stall == "exit":
                self.log(f"[WATCHDOG] {self.label}exiting with code {int(ExitCode.STALLED)} "
                         "(--on-stall exit)")
                if self.on_exit:
                    self.on_exit(self.phase)
                os._exit(ExitCode.STALLED)


class Heartbeat:
    """heartbeat.json, replaced atomically after every optimizer step, and a check
    that resident memory does not keep growing past the first epoch's level."""

    def __init__(self, path, log, margin_mb: float):
        self.path, self.log, self.margin_mb = path, log, margin_mb
        self.process = psutil.Process()
        self.baseline_mb = None
        self.warned_at = None

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / 2**20

    def beat(self, epoch: int, step: int, phase: str, loss: float, samples_per_s: float) -> None:
        RunDir(Path(self.path).parent).write_heartbeat(HeartbeatRecord(
            pid=os.getpid(), time=time.time(), host=HOST, epoch=epoch, step=step, phase=phase,
            loss=loss, samples_per_s=samples_per_s, rss_mb=round(self.rss_mb(), 1)), self.path)

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
    """SIGTERM or SIGINT asks for a stop at the next step boundary; a second SIGINT
    exits at once. The handler only sets a flag (a write to the log from inside it
    could re-enter a write the main thread was making); `announce`, called from the
    loop and the watchdog's thread, logs the request once."""

    def __init__(self, log):
        self.log = log
        self.requested: str | None = None
        self._announced = False
        self._lock = threading.Lock()

    def install(self) -> "GracefulStop":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            os.write(2, b"second SIGINT: exiting now\n")  # async-signal-safe
            os._exit(ExitCode.INTERRUPTED)
        self.requested = signal.Signals(signum).name

    def announce(self) -> None:
        """Log a pending request, once (never from the signal handler)."""
        if not self.requested or self._announced:
            return
        with self._lock:
            if self._announced:
                return
            self._announced = True
        self.log(f"{self.requested} received: stopping after the current step")
