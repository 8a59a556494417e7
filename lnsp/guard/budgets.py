"""What the watchdog learns about a run: per-phase stall budgets from observed
durations, the step rate that counts as a slowdown, and where the wall time went.

Pure bookkeeping with no threads and no I/O, so each piece has a fast unit test; the
watchdog, the loop and the supervisor feed it. The idea of budgets from the longest
observed interval times a safety factor, kept across restarts, is NVIDIA
nvidia-resiliency-ext's (its first iterations are not monitored by a learned budget).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lnsp.guard.phases import Phase

FACTOR = 5.0  # a phase may take this many times its longest observed duration
FLOOR_S = 8.0  # never less: a busy machine or a GC pause is not a hang
WARMUP = 5  # observations of a phase before its learned budget replaces the ceiling


@dataclass
class PhaseBudgets:
    """Per-phase budgets: `ceiling` (the --stall-timeout) until a phase has been seen
    WARMUP times, then max(FLOOR_S, longest * FACTOR), never above the ceiling."""

    ceiling: float
    factor: float = FACTOR
    floor: float = FLOOR_S
    warmup: int = WARMUP
    longest: dict = field(default_factory=dict)  # phase -> longest duration seen (s)
    seen: dict = field(default_factory=dict)  # phase -> observations

    def budget(self, phase: str) -> float:
        if self.seen.get(phase, 0) < self.warmup:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.longest[phase] * self.factor))

    def observe(self, phase: str, seconds: float) -> float | None:
        """Record one duration; returns the phase's new budget when it changed by more
        than 10% (worth a log line), else None."""
        before = self.budget(phase)
        self.seen[phase] = self.seen.get(phase, 0) + 1
        self.longest[phase] = max(self.longest.get(phase, 0.0), seconds)
        after = self.budget(phase)
        return after if abs(after - before) > 0.1 * before else None

    def learned(self) -> dict:
        """The phases whose budget is learned, with their budgets (for status)."""
        return {p: round(self.budget(p), 2) for p in sorted(self.seen)
                if self.seen[p] >= self.warmup}

    def state(self) -> dict:
        """Plain types only (checkpoints are loaded with weights_only=True)."""
        return {"longest": {str(k): v for k, v in self.longest.items()},
                "seen": {str(k): v for k, v in self.seen.items()}}

    def restore(self, state: dict | None) -> None:
        """Budgets kept across a resume: a restarted run is guarded at once."""
        if state:
            self.longest.update({k: float(v) for k, v in state.get("longest", {}).items()})
            self.seen.update({k: int(v) for k, v in state.get("seen", {}).items()})


@dataclass
class SlowDetector:
    """A run whose step rate over the last `window` seconds of training is below `ratio`
    of its own best rate over any earlier window is slow (App Nap, a CPU quota,
    swapping, a noisy neighbour): alive, so no watchdog fires, but crawling.

    The window counts training time only: an evaluation or a checkpoint (a pause) is
    left out of the elapsed time, not a reason to start the window again, so a run that
    checkpoints every N steps is still judged (a window reset by every checkpoint never
    filled at the defaults)."""

    window: float
    ratio: float = 1 / 3
    best: float = 0.0
    slow: bool = False
    first: float | None = None  # training time of the first step (a window needs one)
    steps: deque = field(default_factory=deque)  # training times of recent steps
    paused: float = 0.0  # seconds of pauses so far, not training time
    paused_at: float | None = None  # when the current pause began

    def training_time(self, now: float) -> float:
        """`now` less the pauses: a clock that stands still during a pause."""
        return (self.paused_at if self.paused_at is not None else now) - self.paused

    def step(self, now: float) -> None:
        self.resume(now)  # a step ends any pause
        t = self.training_time(now)
        if self.first is None:
            self.first = t
        self.steps.append(t)

    def rate(self, now: float) -> float | None:
        """Steps per second over the last window, None until a whole window is seen."""
        t = self.training_time(now)
        while self.steps and self.steps[0] < t - self.window:
            self.steps.popleft()
        if self.first is None or t - self.first < self.window:
            return None
        return len(self.steps) / self.window

    def check(self, now: float) -> str | None:
        """'slow' when the run just became slow, 'recovered' when it just recovered."""
        rate = self.rate(now)
        if rate is None:
            return None
        if not self.slow:
            self.best = max(self.best, rate)
        if not self.slow and self.best > 0 and rate < self.ratio * self.best:
            self.slow = True
            return "slow"
        if self.slow and rate >= 0.5 * self.best:
            self.slow = False
            return "recovered"
        return None

    def pause(self, now: float) -> None:
        """An evaluation or a checkpoint begins: not training time, until `resume`."""
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is not None:
            self.paused += max(0.0, now - self.paused_at)
            self.paused_at = None

    def skip(self, start: float, end: float) -> None:
        """The process itself was paused from `start` to `end` (SIGSTOP, a laptop's
        sleep): not training time either (inside a pause it is already left out)."""
        if self.paused_at is None:
            self.paused += max(0.0, end - start)


# Goodput: where the wall time of a run went. Categories sum to the wall time.
CATEGORIES = ("training", "startup", "evaluation", "checkpoint", "stalled", "redone", "paused",
              "other")
PHASE_CATEGORY = {
    Phase.STARTUP: "startup", Phase.LOAD_DATA: "startup", Phase.RENDEZVOUS: "startup",
    Phase.INDEX: "startup",
    Phase.LOAD: "training", Phase.FORWARD: "training", Phase.RETRIEVE: "training",
    Phase.LOSS: "training", Phase.BACKWARD: "training", Phase.OPTIMIZER: "training",
    Phase.TRAIN: "training", Phase.SYNC: "training", Phase.STEP_END: "training",
    Phase.EVALUATE: "evaluation", Phase.CALIBRATE: "evaluation", Phase.BARRIER: "evaluation",
    Phase.CHECKPOINT: "checkpoint", Phase.STALLED: "stalled",
    Phase.PAUSED: "paused",  # the whole process stopped (SIGSTOP, Ctrl-Z, sleep): not a stall
}


@dataclass
class Goodput:
    """Seconds per category, accumulated across restarts (kept in the checkpoint and
    goodput.json). `redone` is the training time of steps a restart had to repeat."""

    seconds: dict = field(default_factory=lambda: {c: 0.0 for c in CATEGORIES})

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[PHASE_CATEGORY.get(phase, "other")] += max(0.0, seconds)

    def move(self, source: str, target: str, seconds: float) -> None:
        """Reclassify time already counted (a stall found after the fact)."""
        seconds = min(seconds, self.seconds[source])
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def wall(self) -> float:
        return sum(self.seconds.values())

    def shares(self) -> dict:
        wall = self.wall()
        return {c: (s / wall if wall else 0.0) for c, s in self.seconds.items()}

    def summary(self) -> dict:
        wall = self.wall()
        return {"wall_s": round(wall, 3),
                "seconds": {c: round(s, 3) for c, s in self.seconds.items()},
                "shares": {c: round(v, 4) for c, v in self.shares().items()},
                "goodput": round(self.seconds["training"] / wall, 4) if wall else 0.0}

    def state(self) -> dict:
        return dict(self.seconds)

    def restore(self, state: dict | None) -> None:
        """Add the seconds of earlier attempts (this attempt's own are kept)."""
        for c, s in (state or {}).items():
            if c in self.seconds:
                self.seconds[c] += float(s)


class PhaseClock:
    """Charges the time between phase changes to the phase that was running: every
    second of the process's life lands in exactly one category."""

    def __init__(self, goodput: Goodput, phase: str = Phase.STARTUP, now: float | None = None):
        self.goodput, self.phase = goodput, phase
        self.since = time.monotonic() if now is None else now

    def enter(self, phase: str, now: float | None = None) -> float:
        """Switch phase; returns how long the previous one ran."""
        now = time.monotonic() if now is None else now
        spent = now - self.since
        self.goodput.add(self.phase, spent)
        self.phase, self.since = phase, now
        return spent

    def flush(self, now: float | None = None) -> None:
        self.enter(self.phase, now)
