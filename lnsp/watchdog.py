"""The watchdog thread, the heartbeat file and graceful stop.

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

import psutil

from lnsp.rundir import write_json

STALL_EXIT_CODE = 3
HOST = socket.gethostname()


class Watchdog(threading.Thread):
    def __init__(self, startup_timeout: float, stall_timeout: float, on_stall: str,
                 dumper, log, on_exit=None, label: str = "", describe=None):
        super().__init__(name="lnsp-watchdog", daemon=True)
        self.startup_timeout, self.stall_timeout = startup_timeout, stall_timeout
        self.on_stall, self.dumper, self.log = on_stall, dumper, log
        self.on_exit = on_exit  # called with the phase before a stall exit
        self.label = label
        self.describe = describe  # extra words for the stall line (which rank stalled)
        self.phase = "startup"
        self.started_steps = False
        self.last = time.monotonic()
        self._stop = threading.Event()

    def progress(self, phase: str | None = None) -> None:
        """A unit of work finished: reset the clock (and leave start-up)."""
        self.last = time.monotonic()
        if phase:
            self.phase = phase

    def first_step_done(self) -> None:
        self.started_steps = True
        self.progress()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        fired_at = None
        while not self._stop.wait(0.25):
            budget = self.stall_timeout if self.started_steps else self.startup_timeout
            idle = time.monotonic() - self.last
            if idle <= budget:
                fired_at = None
                continue
            if fired_at == self.last:
                continue  # already reported this stall; wait for progress
            fired_at = self.last
            kind = "step" if self.started_steps else "start-up and first step"
            extra = self.describe() if self.describe else ""
            self.log(f"[WATCHDOG] {self.label}no progress for {idle:.1f}s in phase "
                     f"'{self.phase}' (budget {budget:g}s for {kind}); dumping all threads"
                     + (f"; {extra}" if extra else ""))
            self.dumper.dump("stall")
            if self.on_stall == "exit":
                self.log(f"[WATCHDOG] {self.label}exiting with code {STALL_EXIT_CODE} "
                         "(--on-stall exit)")
                if self.on_exit:
                    self.on_exit(self.phase)
                os._exit(STALL_EXIT_CODE)


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

    def beat(self, epoch: int, step: int, phase: str, loss: float, samples_per_s: float,
             **extra) -> None:
        write_json(self.path, {"pid": os.getpid(), "host": HOST, "epoch": epoch, "step": step,
                               "phase": phase, "loss": loss,
                               "samples_per_s": samples_per_s,
                               "rss_mb": round(self.rss_mb(), 1), "time": time.time(), **extra},
                   durable=False)

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
    exits at once. The handler only sets a flag: the loop acts on it."""

    def __init__(self, log):
        self.log = log
        self.requested = None

    def install(self) -> "GracefulStop":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            os.write(2, b"second SIGINT: exiting now\n")
            os._exit(130)
        self.requested = name
        self.log(f"{name} received: stopping after the current step")
