"""The watchdog that learns the run, with real processes: a mid-run stall caught at the
default settings within seconds, a long evaluation that is not a stall, native code
told from Python, a throttled run shown slow, a crash loop stopped, and goodput."""

import json
import os
import signal
import threading
import time

import pytest

from conftest import FAST_TRAIN, MACOS, finish, lnsp, read_json, spawn, wait_until


def marker_run(small_data, tmp_path, *extra, fault, at_step, once=False, command="train"):
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    os.mkfifo(gate)
    run = tmp_path / "run"
    env = {"LNSP_TEST_GATE": gate, "LNSP_TEST_MARKER": marker}
    if once:
        env["LNSP_TEST_FAULT_ONCE"] = tmp_path / "struck"
    proc = spawn(command, "--data", small_data, "--run-dir", run, *FAST_TRAIN, *extra,
                 fault=fault, at_step=at_step, extra_env=env)
    return proc, run, marker


def test_a_mid_run_block_at_default_settings_is_caught_within_15_s(small_data, tmp_path):
    # Default --stall-timeout (120 s): the step phases' learned budgets catch it.
    proc, run, marker = marker_run(small_data, tmp_path, "--on-stall", "exit",
                                   fault="blocked_read", at_step=12)
    wait_until(marker.exists, 90, what="the trainer to block")
    blocked_at = time.monotonic()
    code, out = finish(proc, timeout=40)
    caught = time.monotonic() - blocked_at
    assert code == 3, out
    assert caught < 15, f"stall caught after {caught:.1f}s\n{out}"
    log = (run / "training.log").read_text()
    assert "budgets learned" in log, log
    stall = [line for line in log.splitlines() if "[WATCHDOG] no progress" in line][0]
    assert "phase 'optimizer', learned" in stall and "blocked in native code" in stall, stall
    # The diagnosis of the stall (macOS: no stacks without sudo, so `unknown`).
    assert read_json(run / "exit.json")["cause"].startswith(
        "unknown" if MACOS else "blocked-io"), read_json(run / "exit.json")


def test_python_that_makes_no_progress_is_told_from_native_code(small_data, tmp_path):
    proc, run, marker = marker_run(small_data, tmp_path, "--stall-timeout", "2",
                                   "--on-stall", "exit", fault="never_returns", at_step=4)
    code, out = finish(proc, timeout=60)
    assert code == 3, out
    stall = [line for line in (run / "training.log").read_text().splitlines()
             if "[WATCHDOG] no progress" in line][0]
    assert "running Python without progress" in stall, stall


def test_a_long_evaluation_is_work_not_a_stall(small_data, tmp_path):
    # Scaled down: the stall timeout is 2 s and the evaluation takes ~4 x 1.2 s; each
    # chunk of held-out windows is a sign of progress.
    run = tmp_path / "run"
    proc = spawn("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--eval-windows", "1000", "--val-fraction", "0.5", "--epochs", "1",
                 "--max-steps", "10",
                 "--stall-timeout", "2", "--on-stall", "exit", fault="slow_eval",
                 extra_env={"LNSP_TEST_EVAL_SECONDS": "1.2"})
    started = time.monotonic()
    code, out = finish(proc, timeout=90)
    assert code == 0, out
    log = (run / "training.log").read_text()
    assert "[WATCHDOG] no progress" not in log, log
    assert "Eval epoch 1" in log
    assert read_json(run / "exit.json")["state"] == "finished"
    goodput = read_json(run / "goodput.json")
    assert goodput["seconds"]["evaluation"] > 4.0, goodput  # it did take that long
    assert time.monotonic() - started > 4.0


def slow_while_throttled(proc, run, timeout: float, interval: float) -> dict:
    """Throttle the trainer from outside to a fifth of its speed, as a CPU quota or App
    Nap would (stopped 0.4 s of every 0.5 s), until `lnsp status` says slow (its row),
    within `timeout` seconds; it runs freely again afterwards, whatever happened."""
    throttle, done = threading.Event(), threading.Event()

    def duty_cycle():
        while not throttle.is_set():
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.4)
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.1)
        done.set()

    threading.Thread(target=duty_cycle, daemon=True).start()
    try:
        return wait_until(lambda: next((r for r in json.loads(
            lnsp("status", run, "--json").stdout) if r["state"] == "slow"), None), timeout,
            interval=interval, what=f"status slow within {timeout:g} s")
    finally:
        throttle.set()
        done.wait(5)
        os.kill(proc.pid, signal.SIGCONT)


