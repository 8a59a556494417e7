"""`lnsp diagnose`: real hangs induced by the small scripts in tests/hangs/, each
diagnosed from outside with a few fast samples, and a healthy run that must be
`running`. Every script says `ready` at the point where it is about to hang."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_TRAIN, env, lnsp, read_json, spawn, wait_until
from lnsp.diagnose.hangs import KINDS
from lnsp.system import FAKE_ENV as FAKE

HANGS = Path(__file__).resolve().parent / "hangs"
SAMPLES, INTERVAL = 3, 0.3
# A diagnosis of a small script takes ~2 s; a loaded 2-core machine stretches it.
BUDGET_S = 20.0

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="induced hangs need Linux /proc")


def start(script: str, *args, reap, **kw) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HANGS / script), *map(str, args)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env(), **kw)
    reap(proc.pid)
    return proc


def ready(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    """The script's `ready ...` line (bounded: the script controls when it comes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if line.startswith("ready") or line.startswith("child"):
                return line.split()
            assert line, f"{proc.args} ended (exit {proc.poll()}) before it was ready"
    raise AssertionError(f"{proc.args} not ready within {timeout}s")


def diagnose(pid: int, **kw) -> dict:
    from lnsp.diagnose.diagnosis import diagnose as run

    started = time.monotonic()
    verdict = run(str(pid), samples=SAMPLES, interval=INTERVAL, **kw)
    took = time.monotonic() - started
    assert took < BUDGET_S, f"diagnosis took {took:.1f}s"
    print(f"{verdict['kind']}: {verdict['summary']} ({took:.1f}s)")
    return verdict


def settle(pid: int, state: str = "S", timeout: float = 10.0) -> None:
    """Wait until the process sits in `state` (the hang has begun, not just ready)."""
    def current():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None
    wait_until(lambda: current() == state, timeout, what=f"pid {pid} in state {state}")


def test_bad_targets_are_one_line_and_exit_2(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for target, words in ((str(2**22 + 7), "no such process"),
                              (str(sleeper.pid), "not a Python process"),
                              (str(tmp_path), "not a run directory")):
            r = lnsp("diagnose", target, "--samples", "1")
            assert r.returncode == 2, r.stdout + r.stderr
            assert words in r.stderr and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_diagnose_dump_and_stop_find_the_same_run_for_a_pid(tmp_path, reap):
    """One lookup of a PID's run for `lnsp diagnose`, `dump` and `stop` (they had one each,
    and two runs recording one PID were told apart differently): the newest run that
    records it, else the --run-dir of its command line, else none, which stop refuses."""
    from lnsp.diagnose.target import resolve
    from lnsp.launch.operate import resolve_run

    named = tmp_path / "named"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "--run-dir", str(named)], env=env())
    reap(proc.pid)
    root = tmp_path / "runs"
    for name in ("20240101-000000", "20240102-000000"):
        (root / name).mkdir(parents=True)
        (root / name / "run.json").write_text(json.dumps({"pid": proc.pid, "backend": "nohup"}))
    newest = root / "20240102-000000"
    assert resolve(str(proc.pid), str(root)).run_dir == newest
    assert resolve_run(str(proc.pid), str(root))[0].root == newest
    named.mkdir()
    (named / "run.json").write_text(json.dumps({"pid": proc.pid, "backend": "nohup"}))
    nowhere = str(tmp_path / "nowhere")
    assert resolve(str(proc.pid), nowhere).run_dir == named
    assert resolve_run(str(proc.pid), nowhere)[0].root == named
    (named / "run.json").unlink()  # --run-dir, but no run.json: diagnose looks at the process
    assert resolve(str(proc.pid), nowhere).run_dir is None
    other = subprocess.Popen(["sleep", "60"])
    reap(other.pid)
    r = lnsp("stop", other.pid, "--grace", "1", cwd=tmp_path)
    assert r.returncode == 2 and "no run directory records this process" in r.stderr, r.stderr
    assert other.poll() is None


