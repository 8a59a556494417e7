"""Background launchers with real processes, a real tmux server and real signals."""

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import (FAST_TRAIN, MACOS, NO_STACKS_ON_MACOS, env, finish, lnsp, read_json,
                      release, spawn, wait_until)
from lnsp import procs, system
from lnsp.config import TrainConfig
from lnsp.launch.command import caffeinate_argv, trainer_argv
from lnsp.rundir import ExitCode


def launch(backend, run, data, *extra, cwd, extra_env=None):
    r = lnsp("launch", backend, "--data", data, "--run-dir", run, *FAST_TRAIN, *extra,
             cwd=cwd, extra_env=extra_env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def state(run, cwd):
    r = lnsp("status", run, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    import json
    return json.loads(r.stdout)[0]


def trainer_pid(run):
    return wait_until(lambda: (read_json(run / "run.json") or {}).get("pid"), 60,
                      what="the trainer's pid in run.json")


def test_caffeinate_holds_the_assertions_of_a_computation_tied_to_the_trainer():
    # The exact command a Mac runs beside each trainer (caffeinate cannot run here).
    assert caffeinate_argv(4242, platform="darwin") == ["caffeinate", "-i", "-s", "-w", "4242"]
    assert caffeinate_argv(4242, platform="linux") == []
    config = TrainConfig(run_dir="runs/x")
    argv = trainer_argv(config)
    assert argv[:6] == [sys.executable, "-u", "-X", "faulthandler", "-m", "lnsp"]
    assert argv[6] == "supervise" and "--run-dir" in argv


@pytest.mark.parametrize("name", ["foreground", "nohup", "tmux", "docker", "ddp",
                                  "ddp-docker"])
def test_every_backend_has_every_operation(name):
    """Callers never ask which operations a backend has: each has all of Backend's."""
    import inspect
    import types

    from lnsp.launch import Backend, backend

    module = backend(name)
    operations = [op for op in dir(Backend) if not op.startswith("_")]
    assert len(operations) == 10 and isinstance(module, Backend), \
        [op for op in operations if not hasattr(module, op)]
    for op in operations:  # each takes what the protocol passes
        assert list(inspect.signature(getattr(module, op)).parameters) == \
            list(inspect.signature(getattr(Backend, op)).parameters)[1:], (name, op)
    assert not isinstance(types.SimpleNamespace(alive=None, send=None), Backend)


def test_a_foreground_run_is_not_launched_and_adds_nothing_to_status():
    from lnsp.errors import LaunchError
    from lnsp.launch import backend

    native = backend("foreground")
    with pytest.raises(LaunchError, match="not launched"):
        native.plan(TrainConfig(run_dir="runs/x"), {})
    assert native.notes(None, {}) == [] and native.extra_status({}) == {}


def test_nohup_run_outlives_its_shell_and_records_the_trainers_pid(small_data, tmp_path, reap):
    run = tmp_path / "run"
    cmd = (f"{sys.executable} -m lnsp launch nohup --data {small_data} --run-dir {run} "
           f"{' '.join(FAST_TRAIN)} --epochs 30")
    shell = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env(),
                           cwd=tmp_path, timeout=60)
    said = "caffeinate -i -s -w PID" if MACOS else "caffeinate: not used"
    assert shell.returncode == 0 and said in shell.stdout, shell.stdout + shell.stderr
    pid = trainer_pid(run)
    reap(pid)
    proc = psutil.Process(pid)
    assert proc.is_running() and proc.cmdline()[1:7] == ["-u", "-X", "faulthandler", "-m",
                                                          "lnsp", "train"]
    assert system.is_python(proc.exe())  # macOS framework builds run as `Python`
    supervisor = psutil.Process(read_json(run / "run.json")["supervisor_pid"])
    assert supervisor.pid != pid and os.getsid(supervisor.pid) == supervisor.pid
    environ = proc.environ()
    assert environ["PYTHONUNBUFFERED"] == "1" and environ["OMP_NUM_THREADS"] == "1"
    if hasattr(proc, "rlimit"):  # psutil reads another process's limits on Linux only
        assert proc.rlimit(psutil.RLIMIT_NOFILE)[0] >= 4096
    assert state(run, tmp_path)["state"] in ("running", "starting")
    wait_until(lambda: (read_json(run / "exit.json") or {}).get("state") == "finished", 120,
               what="the run to finish")
    assert state(run, tmp_path)["state"] == "finished"


@pytest.fixture
def tmux_socket(tmp_path):
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    name = f"lnsp-test-{os.getpid()}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


def test_tmux_run_is_listed_and_finishes(small_data, tmp_path, tmux_socket):
    extra = {"LNSP_TMUX_SOCKET": tmux_socket}
    run = tmp_path / "run1"
    out = launch("tmux", run, small_data, "--epochs", "15", cwd=tmp_path, extra_env=extra)
    assert f"tmux -L {tmux_socket} attach -t run1" in out
    ls = subprocess.run(["tmux", "-L", tmux_socket, "ls"], capture_output=True, text=True)
    assert ls.stdout.startswith("run1:"), ls
    again = lnsp("launch", "tmux", "--data", small_data, "--run-dir", tmp_path / "other",
                 "--session", "run1", cwd=tmp_path, extra_env=extra)
    assert again.returncode == ExitCode.BAD_INPUT and "already exists" in again.stderr
    assert not (tmp_path / "other").exists()
    wait_until(lambda: (read_json(run / "exit.json") or {}).get("state") == "finished", 120,
               what="the tmux run to finish")
    info = read_json(run / "run.json")
    assert info["backend"] == "tmux" and info["tmux_session"] == "run1"
    # exit.json is written first, the log's last line a moment later
    wait_until(lambda: "Finished" in (run / "training.log").read_text(), 30,
               what="the log's Finished line")


def test_status_through_running_stalled_and_finished(small_data, tmp_path, reap):
    from lnsp.rundir import RunDir
    from lnsp.launch import backend
    from lnsp.observe.status import state as status_of

    gate, marker = tmp_path / "gate", tmp_path / "blocked"
    os.mkfifo(gate)
    run = tmp_path / "run"
    proc = spawn("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN, "--epochs", "1",
                 "--stall-timeout", "1.5", fault="blocked_read", at_step=5, marker=marker,
                 extra_env={"LNSP_TEST_GATE": gate}, cwd=tmp_path)
    reap(proc.pid)
    wait_until(lambda: marker.exists() or proc.poll() is not None, 60, what="step 5 blocked")
    assert proc.poll() is None
    # The live process and its real records, judged at two moments of our choosing:
    # just after the last heartbeat, and past the stall timeout.
    last = read_json(run / "heartbeat.json")["time"]
    assert status_of(RunDir(run), backend, now=last + 0.1)["state"] == "running"
    assert status_of(RunDir(run), backend, now=last + 1.6)["state"] == "stalled"
    # And from the command line, once the clock has really passed the budget.
    row = wait_until(lambda: (lambda r: r if r["state"] == "stalled" else None)(
        state(run, tmp_path)), 30, what="status stalled")
    assert row["step"] == 4 and row["heartbeat_age_s"] >= 1.5, row  # rounded to 0.1 s
    release(gate)
    proc.wait(60)
    final = state(run, tmp_path)
    assert final["state"] == "finished" and final["exit_code"] == ExitCode.DONE


def test_dump_by_pid_and_run_keeps_the_run_alive(small_data, tmp_path, reap):
    run = tmp_path / "run"
    launch("nohup", run, small_data, "--epochs", "200", cwd=tmp_path)
    pid = trainer_pid(run)
    reap(pid)
    wait_until(lambda: read_json(run / "heartbeat.json"), 60, what="a heartbeat")
    for target in (str(pid), str(run), str(run)):
        r = lnsp("dump", target, "--root", tmp_path / "nowhere", cwd=tmp_path)
        assert r.returncode == 0 and "Thread" in r.stdout, r.stderr
    assert len(list((run / "dumps").glob("*.txt"))) == 3
    assert psutil.pid_exists(pid) and state(run, tmp_path)["state"] == "running"
    r = lnsp("stop", run, "--grace", "30", cwd=tmp_path)
    assert r.returncode == ExitCode.DONE and "stopped" in r.stdout, r.stdout + r.stderr


def test_dump_refuses_a_process_that_is_not_an_lnsp_run(tmp_path, reap):
    other = subprocess.Popen(["sleep", "60"])
    reap(other.pid)
    r = lnsp("dump", other.pid, cwd=tmp_path)
    assert r.returncode == ExitCode.BAD_INPUT and "not an lnsp trainer" in r.stderr, r.stderr
    # A SIGUSR1 would have ended `sleep` at once (its default action); the refusal
    # came back after any signal would have landed, so it is still alive, not killed.
    assert other.poll() is None and psutil.Process(other.pid).status() != "zombie"


def test_stop_then_resume_finishes_with_every_step(small_data, tmp_path, reap):
    from lnsp.data import dataset as data

    run = tmp_path / "run"
    # Far more epochs than the test waits for: the stop lands mid-run wherever it lands.
    launch("nohup", run, small_data, "--epochs", "500", cwd=tmp_path)
    reap(trainer_pid(run))
    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 20, 60,
               what="step 20")
    r = lnsp("stop", run, cwd=tmp_path)
    assert r.returncode == ExitCode.DONE and "stopped at step" in r.stdout, r.stdout + r.stderr
    assert state(run, tmp_path)["state"] == "stopped"
    config = read_json(run / "config.json")
    ds = data.load(small_data, config["ctx_len"])
    train_starts, _ = data.windows(ds, config["ctx_len"], config["val_fraction"], config["seed"])
    per_epoch = len(train_starts) // config["batch_size"]
    epochs = read_json(run / "exit.json")["step"] // per_epoch + 1  # end in the stopped epoch
    r = lnsp("train", "--run-dir", run, "--resume", "--epochs", epochs, cwd=tmp_path,
             timeout=180)
    assert r.returncode == ExitCode.DONE, r.stderr
    ended = read_json(run / "exit.json")
    assert ended["state"] == "finished" and read_json(run / "config.json")["epochs"] == epochs
    assert ended["step"] == epochs * per_epoch


