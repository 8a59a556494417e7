"""Fast unit tests of what the watchdog learns: phase budgets, slowdowns, goodput and
which endings a restart can fix."""

from lnsp.guard.budgets import Goodput, PhaseBudgets, PhaseClock, SlowDetector
from lnsp.guard.restarts import classify_ending, crash_loop


def test_a_phase_is_guarded_by_the_ceiling_until_seen_then_by_its_longest_times_factor():
    b = PhaseBudgets(ceiling=120.0)
    for _ in range(4):
        assert b.observe("forward", 0.05) is None
        assert b.budget("forward") == 120.0
    assert b.observe("forward", 0.05) == 8.0  # the floor, logged as a change
    assert b.budget("forward") == 8.0
    b.observe("forward", 2.0)
    assert b.budget("forward") == 10.0  # longest x 5
    b.observe("forward", 100.0)
    assert b.budget("forward") == 120.0  # never above the ceiling
    assert b.budget("evaluate") == 120.0  # unseen phases keep the ceiling
    assert b.learned() == {"forward": 120.0}


def test_budgets_survive_a_resume_through_plain_types():
    b = PhaseBudgets(ceiling=60.0)
    for _ in range(6):
        b.observe("retrieve", 0.4)
    state = b.state()
    assert all(isinstance(v, (int, float)) for d in state.values() for v in d.values())
    again = PhaseBudgets(ceiling=60.0)
    again.restore(state)
    assert again.budget("retrieve") == b.budget("retrieve") == 8.0


def test_slow_when_the_rate_falls_below_a_third_of_the_best_and_back():
    d = SlowDetector(window=10.0)
    t = 0.0
    events = []
    for _ in range(300):  # 10 steps/s for 30 s
        t += 0.1
        d.step(t)
        events.append(d.check(t))
    assert "slow" not in events and d.best >= 9.0
    for _ in range(20):  # then 2 steps/s for 10 s
        t += 0.5
        d.step(t)
        events.append(d.check(t))
    assert events.count("slow") == 1 and d.slow
    for _ in range(200):
        t += 0.1
        d.step(t)
        events.append(d.check(t))
    assert events[-200:].count("recovered") == 1 and not d.slow


def test_a_pause_for_evaluation_is_not_a_slowdown():
    d = SlowDetector(window=5.0)
    t = 0.0
    for _ in range(100):
        t += 0.1
        d.step(t)
        d.check(t)
    d.pause(t)  # an evaluation begins (the watchdog's phase change): no steps for 30 s
    t += 30.0
    assert d.check(t) is None
    for _ in range(100):
        t += 0.1
        d.step(t)
        assert d.check(t) != "slow"


def test_a_slowdown_is_flagged_within_a_window_despite_a_checkpoint_every_few_steps():
    """At the defaults (a 60 s window, a checkpoint every 100 steps) a run stepping faster
    than ~2 steps/s was never judged: every checkpoint started the window again. Only
    training time counts now: a checkpoint is left out of the window, not a reset."""
    d = SlowDetector(window=10.0)
    t, steps, flagged = 0.0, 0, []

    def run(seconds, rate):
        nonlocal t, steps
        end = t + seconds
        while t < end:
            t += 1 / rate
            d.step(t)
            steps += 1
            if d.check(t) == "slow":
                flagged.append(t)
            if steps % 20 == 0:  # a checkpoint every 20 steps, 0.5 s each
                d.pause(t)
                t += 0.5

    run(30, 10.0)  # 10 steps/s: a checkpoint every 2 s of training
    assert not flagged and d.best >= 9.0, d.best
    throttled = t
    run(30, 2.0)  # a 5x slowdown, still checkpointing every 20 steps
    assert flagged, "the slowdown was never flagged"
    assert flagged[0] - throttled < 10.0 + 1.0, flagged[0] - throttled  # about one window


def test_goodput_shares_add_up_to_the_wall_time():
    g = Goodput()
    clock = PhaseClock(g, now=0.0)
    for phase, t in [("index", 2.0), ("forward", 3.0), ("evaluate", 7.0), ("checkpoint", 7.5),
                     ("barrier", 8.0), ("optimizer", 9.0), ("mystery", 10.0)]:
        clock.enter(phase, now=t)
    clock.flush(now=10.5)
    s = g.summary()
    assert s["wall_s"] == 10.5
    assert s["seconds"]["startup"] == 3.0  # startup, then index
    assert s["seconds"]["training"] == 4.0 + 1.0  # forward, then optimizer
    assert s["seconds"]["evaluation"] == 0.5 + 1.0  # evaluate, then barrier
    assert s["seconds"]["checkpoint"] == 0.5
    assert s["seconds"]["other"] == 0.5
    assert abs(sum(s["shares"].values()) - 1.0) < 1e-3
    g.move("training", "stalled", 2.0)
    assert g.seconds["stalled"] == 2.0 and g.wall() == 10.5


def test_endings_a_restart_cannot_fix_are_named():
    assert classify_ending(2, {"state": "failed"}) == "bad-input"
    assert classify_ending(1, {"error": "TrainingError: non-finite loss (loss nan)"}) \
        == "non-finite"
    assert classify_ending(1, {"error": "RuntimeError: DefaultCPUAllocator: can't allocate "
                                        "memory: you tried to allocate ... out of memory"}) \
        == "out-of-memory"
    assert classify_ending(3, {"state": "stalled"}) == "stall"
    assert classify_ending(-11, None) == "crash"
    assert classify_ending(0, {"state": "stopped"}) == "stopped"


def test_a_crash_loop_is_two_restarts_without_checkpoint_progress():
    # The checkpoint step each attempt started from, then where the last one left it.
    assert not crash_loop([0, 0])  # the first attempt failed: a restart may help
    assert not crash_loop([0, 0, 0])  # one restart without progress: try again
    assert crash_loop([0, 0, 0, 0])  # two restarts in a row without progress
    assert not crash_loop([0, 40, 40, 80])  # the last restart moved on
    assert crash_loop([0, 40, 40, 40])
    assert not crash_loop([0, 40, 80, 80])  # only the latest made none