def test_blocked_io_names_the_fifo_through_the_command(tmp_path, reap):
    fifo = tmp_path / "gate"
    proc = start("fifo_open.py", fifo, reap=reap)
    ready(proc)
    settle(proc.pid)
    r = lnsp("diagnose", proc.pid, "--samples", SAMPLES, "--interval", INTERVAL)
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.splitlines()
    assert first.startswith("VERDICT blocked-io: "), r.stdout
    assert str(fifo) in first and "FIFO" in first
    assert rest[-1].startswith("fix: ")
    assert any("wchan" in line for line in rest), r.stdout
    j = json.loads(lnsp("diagnose", proc.pid, "--samples", 2, "--interval", INTERVAL,
                        "--json").stdout)
    assert set(j) >= {"kind", "summary", "evidence", "fix", "samples"}
    assert j["kind"] == "blocked-io" and len(j["samples"]) == 2
    assert j["samples"][0]["threads"][0]["syscall"]["path"] == str(fifo)


def test_stopped_by_sigstop(reap):
    proc = start("sleeper.py", reap=reap)
    ready(proc)
    os.kill(proc.pid, signal.SIGSTOP)
    settle(proc.pid, "T")
    v = diagnose(proc.pid)
    assert v["kind"] == "stopped", v
    assert "SIGSTOP" in v["summary"] and "SIGTTIN" not in v["summary"]
    assert f"kill -CONT {proc.pid}" in v["fix"]


def test_stopped_by_sigttin_for_reading_the_terminal(reap):
    proc = start("tty_job.py", reap=reap, start_new_session=True)
    job = int(ready(proc)[1])
    reap(job)
    settle(job, "T")
    v = diagnose(job)
    assert v["kind"] == "stopped", v
    assert "SIGTTIN" in v["summary"] and "/dev/pts/" in v["summary"]
    assert "< /dev/null" in v["fix"] and "nohup" in v["fix"]


def test_busy_loop(reap):
    proc = start("busy_loop.py", reap=reap)
    ready(proc)
    v = diagnose(proc.pid)
    assert v["kind"] == "busy-loop", v
    assert "busy_loop.py:" in v["summary"]


def test_throttled_by_a_cgroup_cpu_quota(reap):
    folder = Path(f"/sys/fs/cgroup/cpu/lnsp-test-{os.getpid()}")
    try:
        folder.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup v1 cpu group here ({e})")
    proc = start("busy_loop.py", reap=reap)
    try:
        ready(proc)
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text("5000")  # 5% of one core
        (folder / "cgroup.procs").write_text(str(proc.pid))
        v = diagnose(proc.pid)
        assert v["kind"] == "throttled", v
        assert "quota" in v["summary"] and str(folder) in " ".join(v["evidence"])
    finally:
        proc.kill()
        proc.wait()
        wait_until(lambda: not (folder / "cgroup.procs").read_text().strip(), 10,
                   what="the cgroup to empty")
        folder.rmdir()


def test_deadlock_names_both_threads_and_lines(reap):
    proc = start("deadlock.py", reap=reap)
    ready(proc)
    v = diagnose(proc.pid)
    assert v["kind"] == "deadlock", v
    assert "`with b:`" in v["summary"] and "`with a:`" in v["summary"]
    assert "first" in v["summary"] and "second" in v["summary"]


def test_gil_held_by_a_native_call(reap):
    proc = start("gil_held.py", reap=reap)
    ready(proc)
    v = diagnose(proc.pid)
    assert v["kind"] == "gil-held", v
    assert "holder" in v["summary"] and "the main thread" in v["summary"]
    assert "libc.sleep" in v["summary"]


def test_unknown_shows_the_frames_and_guesses_nothing(reap):
    proc = start("sleeper.py", reap=reap)
    ready(proc)
    settle(proc.pid)
    v = diagnose(proc.pid)
    assert v["kind"] == "unknown", v
    assert "sleeper.py:5" in v["summary"] and "time.sleep(3600)" in v["summary"]


