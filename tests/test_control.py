"""Control you can trust, with real processes and real signals: no signal to a process
that is not the recorded one, a stop that nothing restarts, SIGHUP as a graceful stop,
a pause that is not a stall, one trainer per run directory, and a slow evaluation under
a supervisor that is work, not a freeze."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import FAST_TRAIN, finish, lnsp, read_json, release, spawn, wait_until
from lnsp import procs
from lnsp.errors import LaunchError
from lnsp.rundir import ExitCode, RunDir, write_json


def gated(small_data, tmp_path, *extra, command="train", at_step=5, once=False, **kw):
    """A run (`lnsp train` or `lnsp supervise`) whose `at_step`-th step blocks on a FIFO
    gate; the marker file appears just before it blocks."""
    gate, marker, run = tmp_path / "gate", tmp_path / "blocked", tmp_path / "run"
    os.mkfifo(gate)
    env = {"LNSP_TEST_GATE": gate}
    if once:
        env["LNSP_TEST_FAULT_ONCE"] = tmp_path / "struck"
    proc = spawn(command, "--data", small_data, "--run-dir", run, *FAST_TRAIN, *extra,
                 fault="blocked_read", at_step=at_step, marker=marker, extra_env=env, **kw)
    wait_until(lambda: marker.exists() or proc.poll() is not None, 60,
               what="the trainer to reach the gate")
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    return proc, run, gate


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
    assert r.returncode == ExitCode.DONE and "not running (finished)" in r.stdout, \
        r.stdout + r.stderr
    r = lnsp("dump", rd.root, cwd=tmp_path)
    assert r.returncode == ExitCode.BAD_INPUT and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert trainer.poll() is None and supervisor.poll() is None  # no signal reached them


def test_a_foreground_resume_after_a_container_run_drops_its_supervisor(tmp_path, reap):
    from lnsp.config import TrainConfig
    from lnsp.train.recorder import Recorder

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


# ------------------------------------------------------------------ a stop is a stop
@pytest.mark.timeout(180)
def test_stop_of_a_supervised_run_kills_a_stopped_trainer_and_nothing_restarts(
        small_data, tmp_path, reap):
    run = tmp_path / "run"
    r = lnsp("launch", "nohup", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
             "--epochs", "500", "--max-restarts", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 5, 60,
               what="step 5")
    info = read_json(run / "run.json")
    trainer, supervisor = info["pid"], info["supervisor_pid"]
    reap(trainer)
    reap(supervisor)
    created = psutil.Process(supervisor).create_time()
    os.kill(trainer, signal.SIGSTOP)  # it cannot act on the SIGTERM: the grace runs out
    wait_until(lambda: psutil.Process(trainer).status() == psutil.STATUS_STOPPED, 10,
               what="the trainer stopped")
    r = lnsp("stop", run, "--grace", "2", cwd=tmp_path)
    assert r.returncode == ExitCode.STALLED, r.stdout + r.stderr
    assert "did not stop within 2s" in r.stdout and "killed" in r.stdout, r.stdout
    # The supervisor saw the stop first: it ended without starting another trainer.
    assert not procs.alive(supervisor) and not procs.alive(trainer)
    after = read_json(run / "run.json")
    assert after["pid"] == trainer and "restarts" not in after, after
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and ended["signal"] == "SIGKILL", ended
    log = (run / "training.log").read_text()
    assert "restart 1/" not in log and "not restarting" in log, log
    r = lnsp("status", run, "--json", cwd=tmp_path)
    assert '"state": "stopped"' in r.stdout, r.stdout
    assert info.get("supervisor_start") == created  # recorded with its PID


def test_sigterm_to_a_supervisor_is_passed_on_and_nothing_restarts(small_data, tmp_path):
    # The first trainer blocks; SIGTERM to the supervisor is passed on and noted. The
    # trainer stops at the step boundary: exit 0, and no restart however many allowed.
    proc, run, gate = gated(small_data, tmp_path, "--epochs", "1", "--max-restarts", "3",
                            command="supervise")
    proc.send_signal(signal.SIGTERM)
    release(gate)
    code, out = finish(proc, timeout=60)
    assert code == ExitCode.DONE, out
    assert read_json(run / "exit.json")["state"] == "stopped"
    assert "restart" not in (run / "training.log").read_text()


# ------------------------------------------------------------------ SIGHUP
def test_sighup_stops_a_foreground_run_with_a_checkpoint_and_resume_continues(
        small_data, tmp_path):
    proc, run, gate = gated(small_data, tmp_path, "--epochs", "1")
    proc.send_signal(signal.SIGHUP)  # the terminal went away while step 5 is blocked
    release(gate)
    code, out = finish(proc)
    assert code == ExitCode.DONE, out
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and ended["signal"] == "SIGHUP", ended
    assert ended["step"] == 5 and (run / "checkpoints" / "last.pt").exists()
    r = lnsp("train", "--run-dir", run, "--resume", cwd=tmp_path, timeout=180)
    assert r.returncode == ExitCode.DONE, r.stderr
    log = (run / "training.log").read_text()
    assert "Resumed from" in log and "at epoch 1, step 5" in log, log
    assert read_json(run / "exit.json")["state"] == "finished"


# ------------------------------------------------------------------ pauses
PAUSE_S = 12.0  # past the stall budget (4 s), the supervisor's (8 s) and PAUSE_GAP_S


def pause_group(pgid: int, pids: list[int]) -> None:
    """Ctrl-Z then fg, as a terminal does it: SIGSTOP to the process group, PAUSE_S
    stopped (the pause is the test's own action), then SIGCONT."""
    os.killpg(pgid, signal.SIGSTOP)
    wait_until(lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids),
               10, what="every process of the run stopped")
    time.sleep(PAUSE_S)
    os.killpg(pgid, signal.SIGCONT)


