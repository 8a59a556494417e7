"""The progress helper: a bar on a real terminal (a pseudo-terminal), flushed lines
without carriage returns elsewhere, rate and ETA from the recent rate."""

import fcntl
import io
import os
import select
import struct
import termios

import pytest

from lnsp.progress import Progress, Rate, format_eta


def terminal(columns: int = 100) -> tuple[int, int]:
    """A pseudo-terminal of `columns` columns: (master, slave) descriptors."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def read_all(fd) -> str:
    """Everything written to the terminal so far (a pty hands it over in pieces)."""
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def no_forced_mode(monkeypatch):
    monkeypatch.delenv("LNSP_PROGRESS", raising=False)


def test_eta_follows_the_recent_rate_not_the_start():
    rate = Rate(window=10)
    rate.add(0, 0.0)
    rate.add(1, 30.0)  # a slow start (index build, warm-up)
    for t in range(31, 61):
        rate.add(1 + (t - 30) * 2, float(t))  # then 2 per second
    assert rate.per_s() == pytest.approx(2.0)
    assert rate.eta(100) == pytest.approx(50.0)
    assert rate.eta(0) == 0.0 and Rate().eta(5) is None
    assert [format_eta(s) for s in (None, 5, 65, 3725)] == ["-", "0:05", "1:05", "1:02:05"]


def test_lines_when_not_a_terminal_one_per_interval_no_carriage_return():
    out, clock = io.StringIO(), Clock()
    with Progress(100, "index", unit="rows", stream=out, interval=10, clock=clock) as bar:
        for _ in range(100):
            clock.now += 0.5
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == 5, lines  # 50 s of work, one line per 10 s, no repeated last line
    assert lines[0] == "index: 20% 20/100 2.0 rows/s ETA 0:40"
    assert lines[-1].startswith("index: 100% 100/100")


def test_a_short_task_prints_nothing_off_a_terminal_and_lines_false_keeps_it_off():
    out, clock = io.StringIO(), Clock()
    with Progress(10, "quick", stream=out, clock=clock) as bar:
        bar.update(10)
    with Progress(10, "train", stream=out, interval=0, lines=False, clock=clock) as bar:
        clock.now += 5
        bar.update(5)
    assert out.getvalue() == ""


def test_bar_on_a_terminal_redraws_in_place_with_rate_and_eta():
    master, slave = terminal()
    stream = os.fdopen(slave, "w")
    clock = Clock()
    try:
        bar = Progress(40, "train", unit="step", stream=stream, clock=clock)
        assert bar.mode == "bar"
        for _ in range(10):
            clock.now += 1
            bar.update(1, note="loss 1.2345")
        bar.close()
        stream.flush()
        text = read_all(master)
    finally:
        stream.close()
        os.close(master)
    frames = [f for f in text.split("\r") if f.strip()]
    assert len(frames) == 11, frames  # one redraw per update (>= 0.1 s apart) and the last
    last = frames[-1]
    assert "train  25% |##########" in last and "10/40 1.0 step/s ETA 0:30 loss 1.2345" in last
    assert text.endswith("\n")  # the finished bar stays on screen


def test_stages_count_as_done_when_the_next_begins_and_at_close():
    out, clock = io.StringIO(), Clock()
    bar = Progress(3, "bench", unit="part", stream=out, interval=0, clock=clock)
    for name in ("one", "two", "three"):
        clock.now += 10
        bar.stage(name)
    assert bar.done == 2
    bar.close()
    assert bar.done == 3 and out.getvalue().splitlines()[-1].startswith("bench: 100% 3/3")


def test_a_task_shorter_than_the_delay_leaves_no_bar_on_a_terminal():
    master, slave = terminal()
    stream = os.fdopen(slave, "w")
    clock = Clock()
    try:
        with Progress(10, "index", stream=stream, delay=1.0, clock=clock) as bar:
            clock.now += 0.5
            bar.update(10)
            bar.write("a line", echo=lambda text: stream.write(text + "\n"))
        stream.flush()
        text = read_all(master)
    finally:
        stream.close()
        os.close(master)
    assert text.replace("\r\n", "\n") == "a line\n"


def test_the_bar_fits_the_terminal_it_is_drawn_on():
    master, slave = terminal(60)
    stream = os.fdopen(slave, "w")
    clock = Clock()
    try:
        bar = Progress(40, "train", unit="step", stream=stream, clock=clock)
        for _ in range(10):
            clock.now += 1
            bar.update(1, note="loss 1.2345")
        stream.flush()
        text = read_all(master)
    finally:
        stream.close()
        os.close(master)
    frames = [f.replace("\x1b[K", "") for f in text.split("\r") if f.strip()]
    assert frames and all(len(f) <= 59 for f in frames), frames
    assert "|##" in frames[-1], frames  # still a bar, narrower