def test_fork_after_openmp(reap):
    proc = start("fork_openmp.py", reap=reap)
    child = int(ready(proc)[1])
    reap(child)
    v = diagnose(child)
    assert v["kind"] == "fork-after-openmp", v
    assert str(proc.pid) in v["summary"] and "libgomp" in v["summary"]
    assert "spawn" in v["fix"]


def test_duplicate_openmp(reap):
    if not (Path(sys.prefix) / "lib" / "libiomp5.so").exists():
        pytest.skip("intel-openmp is not installed (pip install -e '.[test]')")
    proc = start("duplicate_openmp.py", reap=reap)
    ready(proc)
    v = diagnose(proc.pid)
    assert v["kind"] == "duplicate-openmp", v
    assert "Intel libiomp5" in v["summary"] and "GNU libgomp" in v["summary"]


def test_dataloader_worker_stuck(reap):
    proc = start("dataloader_stuck.py", reap=reap)
    ready(proc)
    worker = wait_until(lambda: __import__("psutil").Process(proc.pid).children(), 30,
                        what="the DataLoader worker")[0]
    reap(worker.pid)
    settle(proc.pid)
    v = diagnose(proc.pid)
    assert v["kind"] == "dataloader-worker", v
    assert f"worker pid {worker.pid} is alive but stuck" in v["summary"]
    assert "dataloader_stuck.py:14" in v["summary"]


def test_collective_wait_names_the_rank_that_never_arrived(reap):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in (0, 1):
        ranks.append(subprocess.Popen(
            [sys.executable, str(HANGS / "collective.py")], stdout=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                              RANK=rank, WORLD_SIZE=2)))
        reap(ranks[-1].pid)
    for p in ranks:
        ready(p)
    v = diagnose(ranks[0].pid)
    assert v["kind"] == "collective-wait", v
    assert "rank 0 of 2" in v["summary"].lower() and "all_reduce" in v["summary"]
    assert "ranks not arrived: 1" in v["summary"]
    assert any(f"pid {ranks[1].pid}" in e and "collective.py:15" in e for e in v["evidence"])


# A backtrace from a public report, taken with lldb on macOS where this hang lives:
# https://github.com/pytorch/pytorch/pull/141296 (torch.mps.synchronize() after a Metal
# kernel waited forever in -[_MTLCommandBuffer waitUntilCompleted]).
MPS_REPORT = """
* thread #1, queue = 'com.apple.main-thread', stop reason = signal SIGSTOP
  * frame #0: 0x00000001aa919084 Metal`pthread_cond_wait + 12
    frame #1: 0x00000001aa78b1b4 Metal`-[_MTLCommandBuffer waitUntilCompleted] + 84
    frame #2: 0x00000001032bf358 libtorch_python.dylib`torch::mps::MPSModule_deviceSynchronize(_object*, _object*) + 40
    frame #3: 0x0000000100e94c20 Python`cfunction_vectorcall_NOARGS + 100
    frame #4: 0x0000000100e389b8 Python`PyObject_Vectorcall + 92
    frame #5: 0x0000000100f61e38 Python`_PyEval_EvalFrameDefault + 19040
    frame #6: 0x0000000100f5d180 Python`PyEval_EvalCode + 200
"""


def test_mps_sync_from_a_public_report():
    from lnsp.diagnose.diagnosis import judge_stack_text

    v = judge_stack_text(MPS_REPORT)
    assert v["kind"] == "mps-sync", v
    assert "waitUntilCompleted" in v["summary"]
    # The same judge on an idle thread's backtrace does not call it an MPS hang.
    idle = "\n".join(line for line in MPS_REPORT.splitlines() if "MTL" not in line
                     and "mps" not in line)
    assert judge_stack_text(idle)["kind"] == "unknown"


