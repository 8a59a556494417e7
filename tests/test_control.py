"""Control you can trust, with real processes and real signals: no signal to a process
that is not the recorded one, and a slow evaluation under a supervisor that is work,
not a freeze."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import FAST_TRAIN, finish, lnsp, read_json, spawn
from lnsp import procs
from lnsp.errors import LaunchError
from lnsp.rundir import RunDir, write_json


def impostor(*args) -> subprocess.Popen:
    """A process that is not ours to signal; its command line may even look like a
    trainer's (`... lnsp train`)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


# ------------------------------------------------------------------ identity
def test_send_signal_refuses_a_pid_that_names_another_process_now(reap):
    other = impostor()
    reap(other.pid)
    created = procs.start_time(other.pid)
    for recorded in (created - 30.0, None):  # an older process's record; no record at all
        with pytest.raises(LaunchError, match="no SIGTERM sent"):
            procs.send_signal(other.pid, recorded, signal.SIGTERM, "trainer")
    assert other.poll() is None
    procs.send_signal(other.pid, created, signal.SIGTERM, "trainer")  # the recorded one
    assert other.wait(10) == -signal.SIGTERM


def test_a_finished_run_whose_pids_now_name_other_processes_is_not_signalled(tmp_path, reap):
    # The trainer's PID now names a process whose command line even reads `lnsp train`,
    # the supervisor's an unrelated one: both started long after the run recorded them.
    trainer, supervisor = impostor("lnsp", "train"), impostor()
    for p in (trainer, supervisor):
        reap(p.pid)
    past = min(psutil.Process(p.pid).create_time() for p in (trainer, supervisor)) - 100
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    write_json(rd.run, {"backend": "nohup", "pid": trainer.pid, "start_time": past,
                        "supervisor_pid": supervisor.pid, "supervisor_start": past})
    rd.write_exit("finished", 0, 40)
    r = lnsp("stop", rd.root, "--grace", "2", cwd=tmp_path)
    assert r.returncode == 0 and "not running (finished)" in r.stdout, r.stdout + r.stderr
    r = lnsp("dump", rd.root, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert trainer.poll() is None and supervisor.poll() is None  # no signal reached them


def test_a_foreground_resume_after_a_container_run_drops_its_supervisor(tmp_path, reap):
    from lnsp.config import TrainConfig
    from lnsp.recorder import Recorder

    stale = impostor()  # what the container's supervisor PID names on this host now
    reap(stale.pid)
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    write_json(rd.run, {"backend": "docker", "container_id": "abc", "pid": 7,
                        "supervisor_pid": stale.pid, "supervisor_start": time.time()})
    Recorder(rd, lambda m: None, TrainConfig(run_dir=str(rd.root))).started([])
    run = rd.read_run()
    assert run["pid"] == os.getpid() and run["backend"] == "foreground"
    assert "supervisor_pid" not in run and "supervisor_start" not in run, run
    assert abs(run["start_time"] - time.time()) < 60



# ------------------------------------------------------------------ a healthy trainer
def test_a_supervised_evaluation_longer_than_the_stall_timeout_is_not_killed(small_data,
                                                                             tmp_path):
    # Every chunk of held-out windows beats the heartbeat: ~4 chunks x 1.5 s, against a
    # supervisor's budget of 2 s (+ 2 s grace) without a sign of life.
    run = tmp_path / "run"
    proc = spawn("supervise", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--eval-windows", "1000", "--val-fraction", "0.5", "--epochs", "1",
                 "--max-steps", "10", "--stall-timeout", "2", fault="slow_eval",
                 extra_env={"LNSP_TEST_EVAL_SECONDS": "1.5"})
    code, out = finish(proc, timeout=120)
    assert code == 0, out
    log = (run / "training.log").read_text()
    assert "[SUPERVISOR]" not in log and "Eval epoch 1" in log, log
    assert read_json(run / "goodput.json")["seconds"]["evaluation"] > 4.0