@pytest.mark.timeout(180)
def test_a_pause_of_every_process_of_a_supervised_run_is_not_a_stall(small_data, tmp_path,
                                                                     reap):
    proc, run, gate = gated(small_data, tmp_path, "--epochs", "1", "--stall-timeout", "4",
                            "--max-restarts", "2", command="supervise", once=True,
                            start_new_session=True)
    reap(proc.pid)
    trainer = read_json(run / "run.json")["pid"]
    reap(trainer)
    pause_group(proc.pid, [proc.pid, trainer])
    # The gate stays shut a moment after SIGCONT: the clocks that a pause moved would
    # judge the trainer at once (the watchdog ticks within 0.25 s, the supervisor polls
    # every 0.5 s); restarted clocks are still far inside the 4 s budget.
    time.sleep(1.0)
    release(gate)
    code, out = finish(proc, timeout=120)
    assert code == ExitCode.DONE, out
    log = (run / "training.log").read_text()
    assert "[WATCHDOG] no progress" not in log and "[SUPERVISOR]" not in log, log
    assert read_json(run / "exit.json")["state"] == "finished"
    assert "restarts" not in read_json(run / "run.json")
    assert read_json(run / "goodput.json")["seconds"]["paused"] >= PAUSE_S - 1


def test_a_pause_of_a_foreground_run_is_not_a_stall(small_data, tmp_path, reap):
    proc, run, gate = gated(small_data, tmp_path, "--epochs", "1", "--stall-timeout", "4",
                            "--on-stall", "exit", start_new_session=True)
    reap(proc.pid)
    pause_group(proc.pid, [proc.pid])
    time.sleep(1.0)  # as above: the watchdog ticks first
    release(gate)
    code, out = finish(proc)
    assert code == ExitCode.DONE, out
    assert "[WATCHDOG] no progress" not in (run / "training.log").read_text()