def _memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory folder, where a child group can be made."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return folder if os.access(folder, os.W_OK) else None
    return None


def test_swapping_under_a_memory_limit(tmp_path, reap):
    """A 160 MB working set under a 64 MB cgroup limit. Where the machine has no swap,
    the test adds a 256 MB swap file for its own duration (root only) and removes it."""
    parent = _memory_cgroup()
    if os.geteuid() != 0 or parent is None:
        pytest.skip("needs root and a writable cgroup v1 memory controller")
    swapfile = None
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    if int(meminfo["SwapTotal"].split()[0]) == 0:
        swapfile = tmp_path / "swap"
        made = subprocess.run(f"fallocate -l 256M {swapfile} && chmod 600 {swapfile} && "
                              f"mkswap {swapfile} && swapon {swapfile}", shell=True,
                              capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"cannot add a swap file here: {made.stderr.strip()[-200:]}")
    group = parent / f"lnsp-test-{os.getpid()}"
    group.mkdir()
    proc = None
    try:
        (group / "memory.limit_in_bytes").write_text(str(64 << 20))
        proc = start("swap_thrash.py", 160, reap=reap,
                     preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        ready(proc)
        v = diagnose(proc.pid)
        assert v["kind"] == "swapping", v
        assert "major page faults" in v["summary"]
    finally:
        if proc:
            proc.kill()
            proc.wait()
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), 10,
                   what="the cgroup to empty")
        group.rmdir()
        if swapfile:
            subprocess.run(["swapoff", str(swapfile)], check=True)


# ---------------------------------------------------------------- where a stall is seen

BUNDLE_FILES = {"verdict.json", "verdict.txt", "samples.json", "folded.txt", "doctor.json",
                "heartbeat.json", "log-tail.txt", "config.json", "run.json"}


def test_watchdog_verdict_in_the_log_exit_json_bundle_and_status(small_data, tmp_path):
    from conftest import finish, spawn

    gate, run = tmp_path / "gate", tmp_path / "run"
    os.mkfifo(gate)
    proc = spawn("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--stall-timeout", "2", "--on-stall", "exit", fault="deadlock", at_step=5,
                 extra_env={"LNSP_TEST_GATE": gate})
    code, out = finish(proc, timeout=90)
    assert code == 3, out
    log = (run / "training.log").read_text()
    assert "[WATCHDOG] no progress for" in log
    assert "[WATCHDOG] VERDICT deadlock: The main thread waits forever on a lock" in log, log
    ended = read_json(run / "exit.json")
    assert ended["state"] == "stalled" and ended["verdict"] == "deadlock"
    assert ended["cause"].startswith("deadlock: ") and "driver.py" in ended["cause"]
    bundle = Path(ended["bundle"])
    assert bundle.parent == run / "dumps" and bundle.name.endswith("-deadlock")
    assert {p.name for p in bundle.iterdir()} >= BUNDLE_FILES
    verdict = read_json(bundle / "verdict.json")
    beat = read_json(bundle / "heartbeat.json")
    # Diagnosed within the stall timeout + 5 s of the last step (+ one watchdog tick).
    assert verdict["time"] - beat["time"] <= 2 + 5 + 0.5, (verdict["time"], beat["time"])
    tail = (bundle / "log-tail.txt").read_text().splitlines()
    assert len(tail) <= 200 and any("[WATCHDOG] no progress" in line for line in tail)
    assert "deadlock" in (bundle / "folded.txt").read_text()
    assert read_json(bundle / "doctor.json").get("pools"), "doctor snapshot"
    r = lnsp("status", run)
    assert r.returncode == 0, r.stderr
    assert "cause: deadlock: The main thread waits forever" in r.stdout, r.stdout


