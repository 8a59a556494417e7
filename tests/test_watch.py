"""`lnsp status --watch` on a real terminal (a tmux pane on a private server): live
runs and a stalled one are shown and refreshed, Ctrl-C leaves with exit code 0."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import FAST_TRAIN, env, finish, lnsp, read_json, spawn, wait_until


@pytest.fixture
def tmux_socket():
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    name = f"lnsp-watch-{os.getpid()}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


def pane(socket: str) -> str:
    r = subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", "watch"],
                       capture_output=True, text=True, timeout=10)
    return r.stdout


def row(screen: str, name: str) -> str | None:
    return next((line for line in screen.splitlines() if line.startswith(name + " ")), None)


def test_watch_shows_running_and_stalled_runs_refreshes_and_leaves_on_ctrl_c(
        small_data, tmp_path, tmux_socket, reap):
    runs = tmp_path / "runs"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # A run held at its third step by a gate this test opens, and one that stalls.
    live = spawn("train", "--data", small_data, "--run-dir", runs / "live", *FAST_TRAIN,
                 "--epochs", "1", "--log-every", "1", fault="blocked_read", at_step=3,
                 extra_env={"LNSP_TEST_GATE": gate})
    stuck = spawn("train", "--data", small_data, "--run-dir", runs / "stuck", *FAST_TRAIN,
                  "--epochs", "1", "--stall-timeout", "2", "--on-stall", "exit",
                  fault="never_returns", at_step=2)
    reap(live.pid)
    reap(stuck.pid)
    wait_until(lambda: (read_json(runs / "live" / "heartbeat.json") or {}).get("step") == 2,
               60, what="the live run's second step")
    code, out = finish(stuck, 60)
    assert code == 3, out

    marker = tmp_path / "exit-code"
    command = (f"{shlex.quote(sys.executable)} -m lnsp status --watch --interval 0.5 "
               f"--root {shlex.quote(str(runs))}; echo $? > {shlex.quote(str(marker))}; "
               "sleep 60")
    subprocess.run(["tmux", "-L", tmux_socket, "new-session", "-d", "-s", "watch", "-x", "150",
                    "-y", "30", command], check=True, env=env(), timeout=30)

    screen = wait_until(lambda: (lambda s: s if row(s, "live") and row(s, "stuck") else None)(
        pane(tmux_socket)), 30, what="both runs on the screen")
    live_row, stuck_row = row(screen, "live"), row(screen, "stuck")
    assert "Ctrl-C to leave" in screen and "STEP/TOTAL" in screen, screen
    assert re.search(r"\brunning\s+train\s+2/\d+\s", live_row), screen
    assert re.search(r" \d+:\d\d ", live_row), screen  # an ETA, not "-"
    assert re.search(r"\bstalled\b", stuck_row), screen
    cause = screen.splitlines()[screen.splitlines().index(stuck_row) + 1]
    assert cause.startswith("  cause: ") and len(cause.strip()) > len("cause: ") + 5, screen

    # Open the gate: the live run goes on to its end, and the view follows it.
    with open(gate, "wb") as g:
        g.write(b"x")
    code, out = finish(live, 60)
    assert code == 0, out
    screen = wait_until(lambda: (lambda s: s if "finished" in (row(s, "live") or "") else None)(
        pane(tmux_socket)), 10, what="the view to show the run finished")

    subprocess.run(["tmux", "-L", tmux_socket, "send-keys", "-t", "watch", "C-c"], check=True,
                   timeout=10)
    wait_until(marker.exists, 10, what="the watch to end after Ctrl-C")
    assert wait_until(lambda: marker.read_text().strip(), 5, what="its exit code") == "0"
    assert "Traceback" not in pane(tmux_socket)


def test_watch_refuses_json():
    r = lnsp("status", "--watch", "--json")
    assert r.returncode == 2 and "do not mix" in r.stderr and "Traceback" not in r.stderr
