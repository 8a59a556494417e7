"""Progress where a person waits: a bar with rate and ETA when stderr is a terminal, else
one flushed line per interval (never a carriage return, so logs stay line by line).

LNSP_PROGRESS=bar|lines|off forces a mode (default: bar on a terminal, else lines).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque

REDRAW_S = 0.1  # a terminal bar is redrawn at most this often
_active: list["Progress"] = []  # bars on a terminal now: a printed line must clear them


def format_eta(seconds: float | None) -> str:
    """`1:02:03`, `2:03` or `-` (unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Rate:
    """The recent rate of a count: over the last `window` seconds (at least two
    samples), so an ETA follows the current speed, not the start-up's."""

    def __init__(self, window: float = 30.0):
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, done: float, now: float) -> None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining: float) -> float | None:
        """Seconds to do `remaining` more at the recent rate (None while unknown)."""
        rate = self.per_s()
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate else None


def mode(stream) -> str:
    forced = os.environ.get("LNSP_PROGRESS", "").lower()
    if forced in ("bar", "lines", "off"):
        return forced
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


class Progress:
    """`with Progress(total, "index") as bar: bar.update(n)`. On a terminal: a bar
    redrawn in place; elsewhere: one line every `interval` seconds (none for a task
    shorter than that), and a last line when it ends if any was printed. `lines=False`
    keeps it off a non-terminal altogether (the training log has its own line)."""

    def __init__(self, total: float | None, label: str, unit: str = "it", stream=None,
                 interval: float = 10.0, initial: float = 0, lines: bool = True,
                 delay: float = 1.0, clock=time.monotonic):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.interval, self.delay, self.clock = interval, delay, clock
        self.done, self.note = initial, ""
        self.mode = mode(self.stream)
        if self.mode == "lines" and not lines:
            self.mode = "off"
        self.rate = Rate()
        self.start = self._last_draw = self.clock()
        self.rate.add(initial, self.start)
        self._printed, self._line_done = False, None
        self._closed = self._staged = self._drawn = False
        if self.mode == "bar":
            _active.append(self)

    # ---------------------------------------------------------------- counting
    def update(self, n: float = 1, note: str | None = None) -> None:
        self.set(self.done + n, note)

    def set(self, done: float, note: str | None = None) -> None:
        self.done = done
        if note is not None:
            self.note = note
        now = self.clock()
        self.rate.add(done, now)
        if self.mode == "bar" and now - self._last_draw >= REDRAW_S \
                and (self._drawn or now - self.start >= self.delay):
            self._draw(now)
        elif self.mode == "lines" and now - self._last_draw >= self.interval:
            self._line(now)

    def stage(self, message: str) -> None:
        """A task of named stages: the message becomes the note; the stage before it is
        counted done. Use as an `echo`."""
        if self._staged:
            self.done += 1
        self._staged = True
        self.set(self.done, message)
        if self.mode == "bar":  # stages are rare: each is shown at once
            self._draw(self.clock())

    def write(self, line: str, echo=None) -> None:
        """Print a line through `echo` (default: stdout) without tearing the bar."""
        self.clear()
        (echo or (lambda text: print(text, flush=True)))(line)
        if self.mode == "bar" and self._drawn:
            self._draw(self.clock())

    def eta(self) -> float | None:
        return None if self.total is None else self.rate.eta(self.total - self.done)

    # ---------------------------------------------------------------- drawing
    def text(self, width: int | None = None) -> str:
        rate = self.rate.per_s()
        count = f"{self.done:g}" + (f"/{self.total:g}" if self.total is not None else "")
        rate_text = "-" if rate is None else (f"{rate:.1f}" if rate < 100 else f"{rate:.0f}")
        tail = f" {count} {rate_text} {self.unit}/s ETA {format_eta(self.eta())}"
        if self.note:
            tail += f" {self.note}"
        if width is None or self.total is None or not self.total:
            pct = f" {100 * self.done / self.total:.0f}%" if self.total else ""
            return f"{self.label}:{pct}{tail}"
        head = f"{self.label} {100 * min(self.done / self.total, 1):3.0f}% |"
        cells = max(10, min(40, width - len(head) - len(tail) - 2))
        filled = int(cells * min(self.done / self.total, 1))
        return (head + "#" * filled + "-" * (cells - filled) + "|" + tail)[:width - 1]

    def _draw(self, now: float) -> None:
        width = _columns(self.stream)
        self.stream.write("\r" + self.text(width) + "\x1b[K")
        self.stream.flush()
        self._last_draw, self._drawn = now, True

    def _line(self, now: float) -> None:
        self.stream.write(self.text() + "\n")
        self.stream.flush()
        self._last_draw, self._printed, self._line_done = now, True, self.done

    def clear(self) -> None:
        if self.mode == "bar" and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._staged:  # the last stage is done when the task is
            self.done += 1
            self.rate.add(self.done, self.clock())
        now = self.clock()
        if self.mode == "bar":
            _active.remove(self)
            if self._drawn:  # a task shorter than `delay` leaves no bar behind
                self._draw(now)
                self.stream.write("\n")
                self.stream.flush()
        elif self.mode == "lines" and self._printed and self._line_done != self.done:
            self._line(now)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def echo(line: str, stream=None) -> None:
    """Print a line without tearing a bar on the terminal: clear it, print, redraw."""
    for bar in _active:
        bar.clear()
    print(line, file=stream or sys.stdout, flush=True)
    for bar in _active:
        if bar._drawn:
            bar._draw(bar.clock())


def _columns(stream) -> int:
    """The width of the terminal the bar is drawn on (its own stream's, not stdout's);
    COLUMNS, then 100, where that terminal does not tell."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or shutil.get_terminal_size((100, 24)).columns
