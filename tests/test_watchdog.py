"""The watchdog thread and graceful stop, in this process: the thread joins, and a
signal handler only sets a flag (the log is written outside it)."""

import os
import signal

from conftest import wait_until
from lnsp.guard.watchdog import GracefulStop, Watchdog


class NoDumps:
    def dump(self, reason):
        raise AssertionError(f"unexpected dump ({reason})")


def test_watchdog_joins_after_stop():
    said = []
    dog = Watchdog(60, 60, "dump", NoDumps(), said.append)
    dog.start()
    dog.stop()
    dog.join(5)  # Thread.join calls Thread._stop once the thread ends: not shadowed
    assert not dog.is_alive() and said == []


def test_watchdog_ticks_announce_a_stop_while_the_loop_is_busy():
    said = []
    stop = GracefulStop(said.append)
    stop.requested = "SIGTERM"
    dog = Watchdog(60, 60, "dump", NoDumps(), said.append, on_tick=[stop.announce])
    dog.start()
    try:
        wait_until(lambda: said, 5, what="the stop logged from the watchdog's thread")
    finally:
        dog.stop()
        dog.join(5)
    stop.announce()  # the loop's own call at the step boundary logs nothing more
    assert said == ["SIGTERM received: stopping after the current step"]


def test_the_signal_handler_only_sets_a_flag():
    said = []
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = GracefulStop(said.append).install()
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: stop.requested, 5, what="the handler to run")
        assert stop.requested == "SIGTERM" and said == []  # nothing written in the handler
        stop.announce()
        assert said == ["SIGTERM received: stopping after the current step"]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_reported_stall_is_charged_as_stalled_and_not_learned_as_a_duration():
    said = []
    dog = Watchdog(60, 60, "dump", NoDumps(), said.append)
    dog.step_done()  # steps have started: phase durations are learned from now on
    dog.phase = "forward"
    dog.stalled_interval = True  # what the thread sets when it reports a stall
    dog.phase = "loss"
    assert "forward" not in dog.budgets.seen
    assert dog.goodput.seconds["stalled"] > 0
    dog.phase = "backward"
    assert dog.budgets.seen["loss"] == 1


def test_the_heartbeat_says_slow_only_once_the_log_says_why():
    """`lnsp status` shows slow from the heartbeat; a reader who then opens the log
    must find the [SLOW] line there."""
    seen = []
    dog = Watchdog(60, 60, "dump", NoDumps(), lambda line: seen.append(
        (line, dog.vitals()["slow"])), slow_window=1.0)
    for i in range(101):  # 100 steps/s over the first window: the run's best
        dog.slow.step(i / 100)
    dog._check_slow(1.0)
    assert seen == [] and not dog.vitals()["slow"]
    dog._check_slow(2.5)  # no step for longer than a window
    assert [line for line, _ in seen if "[SLOW]" in line], seen
    assert [slow for _, slow in seen] == [False]  # not yet slow while the line is written
    assert dog.vitals()["slow"]


def test_a_process_start_is_placed_within_its_launch_not_a_second_early():
    """Goodput counts each attempt from its process's start. psutil's create_time() adds
    a whole-second boot time and can place the start up to a second early (0.87 s on one
    boot here), which over-counted every attempt's start-up; the start read against
    CLOCK_BOOTTIME falls between the launch and the answer."""
    import subprocess
    import sys
    import time

    from conftest import env

    code = "import time; from lnsp.guard.watchdog import process_started; " \
           "print(process_started(), time.time())"
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env(), timeout=60).stdout.split()
    started, now = float(out[0]), float(out[1])
    assert before - 0.02 <= started <= now, (before, out)