def test_a_throttled_run_is_shown_slow(tmp_path, reap):
    from lnsp.data import synth

    # Epochs of ~1,600 steps: a 2 s window fits between two evaluations however fast
    # the steps are (an evaluation pauses the detector).
    data = synth.write(tmp_path / "data", chains=400, length=16, dim=64)
    run = tmp_path / "run"
    proc = spawn("train", "--data", data, "--run-dir", run, *FAST_TRAIN,
                 "--epochs", "200", "--slow-window", "2", "--checkpoint-every", "0",
                 "--batch-size", "2", "--eval-windows", "20")
    reap(proc.pid)
    # The detector has the run's best rate once a whole window was seen.
    wait_until(lambda: ((read_json(run / "heartbeat.json") or {}).get("best_steps_per_s")),
               90, what="a measured best rate")
    row = slow_while_throttled(proc, run, 60, interval=0.5)
    assert row["state"] == "slow"
    log = (run / "training.log").read_text()
    slow = [line for line in log.splitlines() if "[SLOW]" in line][0]
    assert "below a third of this run's best" in slow and "CPU" in slow, slow
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=60)
    assert code == 0, out


@pytest.mark.timeout(420)
def test_a_run_at_the_defaults_throttled_to_a_fifth_is_slow_within_two_minutes(tmp_path,
                                                                               reap):
    """The slowdown window (60 s) and the checkpoint cadence (every 100 steps) at their
    defaults, an evaluation every epoch (~680 steps, ~6 s): checkpoints and evaluations
    used to restart the window, so a run this fast (~120 steps/s) was never judged."""
    from lnsp.data import synth

    data = synth.write(tmp_path / "data", chains=2000, length=16, dim=64)
    run = tmp_path / "run"
    # --log-every 1000: few lines, so the pipe this test reads only at the end never fills
    proc = spawn("train", "--data", data, "--run-dir", run, *FAST_TRAIN, "--epochs", "2000",
                 "--log-every", "1000")
    reap(proc.pid)
    wait_until(lambda: ((read_json(run / "heartbeat.json") or {}).get("best_steps_per_s")),
               150, interval=0.5, what="a measured best rate (one whole 60 s window)")
    row = slow_while_throttled(proc, run, 120, interval=1.0)
    assert row["state"] == "slow"
    assert "[SLOW]" in (run / "training.log").read_text()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=60)
    assert code == 0, out


def test_a_crash_loop_is_stopped_with_its_cause(small_data, tmp_path):
    run = tmp_path / "run"
    proc = spawn("supervise", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--max-restarts", "5", "--checkpoint-every", "2", fault="crash", at_step=1)
    code, out = finish(proc, timeout=120)
    assert code == 4, out
    ended = read_json(run / "exit.json")
    assert ended["exit_code"] == 4 and ended["state"] == "failed", ended
    assert "crash loop" in ended["cause"] and "injected crash" in ended["cause"], ended
    log = (run / "training.log").read_text()
    assert log.count("FAILED: RuntimeError: injected crash") == 3, log  # and two restarts
    assert "restart 2/5" in log and "restart 3/5" not in log, log
    assert "[SUPERVISOR] crash loop" in log


def test_a_non_finite_loss_is_not_restarted(small_data, tmp_path):
    run = tmp_path / "run"
    proc = spawn("supervise", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--max-restarts", "3", fault="nan", at_step=3)
    code, out = finish(proc, timeout=90)
    assert code == 1, out
    log = (run / "training.log").read_text()
    assert "non-finite: a restart would repeat it" in log or \
        "trainer ended: non-finite" in log, log
    assert "restart 1/" not in log


def test_goodput_shares_add_up_to_the_wall_time_across_a_restart(small_data, tmp_path):
    started = time.time()
    proc, run, marker = marker_run(small_data, tmp_path, "--stall-timeout", "2",
                                   "--on-stall", "exit", "--max-restarts", "1",
                                   "--checkpoint-every", "5", "--epochs", "1",
                                   fault="blocked_read", at_step=8, once=True,
                                   command="supervise")
    code, out = finish(proc, timeout=120)
    assert code == 0, out
    g = read_json(run / "goodput.json")
    ended = read_json(run / "exit.json")
    assert ended["state"] == "finished"
    assert abs(sum(g["shares"].values()) - 1.0) < 0.01, g
    assert abs(sum(g["seconds"].values()) - g["wall_s"]) < 0.05, g
    # From the first trainer's start to the record's own time (written after exit.json,
    # once the event files are closed), less the supervisor's reaction between the two
    # attempts (a poll of half a second and a process start).
    wall = g["time"] - g["since"]
    assert started < g["since"] <= ended["time"] <= g["time"], (g, ended)
    assert wall - 3.0 <= g["wall_s"] <= wall + 0.05, (g, wall)
    assert g["attempts"] == 2
    assert g["seconds"]["stalled"] >= 2.0, g  # the block, past its budget
    assert g["seconds"]["redone"] > 0, g  # steps 6 and 7 ran twice
    status = json.loads(lnsp("status", run, "--json").stdout)[0]
    assert status["goodput"]["attempts"] == 2