# ------------------------------------------------------------------ one trainer
def test_a_second_trainer_on_a_live_run_directory_is_refused(small_data, tmp_path, reap):
    proc, run, gate = gated(small_data, tmp_path, "--epochs", "1")
    reap(proc.pid)
    before = read_json(run / "run.json")
    for how in (["train"], ["launch", "nohup"]):
        r = lnsp(*how, "--data", small_data, "--run-dir", run, *FAST_TRAIN, "--resume",
                 cwd=tmp_path)
        assert r.returncode == ExitCode.BAD_INPUT, (how, r.stdout + r.stderr)
        assert "a trainer is already running in this run directory" in r.stderr, r.stderr
        assert f"pid {proc.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert read_json(run / "run.json") == before  # nothing of the live run was touched
    release(gate)
    code, out = finish(proc)
    assert code == ExitCode.DONE and read_json(run / "exit.json")["state"] == "finished", out


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
    assert code == ExitCode.DONE, out
    log = (run / "training.log").read_text()
    assert "[SUPERVISOR]" not in log and "Eval epoch 1" in log, log
    assert read_json(run / "goodput.json")["seconds"]["evaluation"] > 4.0


def test_the_supervisor_judges_on_its_own_clock_not_the_wall_clock(reap):
    """A laptop's sleep on macOS: time.monotonic() does not advance while asleep and the
    wall clock does, so on waking every heartbeat looks hours old by the wall clock. The
    supervisor ages a heartbeat by when it saw it change, on its monotonic clock: the
    trainer is not frozen for the sleep (the old wall-clock age said it was)."""
    import time

    from lnsp.config import TrainConfig
    from lnsp.rundir import Heartbeat
    from lnsp.launch.supervise import Liveness

    child = subprocess.Popen(["sleep", "60"])
    reap(child.pid)
    alive = Liveness(child.pid)
    config = TrainConfig(stall_timeout=5, startup_timeout=5)
    slept = Heartbeat(pid=child.pid, time=time.time() - 3600, step=40)  # an hour by the wall
    assert not alive.judge(slept, config).stale
    assert not alive.judge(slept, config).stale  # the same beat, seconds later: still alive
    alive.changed -= 30  # 30 s on the supervisor's own clock with no new beat: frozen
    assert alive.judge(slept, config).stale


# ------------------------------------------------------------------ a person at a terminal
class Pane:
    """A shell in a tmux pane on a private server: keys typed as a person types them,
    the screen read back."""

    def __init__(self, socket: str, cwd):
        import shutil

        if not shutil.which("tmux"):
            pytest.skip("tmux is not installed")
        self.socket = socket
        self.tmux("new-session", "-d", "-s", "pane", "-x", "200", "-y", "50", "-c", str(cwd),
                  "bash --norc --noprofile")

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, timeout=30,
                              capture_output=True, text=True).stdout

    def type(self, *keys) -> None:
        self.tmux("send-keys", "-t", "pane", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "pane", "-S", "-200")

    def exit_code(self) -> int | None:
        """The `EXIT=<code>` line the command line echoes when it ends (the typed line
        holds `EXIT=$?` too, never followed by digits alone)."""
        import re

        found = re.findall(r"^EXIT=(\d+)\s*$", self.screen(), re.M)
        return int(found[-1]) if found else None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _train_line(small_data, run, *extra, fault: dict | None = None) -> str:
    """`lnsp train ...` as typed at the prompt (through the fault driver, with its
    variables, when `fault` is given)."""
    from conftest import DRIVER, env

    environ = " ".join(f"{k}='{v}'" for k, v in {**env(), **(fault or {})}.items()
                       if k.startswith(("PYTHON", "PATH", "LNSP_")))
    entry = f"{DRIVER}" if fault else "-m lnsp"
    # A subshell is the job: Ctrl-Z stops it whole, and its EXIT line is the run's end.
    return (f"( env {environ} {sys.executable} {entry} train --data {small_data} --run-dir "
            f"{run} " + " ".join(FAST_TRAIN) + " " + " ".join(map(str, extra))
            + "; echo EXIT=$? )")