def test_a_training_run_is_running_then_its_supervisor_explains_the_freeze(small_data, tmp_path, reap):
    # Frozen: native code that keeps the GIL, so its own watchdog cannot run either (a
    # SIGSTOP'd trainer is paused, not frozen: tests/test_control.py). It strikes once
    # the test, having seen the healthy run, creates the trigger file.
    run, trigger, marker = tmp_path / "run", tmp_path / "trigger", tmp_path / "frozen"
    proc = spawn("supervise", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--epochs", "50", "--stall-timeout", "2", "--max-restarts", "0",
                 fault="gil_held", at_step=3, marker=marker,
                 extra_env={"LNSP_TEST_TRIGGER": trigger}, cwd=tmp_path)
    reap(proc.pid)
    first = wait_until(lambda: (read_json(run / "run.json") or {}).get("pid"), 60,
                       what="the trainer's pid")
    reap(first)
    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 3, 60,
               what="step 3")
    # A run that just trains is `running`, never a hang.
    healthy = diagnose(run)
    assert healthy["kind"] == "running", healthy
    assert "heartbeat step" in healthy["evidence"][0]
    trigger.touch()
    wait_until(marker.exists, 60, what="the freeze")
    ended = wait_until(lambda: (lambda e: e if e and e.get("state") == "stalled" else None)(
        read_json(run / "exit.json")), 60, what="the supervisor's stall record")
    assert ended["frozen"] and ended.get("verdict"), ended
    assert (Path(ended["bundle"]) / "verdict.json").exists()
    assert f"[SUPERVISOR] VERDICT {ended['verdict']}: " in (run / "training.log").read_text()


def _interpreter_without_libpython() -> str:
    """A real interpreter to copy: Debian's (not linked to a shared libpython, so only
    its name can say it is Python), else this one."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no interpreter binary to copy")


def test_an_interpreter_named_Python_as_on_macOS_is_diagnosed(tmp_path, reap):
    # A framework build (python.org, Homebrew) runs as .../Python.app/Contents/MacOS/Python.
    real = _interpreter_without_libpython()
    home = subprocess.run([real, "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    copy = tmp_path / "Python.app" / "Contents" / "MacOS" / "Python"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(Path(real).read_bytes())
    copy.chmod(0o755)
    fifo = tmp_path / "gate"
    proc = subprocess.Popen([str(copy), str(HANGS / "fifo_open.py"), str(fifo)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**env(), "PYTHONHOME": home})
    reap(proc.pid)
    ready(proc)
    settle(proc.pid)
    r = lnsp("diagnose", proc.pid, "--samples", 2, "--interval", INTERVAL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not a Python process" not in r.stderr
    assert r.stdout.startswith("VERDICT blocked-io: ") and str(fifo) in r.stdout, r.stdout


def test_without_proc_as_on_macos_a_stuck_worker_is_alive_and_the_target_is_judged(tmp_path,
                                                                                   reap):
    """Every /proc read goes through lnsp.system: faked as macOS, the diagnosis takes
    psutil's view (state, CPU, environment), and a live child is not read as gone."""
    from lnsp.diagnose.proc import environ, peek, proc_snapshot

    fifo = tmp_path / "gate"
    proc = start("fifo_open.py", fifo, reap=reap)
    ready(proc)
    settle(proc.pid)
    child = subprocess.Popen(["sleep", "60"])
    reap(child.pid)
    os.environ[FAKE] = "darwin"
    try:
        snap = proc_snapshot(proc.pid)
        assert "proc_cpu_s" in snap and snap["state"] == "S" and snap["threads"] == {}
        # Alive and asleep (read as "gone" before), once `sleep` has started.
        wait_until(lambda: peek(child.pid)["state"] == "S", 10, what="sleep asleep")
        assert environ(os.getpid())["PATH"] == os.environ["PATH"]
        v = diagnose(proc.pid)
    finally:
        del os.environ[FAKE]
    assert v["kind"] in KINDS and v["pid"] == proc.pid, v
    # py-spy reads the stacks here (root); without /proc the blocking call is unknown.
    assert "fifo_open.py" in v["summary"] or any("fifo_open.py" in e for e in v["evidence"]), v
