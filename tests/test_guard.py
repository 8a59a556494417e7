"""The guard on a user's own, unmodified script: `lnsp run -- python script.py`, the
detached launchers with a command, and the `lnsp.guard` API. Real processes, real
signals, a real FIFO gate for the stall, real tmux; the script does not import lnsp."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import env, finish, lnsp, read_json, release, wait_until
from lnsp.rundir import ExitCode

SCRIPT = Path(__file__).resolve().parent / "scripts" / "plain_train.py"


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_every_run():
    """Whatever a test leaves running (a failed one kills `lnsp run`, whose script would
    stay blocked at its gate) ends with it: each run is a process group of its own."""
    yield
    while STARTED:
        proc = STARTED.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def start_run(run: Path, *script_args, guard_args=(), cwd=None, command=None) -> subprocess.Popen:
    """`lnsp run --run-dir RUN [guard_args] -- python plain_train.py ARGS` in the
    background (a process group of its own), its output (the script's, echoed) on a pipe."""
    command = [str(c) for c in command or [sys.executable, SCRIPT, *script_args]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lnsp", "run", "--run-dir", str(run), *map(str, guard_args),
         "--", *command], cwd=cwd or run.parent, env=env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def gate_args(tmp_path: Path, at: int) -> tuple[list, Path, Path]:
    gate, marker = tmp_path / "gate", tmp_path / "blocked"
    os.mkfifo(gate)
    return ["--block-at", at, "--gate", gate, "--marker", marker], gate, marker


@contextlib.contextmanager
def at_gate(tmp_path: Path, at: int, *script_args, guard_args=("--on-stall", "dump")):
    """`lnsp run -- python plain_train.py` blocked before step `at` in a real system
    call (opening the FIFO gate): yields the run, the `lnsp run` process and the gate,
    once the script is there; the process is killed at the end, whatever happened."""
    run = tmp_path / "run"
    args, gate, marker = gate_args(tmp_path, at)
    proc = start_run(run, *script_args, *args, guard_args=guard_args)
    wait_until(marker.exists, 90, what="the script to reach its gate")
    yield run, proc, gate  # _end_every_run ends the group, whatever happened


def log_of(run: Path) -> str:
    return (run / "training.log").read_text()


def test_a_plain_script_finishes_with_a_heartbeat_per_optimizer_step(tmp_path):
    run = tmp_path / "run"
    proc = start_run(run, "--steps", 700, "--workers", 2)
    code, out = finish(proc, 120)
    assert code == ExitCode.DONE, out[-3000:]
    assert "done 700 steps" in out  # the script's own output, echoed unchanged
    beat, ended = read_json(run / "heartbeat.json"), read_json(run / "exit.json")
    assert beat["step"] == 700 and beat["pid"] == read_json(run / "run.json")["pid"]
    assert ended["state"] == "finished" and ended["exit_code"] == ExitCode.DONE \
        and ended["step"] == 700
    # its output line by line in training.log, each line timestamped
    assert re.search(r"^\[\d\d:\d\d:\d\d\] step 700 loss \d", log_of(run), re.M)
    steps = [r["step"] for r in map(json.loads,
                                    (run / "steps.jsonl").read_text().splitlines())]
    assert steps[:3] == [20, 40, 60] and steps[-1] == 700
    assert read_json(run / "goodput.json")["step"] == 700
    from lnsp.observe import tensorboard

    board = tensorboard.read(run / "tb")  # from steps.jsonl, by lnsp run
    assert [s for s, _ in board["scalars"]["train/steps_per_s"]][-1] == 700


def test_status_dump_of_a_live_script_which_goes_on(tmp_path):
    with at_gate(tmp_path, 400, "--steps", 600) as (run, proc, gate):
        wait_until(lambda: read_json(run / "heartbeat.json")["step"] == 399, 10,
                   what="the heartbeat of the last step before the gate")
        st = json.loads(lnsp("status", run, "--json").stdout)[0]
        assert st["state"] == "running" and st["step"] == 399, st
        assert st["samples_per_s"] > 0  # the step rate (steps/s for a command)
        r = lnsp("dump", run, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "plain_train.py" in r.stdout and "MainThread" not in r.stderr
        assert re.search(r"Thread 0x[0-9a-f]+ \(most recent call first\)", r.stdout)
        release(gate)
        code, out = finish(proc, 90)
    assert code == ExitCode.DONE, out[-3000:]
    assert read_json(run / "exit.json")["state"] == "finished"
    assert read_json(run / "heartbeat.json")["step"] == 600


def test_a_script_blocked_in_a_system_call_is_caught_within_15s(tmp_path):
    with at_gate(tmp_path, 300, "--steps", 3000, guard_args=()) as (run, proc, gate):
        blocked = time.monotonic()
        wait_until(lambda: "[WATCHDOG] no progress" in log_of(run), 15,
                   what="the [WATCHDOG] line within 15 s of the block")
        seen = time.monotonic() - blocked
        code, out = finish(proc, 60)
    assert seen <= 15 and code == ExitCode.STALLED, out[-3000:]
    log = log_of(run)
    assert "[WATCHDOG] VERDICT blocked-io" in log, log[-3000:]
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stalled" and ended["exit_code"] == ExitCode.STALLED \
        and ended["step"] == 299
    assert ended["cause"].startswith("blocked-io") and "gate" in ended["cause"]
    assert list((run / "dumps").glob("dump-*-stall-*.txt"))


def test_lnsp_stop_ends_a_script_as_stopped(tmp_path):
    with at_gate(tmp_path, 200, "--steps", 3000) as (run, proc, gate):
        r = lnsp("stop", run, "--grace", 30, timeout=60)
        code, out = finish(proc, 60)
    assert r.returncode == ExitCode.DONE and "stopped" in r.stdout, r.stdout + r.stderr
    assert code == ExitCode.DONE, out[-3000:]
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and ended["signal"] == "SIGTERM" and ended["step"] == 199


def test_a_script_that_asks_should_stop_stops_at_its_own_boundary(tmp_path):
    with at_gate(tmp_path, 150, "--steps", 3000, "--poll") as (run, proc, gate):
        proc.send_signal(signal.SIGTERM)  # to lnsp run, which passes it on
        wait_until(lambda: "SIGTERM received" in log_of(run), 30, what="the stop request")
        release(gate)  # the script asks should_stop() after this step, and returns
        code, out = finish(proc, 60)
    assert code == ExitCode.DONE and "stopping at step 150" in out, out[-3000:]
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and ended["step"] == 150


def test_the_scripts_exception_and_exit_code_are_the_runs(tmp_path):
    run = tmp_path / "run"
    code, out = finish(start_run(run, "--steps", 100, "--workers", 0, "--fail-at", 50), 90)
    assert code == 1, out[-2000:]
    ended = read_json(run / "exit.json")
    assert ended["state"] == "failed" and ended["exit_code"] == 1 and ended["step"] == 49
    assert "RuntimeError: the script's own error at step 50" in ended["cause"]
    log = log_of(run)
    assert "Traceback (most recent call last):" in log and "boot.py" not in log
    assert 'plain_train.py", line' in log

    other = tmp_path / "other"
    code, out = finish(start_run(other, "--steps", 30, "--workers", 0, "--exit-code", 5), 90)
    assert code == 5, out[-2000:]
    ended = read_json(other / "exit.json")
    assert ended["state"] == "failed" and ended["exit_code"] == 5 and ended["step"] == 30


INSPECT = """\
import os, sys
print("argv", sys.argv)
print("file", os.path.realpath(__file__) if "__file__" in globals() else None)
print("path0", sys.path[0])
print("name", __name__)
print("heavy", sorted(m for m in ("psutil", "numpy", "torch", "click", "faiss")
                      if m in sys.modules))
sys.exit(int(sys.argv[-1]))
"""


def test_the_script_runs_as_plain_python_would_run_it(tmp_path):
    (tmp_path / "pkg").mkdir()
    script = tmp_path / "pkg" / "inspect_me.py"
    script.write_text(INSPECT)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for command in ([sys.executable, str(script), "--flag", "x", "7"],
                    [sys.executable, "-m", "pkg.inspect_me", "--flag", "x", "7"]):
        plain = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                               env=env())
        run = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
        code, out = finish(start_run(run, command=command, cwd=tmp_path), 60)
        assert code == plain.returncode == 7, out
        lines = [line for line in out.splitlines() if line.split(" ")[0] in
                 ("argv", "file", "path0", "name", "heavy")]
        assert lines == plain.stdout.splitlines(), (lines, plain.stdout)
        # the guard's part imported no dependency of lnsp's into the script's process
        assert "heavy []" in lines
        assert read_json(run / "exit.json")["exit_code"] == 7


def test_bad_commands_get_one_line_exit_2_and_no_run_directory(tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("echo hi\n")
    cases = {(): "no command after --",
             (sys.executable, str(tmp_path / "missing.py")): "no such script",
             ("no-such-command-anywhere",): "command not found",
             (str(script),): "not an executable file"}
    for command, words in cases.items():
        run = tmp_path / "run"
        r = lnsp("run", "--run-dir", run, "--", *command, cwd=tmp_path)
        assert r.returncode == ExitCode.BAD_INPUT and words in r.stderr, (command, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not run.exists()


def test_a_command_that_is_not_python_gets_its_output_logged_and_its_code(tmp_path):
    run = tmp_path / "run"
    command = ["sh", "-c", "echo from the shell; echo on stderr >&2; exit 4"]
    code, out = finish(start_run(run, command=command), 30)
    assert code == 4 and "from the shell" in out
    log = log_of(run)
    assert re.search(r"^\[\d\d:\d\d:\d\d\] on stderr$", log, re.M)
    ended = read_json(run / "exit.json")
    assert ended["state"] == "failed" and ended["exit_code"] == 4
    assert read_json(run / "run.json")["guard"] is False


RESUMING = """\
import sys
import lnsp.guard as guard
n = guard.attempt()
for i in range(10):
    guard.step(loss=1.0 / (i + 1))
print("attempt", n, flush=True)
sys.exit(0 if n >= int(sys.argv[1]) else 9)
"""


def test_restarts_and_the_attempt_number_and_a_crash_loop(tmp_path):
    script = tmp_path / "resuming.py"
    script.write_text(RESUMING)
    run = tmp_path / "run"
    code, out = finish(start_run(run, guard_args=["--max-restarts", 3],
                                 command=[sys.executable, str(script), "1"]), 60)
    assert code == ExitCode.DONE and "attempt 0" in out and "attempt 1" in out, out
    assert read_json(run / "run.json")["restarts"] == 1
    assert read_json(run / "exit.json")["state"] == "finished"
    assert read_json(run / "heartbeat.json")["step"] == 10  # guard.step() counts steps

    loop = tmp_path / "loop"
    code, out = finish(start_run(loop, guard_args=["--max-restarts", 5],
                                 command=[sys.executable, str(script), "99"]), 60)
    assert code == ExitCode.CRASH_LOOP, out
    ended = read_json(loop / "exit.json")
    assert ended["state"] == "failed" and ended["cause"].startswith("crash loop")
    assert read_json(loop / "run.json")["restarts"] == 2


def test_the_api_is_a_no_op_without_lnsp(tmp_path):
    code = ("import lnsp.guard as g\n"
            "with g.phase('evaluate'):\n    g.step(loss=1.0, lr=0.1)\n"
            "print(g.active(), g.should_stop(), g.attempt())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env(), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "0"], r.stderr


def detached(backend: str, run: Path, tmp_path: Path, extra_env=None) -> str:
    r = lnsp("launch", backend, "--run-dir", run, "--", sys.executable, SCRIPT, "--steps",
             300, cwd=tmp_path, extra_env=extra_env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_a_script_detached_under_nohup_finishes(tmp_path, reap):
    run = tmp_path / "run"
    detached("nohup", run, tmp_path)
    wait_until(lambda: (read_json(run / "exit.json") or {}).get("state"), 120,
               what="the nohup run to end")
    info = read_json(run / "run.json")
    assert info["backend"] == "nohup" and info["guard"] is True
    assert read_json(run / "exit.json")["state"] == "finished", log_of(run)[-2000:]
    assert read_json(run / "heartbeat.json")["step"] == 300


def test_a_script_detached_under_tmux_finishes(tmp_path):
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    socket = f"lnsp-guard-{os.getpid()}"
    run = tmp_path / "mine"
    try:
        out = detached("tmux", run, tmp_path, {"LNSP_TMUX_SOCKET": socket})
        assert f"tmux -L {socket} attach -t mine" in out
        wait_until(lambda: (read_json(run / "exit.json") or {}).get("state"), 120,
                   what="the tmux run to end")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    assert read_json(run / "exit.json")["state"] == "finished", log_of(run)[-2000:]
    assert read_json(run / "heartbeat.json")["step"] == 300
    assert read_json(run / "run.json")["backend"] == "tmux"


DDP_SCRIPT = SCRIPT.with_name("ddp_train.py")


def ddp_run_finishes(tmp_path, script, steps: int) -> Path:
    """`lnsp launch ddp --nproc 2 -- python SCRIPT --steps N` ends `finished`, and each
    rank's heartbeat counts its N optimizer steps; the run directory."""
    run = tmp_path / "run"
    r = lnsp("launch", "ddp", "--nproc", 2, "--run-dir", run, "--", sys.executable,
             script, "--steps", steps, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: (read_json(run / "exit.json") or {}).get("state"), 180,
               what="the ddp run to end")
    assert read_json(run / "exit.json")["state"] == "finished", log_of(run)[-3000:]
    for rank in (0, 1):
        beat = read_json(run / f"heartbeat-rank{rank}.json")
        assert beat["step"] == steps and beat["guard"] is True, beat
    return run


def test_a_ddp_script_detached_as_two_ranks_finishes_with_a_heartbeat_per_rank(tmp_path):
    run = ddp_run_finishes(tmp_path, DDP_SCRIPT, 150)
    info = read_json(run / "run.json")
    assert info["backend"] == "ddp" and [r["rank"] for r in info["ranks"]] == [0, 1]
    log = log_of(run)
    assert "rank 0 done" in log and "rank 1 done" in log


def test_the_plain_script_detached_under_ddp_as_two_ranks_finishes(tmp_path):
    """The same unmodified plain loop as under nohup, tmux and docker: torchrun starts it
    twice (it knows nothing of ranks), and each rank's optimizer hook beats its own
    heartbeat, to the step."""
    ddp_run_finishes(tmp_path, SCRIPT, 200)


def test_the_frozen_rank_of_a_ddp_script_is_named(tmp_path):
    run = tmp_path / "run"
    gate, marker = tmp_path / "gate", tmp_path / "blocked"
    os.mkfifo(gate)
    proc = start_run(run, guard_args=["--nproc", 2], command=[
        sys.executable, str(DDP_SCRIPT), "--steps", 3000, "--block-rank", 1, "--block-at", 40,
        "--gate", gate, "--marker", marker])
    try:
        wait_until(marker.exists, 90, what="rank 1 to reach its gate")
        code, out = finish(proc, 90)
    finally:
        proc.kill()
    assert code == ExitCode.STALLED, out[-3000:]
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stalled" and ended["rank"] == 1, ended
    assert ended["cause"].startswith("rank 1: blocked-io"), ended
    assert "[rank 1] [WATCHDOG] VERDICT blocked-io" in log_of(run)


PHASES = """\
import sys, time
import torch
import lnsp.guard as guard

model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)

def train(n):
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()

def busy(seconds):  # work the script does not name: CPU, no optimizer step
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(1000))

train(50)
with guard.phase("evaluate"):  # a long evaluation, named: its own budget
    time.sleep(float(sys.argv[1]))
train(50)
busy(float(sys.argv[1]))  # past the learned budget, but busy: up to the stall timeout
train(50)
print("steps done", flush=True)
"""


def test_a_long_named_phase_and_busy_work_are_not_stalls(tmp_path):
    """Steps take milliseconds, so the learned budget is its 8 s floor: a 12 s
    evaluation inside guard.phase, and 12 s of CPU work the script did not name, both
    run past it without a stall (the stall timeout, 60 s here, is the ceiling)."""
    script = tmp_path / "phases.py"
    script.write_text(PHASES)
    run = tmp_path / "run"
    code, out = finish(start_run(run, guard_args=["--stall-timeout", 60],
                                 command=[sys.executable, script, 12]), 120)
    assert code == ExitCode.DONE and "steps done" in out, out[-3000:]
    assert "[WATCHDOG] no progress" not in log_of(run)
    assert read_json(run / "heartbeat.json")["step"] == 150
    assert read_json(run / "exit.json")["state"] == "finished"


def test_one_ctrl_c_in_a_tmux_pane_stops_the_script_as_stopped(tmp_path):
    """A person's Ctrl-C: tmux types it into the pane's terminal, which sends SIGINT to
    the foreground process group (lnsp run and the script together)."""
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    socket = f"lnsp-guard-int-{os.getpid()}"
    run = tmp_path / "run"
    args, gate, marker = gate_args(tmp_path, 100)
    command = " ".join(map(str, [sys.executable, "-m", "lnsp", "run", "--run-dir", run,
                                 "--on-stall", "dump", "--", sys.executable, SCRIPT,
                                 "--steps", 3000, *args]))
    environ = " ".join(f"{k}={v!r}" for k, v in env().items() if k.startswith(("PYTHON", "PATH")))
    try:
        subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-s", "pane", "-x", "200",
                        "-y", "50", f"cd {tmp_path} && env {environ} {command}; "
                        "echo EXIT=$?; sleep 600"], check=True, timeout=30)
        wait_until(marker.exists, 90, what="the script to reach its gate")
        subprocess.run(["tmux", "-L", socket, "send-keys", "-t", "pane", "C-c"], check=True,
                       timeout=30)

        def pane():
            return subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", "pane"],
                                  capture_output=True, text=True, timeout=30).stdout

        wait_until(lambda: "EXIT=" in pane(), 60, what="lnsp run to end in the pane")
        assert "EXIT=0" in pane(), pane()
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and ended["signal"] == "SIGINT" and ended["step"] == 99


@pytest.mark.parametrize("name, words", [("lightning_train.py", "lightning global_step 120"),
                                         ("hf_train.py", "hf global_step 120")])
def test_lightning_and_hugging_face_trainers_beat_once_per_optimizer_step(tmp_path, name, words):
    """The frameworks, unchanged, under the guard: the optimizer hook counts exactly the
    framework's own global step (120 each)."""
    run = tmp_path / "run"
    command = [sys.executable, SCRIPT.with_name(name), tmp_path / "out"]
    code, out = finish(start_run(run, command=command, cwd=tmp_path), 120)
    assert code == ExitCode.DONE and words in out, out[-3000:]
    assert read_json(run / "heartbeat.json")["step"] == 120
    assert read_json(run / "exit.json")["state"] == "finished"


def test_a_process_the_command_leaves_behind_does_not_hold_the_run_open(tmp_path, reap):
    """The command ends; a process it started still holds its output pipe open: lnsp run
    ends with it all the same (it waits for the command, not for the pipe)."""
    run = tmp_path / "run"
    marker = tmp_path / "left.pid"
    command = ["sh", "-c", f"sleep 60 & echo $! > {marker}; echo left one behind"]
    proc = start_run(run, command=command)
    try:
        code, out = finish(proc, 30)
    finally:
        if marker.exists():
            reap(int(marker.read_text()))
    assert code == ExitCode.DONE and "left one behind" in out
    assert read_json(run / "exit.json")["state"] == "finished"


def test_a_second_run_on_a_live_run_directory_is_refused(tmp_path):
    with at_gate(tmp_path, 50, "--steps", 100) as (run, proc, gate):
        r = lnsp("run", "--run-dir", run, "--resume", "--", sys.executable, SCRIPT,
                 "--steps", 10, cwd=tmp_path)
        assert r.returncode == ExitCode.BAD_INPUT and "already live" in r.stderr, \
            r.stdout + r.stderr
        release(gate)
        code, out = finish(proc, 60)
    assert code == ExitCode.DONE and read_json(run / "exit.json")["state"] == "finished", \
        out[-2000:]


def test_stop_of_a_frozen_command_ends_the_run_with_no_restart(tmp_path, reap):
    """The command is frozen (SIGSTOP) under --max-restarts: `lnsp stop` kills it after
    the grace, and lnsp run does not restart what was stopped."""
    guard_args = ["--max-restarts", 3, "--on-stall", "dump"]
    with at_gate(tmp_path, 60, "--steps", 3000, guard_args=guard_args) as (run, proc, gate):
        child = read_json(run / "run.json")["pid"]
        os.kill(child, signal.SIGSTOP)
        r = lnsp("stop", run, "--grace", 3, timeout=60)
        code, out = finish(proc, 60)
    assert r.returncode == ExitCode.STALLED and "killed" in r.stdout, r.stdout + r.stderr
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and read_json(run / "run.json").get("restarts", 0) == 0
    assert "restart 1/3" not in log_of(run)