def test_one_ctrl_c_in_a_tmux_pane_stops_with_a_checkpoint_and_resume_continues(
        small_data, tmp_path):
    run = tmp_path / "run"
    pane = Pane(f"lnsp-ctrlc-{os.getpid()}", tmp_path)
    try:
        pane.type(_train_line(small_data, run, "--epochs", 50), "Enter")
        wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 5, 90,
                   what="step 5")
        pane.type("C-c")  # the terminal sends SIGINT to the foreground job
        wait_until(lambda: pane.exit_code() is not None, 60, what="the run to end")
        assert pane.exit_code() == 0, pane.screen()
    finally:
        pane.close()
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stopped" and ended["signal"] == "SIGINT", ended
    assert (run / "checkpoints" / "last.pt").exists()
    r = lnsp("train", "--run-dir", run, "--resume", "--epochs", 1, cwd=tmp_path, timeout=180)
    assert r.returncode == ExitCode.DONE, r.stderr
    log = (run / "training.log").read_text()
    assert f"step {ended['step']}" in log.split("Resumed from")[1].splitlines()[0], log
    assert read_json(run / "exit.json")["state"] == "finished"


@pytest.mark.timeout(240)
def test_ctrl_z_in_a_tmux_shell_a_wait_and_fg_is_a_pause_not_a_stall(small_data, tmp_path):
    """Ctrl-Z (SIGTSTP to the job), PAUSE_S stopped (past the stall timeout of 4 s and
    the watchdog's pause gap), then `fg`: the run finishes, no stall line, no restart."""
    run, gate, marker = tmp_path / "run", tmp_path / "gate", tmp_path / "at-gate"
    os.mkfifo(gate)
    # The trainer waits at step 5 on a gate the test holds: Ctrl-Z lands mid-training,
    # not after the last step (a short run can end before the keys arrive).
    fault = {"LNSP_TEST_FAULT": "blocked_read", "LNSP_TEST_FAULT_STEP": "5",
             "LNSP_TEST_GATE": gate, "LNSP_TEST_MARKER": marker}
    pane = Pane(f"lnsp-ctrlz-{os.getpid()}", tmp_path)
    try:
        pane.type(_train_line(small_data, run, "--epochs", 1, "--stall-timeout", 4,
                              "--on-stall", "exit", fault=fault), "Enter")
        wait_until(marker.exists, 90, what="the trainer at its gate")
        trainer = read_json(run / "run.json")["pid"]
        pane.type("C-z")
        wait_until(lambda: psutil.Process(trainer).status() == psutil.STATUS_STOPPED, 10,
                   what="the job stopped")
        time.sleep(PAUSE_S)  # the pause itself: the test's own action
        pane.type("fg", "Enter")
        # As in the pause tests above: the gate stays shut a moment after the job goes
        # on, so clocks the pause moved would judge the trainer (within 4 s) at once.
        wait_until(lambda: psutil.Process(trainer).status() != psutil.STATUS_STOPPED, 10,
                   what="the job going on")
        time.sleep(1.0)
        release(gate)
        wait_until(lambda: pane.exit_code() is not None, 180, what="the run to end")
        assert pane.exit_code() == 0, pane.screen()
    finally:
        pane.close()
    log = (run / "training.log").read_text()
    assert "[WATCHDOG] no progress" not in log, log
    assert read_json(run / "exit.json")["state"] == "finished"
    assert read_json(run / "goodput.json")["seconds"]["paused"] >= PAUSE_S - 1


def test_a_dump_request_before_the_trainers_handler_is_in_is_not_passed_on(reap):
    """In a container the engine's SIGUSR1 reaches the supervisor, which passes it on:
    not to a trainer whose dump handler is not installed yet (it would end it)."""
    from lnsp.launch.supervise import dumpable

    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reap(bare.pid)
    ready = subprocess.Popen([sys.executable, "-c",
                              "import faulthandler, signal, sys, time\n"
                              "faulthandler.register(signal.SIGUSR1)\n"
                              "print('in', flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    reap(ready.pid)
    assert ready.stdout.readline() == "in\n"
    assert not dumpable(bare) and dumpable(ready)