@pytest.mark.timeout(300)
@pytest.mark.skipif(MACOS, reason="the frozen trainer's dump is py-spy's from outside: "
                    + NO_STACKS_ON_MACOS)
def test_a_frozen_run_is_dumped_killed_and_restarted_to_completion(small_data, tmp_path, reap):
    # Frozen: native code that keeps the GIL, so its own watchdog cannot run either (a
    # SIGSTOP'd trainer is paused, not frozen: tests/test_control.py).
    run, marker = tmp_path / "run", tmp_path / "frozen"
    proc = spawn("supervise", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--epochs", "15", "--stall-timeout", "2", "--max-restarts", "1",
                 "--checkpoint-every", "10", fault="gil_held", at_step=31, marker=marker,
                 extra_env={"LNSP_TEST_FAULT_ONCE": tmp_path / "struck"}, cwd=tmp_path)
    reap(proc.pid)
    first = trainer_pid(run)
    reap(first)
    wait_until(lambda: marker.exists() or proc.poll() is not None, 60, what="the freeze")
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    code, out = finish(proc, timeout=240)  # the supervisor's output read as it comes
    assert code == ExitCode.DONE, out[-3000:]
    assert read_json(run / "run.json")["restarts"] == 1 and not procs.alive(first)
    ended = read_json(run / "exit.json")
    assert ended["state"] == "finished", ended
    frozen_dump = next((run / "dumps").glob("dump-frozen-*.txt")).read_text()
    assert f"Process {first}" in frozen_dump and "fit" in frozen_dump, frozen_dump
    log = (run / "training.log").read_text()
    assert "[SUPERVISOR] trainer pid" in log and "restart 1/1" in log and "Resumed from" in log
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = read_json(run / "config.json")
    assert len(metrics) == config["epochs"] and ended["step"] % config["epochs"] == 0


def test_wait_gone_waits_for_the_process_and_not_past_its_end(reap):
    child = subprocess.Popen(["sleep", "60"])
    reap(child.pid)
    assert procs.wait_gone(child.pid, 0.3) is False  # still running: the full wait
    child.kill()  # a zombie until reaped: it has ended all the same
    assert procs.wait_gone([child.pid, None], 10) is True
    child.wait(5)  # reaped: gone for good
    assert procs.wait_gone(child.pid, 10) is True
