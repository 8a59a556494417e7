"""lnsp.system: what differs on macOS, tested on Linux through LNSP_FAKE_PLATFORM
and real processes (a real interpreter, a real process named caffeinate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MACOS, env, wait_until

from lnsp import system


def test_the_fake_platform_is_read_in_one_place(monkeypatch):
    monkeypatch.delenv(system.FAKE_ENV, raising=False)
    assert system.system() == sys.platform
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    assert system.system() == "darwin" and system.is_macos()
    assert not system.has_proc()  # macOS has no /proc, whatever this machine has
    assert system.system("linux") == "linux"


@pytest.mark.parametrize("exe", [
    "/Library/Frameworks/Python.framework/Versions/3.12/Resources/Python.app/Contents/MacOS/Python",
    "/opt/homebrew/Cellar/python@3.11/3.11.9/Frameworks/Python.framework/Versions/3.11/"
    "Resources/Python.app/Contents/MacOS/Python",
    "Python", "python", "python3", "python3.11", "/usr/bin/python3.13t", "pypy3", "pypy3.10",
    "PYTHON.EXE"])
def test_interpreters_are_python(exe):
    assert system.is_python(exe)


@pytest.mark.parametrize("exe", ["sleep", "/bin/bash", "ipython-notebook", "mypython",
                                 "python-config", "caffeinate", ""])
def test_other_programs_are_not(exe):
    assert not system.is_python(exe)


def test_signal_numbers_by_system():
    # SIGUSR1 is 30 on macOS; 30 on Linux is SIGPWR, whose default action ends a process.
    assert system.signal_number("SIGUSR1", "darwin") == 30
    assert system.signal_number("USR1", "linux") == 10
    assert system.signal_name(30, "darwin") == "SIGUSR1"
    assert system.signal_name(30, "linux") == "SIGPWR"
    assert system.signal_name(15, "darwin") == system.signal_name(15, "linux") == "SIGTERM"
    # The host's own table is the signal module's.
    assert system.signal_name(int(signal.SIGUSR1)) == "SIGUSR1"
    assert system.signal_number("SIGUSR1") == int(signal.SIGUSR1)
    with pytest.raises(ValueError):  # macOS has 31 signals
        system.signal_name(64, "darwin")


def test_peak_rss_is_bytes_on_both_systems():
    # getrusage(2): ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    assert system.peak_rss_bytes(2048, "linux") == 2048 * 1024
    assert system.peak_rss_bytes(2048 * 1024, "darwin") == 2048 * 1024
    # This process, read for real: more than 10 MB and less than the machine.
    import psutil

    assert 10 * 2**20 < system.peak_rss_bytes() <= psutil.virtual_memory().total


def test_ptrace_problem_is_named_in_each_systems_words():
    assert "sudo" in system.ptrace_problem("darwin")
    assert "ptrace" in system.ptrace_problem("linux")


def _fake_tool(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_a_tool_is_found_beside_the_interpreter_then_beside_lnsps_then_on_path(tmp_path):
    """One order for py-spy and pystack (dumps, diagnose, doctor): a real interpreter,
    run from a folder of its own, finds the copy beside it before the one beside lnsp's
    interpreter (LNSP_PYTHON), and that one before the one first on PATH."""
    own, lnsps, on_path = (tmp_path / name for name in ("own", "lnsp", "path"))
    for folder in (own, lnsps, on_path):
        folder.mkdir()
        _fake_tool(folder, "py-spy", "exit 0\n")
    (own / "python").symlink_to(sys.executable)
    probe = ("import importlib.util as u, sys; s = u.spec_from_file_location('s', sys.argv[1]); "
             "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.tool('py-spy'))")

    def found() -> str:
        env = {**os.environ, "LNSP_PYTHON": str(lnsps / "python"),
               "PATH": f"{on_path}{os.pathsep}{os.environ['PATH']}"}
        out = subprocess.run([str(own / "python"), "-c", probe, system.__file__], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert found() == str(own / "py-spy")
    (own / "py-spy").unlink()
    assert found() == str(lnsps / "py-spy")
    (lnsps / "py-spy").unlink()
    assert found() == str(on_path / "py-spy")


def _caffeinate_path(folder, body: str) -> dict:
    """The environment whose PATH finds `caffeinate`: a Mac's own /usr/bin/caffeinate,
    elsewhere a shell script of that name (its process is named after the script)."""
    if not MACOS:
        _fake_tool(folder, "caffeinate", body)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_performance_cores_where_macos_says(tmp_path, monkeypatch):
    # `sysctl hw.perflevel0.physicalcpu` as on Apple silicon: a sysctl first on PATH.
    _fake_tool(tmp_path, "sysctl",
               '[ "$2" = hw.perflevel0.physicalcpu ] && echo 4 || exit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert system.performance_cores("darwin") == 4
    assert system.performance_cores("linux") is None
    # An Intel Mac has no perflevel0: the caller falls back.
    _fake_tool(tmp_path, "sysctl", "echo 'unknown oid' >&2; exit 1\n")
    assert system.performance_cores("darwin") is None


def test_caffeinate_as_a_sibling_holds_the_trainer(tmp_path, reap):
    """The supervisor starts `caffeinate -i -s -w PID` beside the trainer: a real process
    named caffeinate (a script first on PATH) must count, and only for that PID."""
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reap(trainer.pid)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reap(other.pid)
    assert not system.caffeinate_held(trainer.pid)
    # A shell script's process is named after the script (comm), not `sh`, as long as
    # it does not exec another program: sleep in the background and wait for it.
    env = _caffeinate_path(tmp_path, "sleep 60 & wait\n")
    power = subprocess.Popen(["caffeinate", "-i", "-s", "-w", str(trainer.pid)], env=env,
                             start_new_session=True)  # its group: the script's sleep too
    reap(power.pid)
    import psutil

    wait_until(lambda: psutil.Process(power.pid).name() == "caffeinate", 10,
               what="a process named caffeinate")
    assert system.caffeinate_held(trainer.pid)
    assert not system.caffeinate_held(other.pid)
    os.killpg(power.pid, signal.SIGKILL)
    power.wait()
    assert not system.caffeinate_held(trainer.pid)


def test_caffeinate_as_a_parent_holds_the_process(tmp_path, reap):
    # `caffeinate -i python train.py`: the power assertion is the process's parent.
    env = _caffeinate_path(tmp_path, '"$@" & wait\n')
    power = subprocess.Popen(["caffeinate", sys.executable, "-c", "import time; time.sleep(60)"],
                             env=env)
    reap(power.pid)
    import psutil

    child = wait_until(lambda: psutil.Process(power.pid).children(), 10, what="the child")[0]
    reap(child.pid)
    assert system.caffeinate_held(child.pid)
    assert not system.caffeinate_held(os.getpid())


def test_openmp_runtimes_classified():
    torch_mac = "/x/site-packages/torch/lib/libomp.dylib"
    faiss_mac = "/x/site-packages/faiss/.dylibs/libomp.dylib"
    kind, line = system.openmp_conflict([torch_mac, faiss_mac], "darwin")
    assert kind == "duplicate" and "Error #15" in line and "macOS wheels" in line
    assert torch_mac in line and faiss_mac in line
    # One runtime, seen twice, is one runtime.
    assert system.openmp_conflict([torch_mac, torch_mac], "darwin") is None
    kind, line = system.openmp_conflict(
        ["/x/torch/lib/libgomp-a34b3233.so.1", "/x/faiss_cpu.libs/libgomp-d22c30c5.so.1.0.0"],
        "linux")
    assert kind == "copies" and "fork" in line
    kind, line = system.openmp_conflict(["/usr/lib/libgomp.so.1", "/opt/intel/libiomp5.so"])
    assert kind == "mixed" and "GNU libgomp" in line and "Intel libiomp5" in line
    assert system.openmp_conflict(["/usr/lib/libgomp.so.1", "/usr/lib/libopenblas.so"]) is None


def test_ranks_on_one_mac_talk_over_lo0():
    # gloo resolves the host's name for its interface; a Mac's `.local` name may not
    # resolve to the loopback. A user's own choice wins; Linux is left alone.
    assert system.gloo_loopback({}, "darwin") == {"GLOO_SOCKET_IFNAME": "lo0"}
    assert system.gloo_loopback({"GLOO_SOCKET_IFNAME": "en0"}, "darwin") == {}
    assert system.gloo_loopback({}, "linux") == {}


def test_exchange_swaps_two_folders_in_one_call(tmp_path):
    """What `lnsp data from-text --force` publishes with: the old data set and the new
    change places at once (a kill between two renames used to leave neither at --out)."""
    old, new = tmp_path / "out", tmp_path / ".out.tmp"
    old.mkdir()
    new.mkdir()
    (old / "bank.npy").write_text("old")
    (new / "bank.npy").write_text("new")
    assert system.exchange(new, old) is True
    assert (old / "bank.npy").read_text() == "new" and (new / "bank.npy").read_text() == "old"


def test_publish_replaces_the_data_set_without_moving_it_aside(tmp_path):
    from lnsp.data.text import publish

    out, tmp = tmp_path / "docs", tmp_path / ".docs.tmp"
    out.mkdir()
    tmp.mkdir()
    (out / "bank.npy").write_text("old")
    (tmp / "bank.npy").write_text("new")
    publish(tmp, out, force=True)
    assert (out / "bank.npy").read_text() == "new" and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["docs"]  # no .docs.old-PID beside it


def test_slow_line_names_caffeinate_only_when_none_holds_this_process(tmp_path, monkeypatch,
                                                                      reap):
    """[SLOW]'s words on a Mac (faked): with `caffeinate -w <this pid>` running beside the
    process (as lnsp's launchers start it) the line does not blame App Nap; without it,
    it does. It looked among the parents before, and blamed App Nap every time."""
    from lnsp.guard.watchdog import slow_context

    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    assert "no caffeinate power assertion" in slow_context(60)
    env = _caffeinate_path(tmp_path, "sleep 60 & wait\n")
    power = subprocess.Popen(["caffeinate", "-i", "-s", "-w", str(os.getpid())], env=env,
                             start_new_session=True)
    reap(power.pid)
    import psutil

    wait_until(lambda: psutil.Process(power.pid).name() == "caffeinate", 10,
               what="a process named caffeinate")
    try:
        assert "no caffeinate power assertion" not in slow_context(60)
    finally:
        os.killpg(power.pid, signal.SIGKILL)
        power.wait()


def test_a_cgroup_cpu_quota_caps_the_cores_and_is_named_when_slow():
    """A real cgroup v1 cpu group with a quota of one core: a process inside it reads the
    quota (lnsp.system.cgroup_cpu), sizes its pools to it (cpu_count) and names it in a
    [SLOW] line; before, both read only cgroup v2's root and saw no quota here."""
    folder = Path(f"/sys/fs/cgroup/cpu/lnsp-test-quota-{os.getpid()}")
    try:
        folder.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup v1 cpu group here ({e})")
    try:
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text("100000")
        probe = ("import json; from lnsp import system; from lnsp.guard import threads; "
                 "from lnsp.guard.watchdog import slow_context; print(json.dumps("
                 "[system.cgroup_cpu(), threads.cpu_count(), slow_context(60)]))")
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env(), capture_output=True, text=True,
            timeout=60, preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid())))
        assert out.returncode == 0, out.stderr
        quota, cores, slow = json.loads(out.stdout)
        assert quota["cgroup"] == str(folder), quota
        assert (quota["quota"], quota["cores"]) == ("100000 100000", 1.0), quota
        assert cores == 1 and "CPU quota 1.00 cores" in slow, (cores, slow)
    finally:
        wait_until(lambda: not (folder / "cgroup.procs").read_text().strip(), 10,
                   what="the cgroup to empty")
        folder.rmdir()


def test_faiss_uses_torchs_libomp_on_a_mac_after_setup(tmp_path):
    """The wheels' layout on macOS (faiss/.dylibs/libomp.dylib beside
    torch/lib/libomp.dylib), faked: after `make setup` faiss's copy is a link to
    torch's, so a process that imports both maps one OpenMP runtime. Linux is left as
    it is."""
    faiss_copy = tmp_path / "faiss" / ".dylibs" / "libomp.dylib"
    torch_copy = tmp_path / "torch" / "lib" / "libomp.dylib"
    for path, body in ((faiss_copy, b"faiss's libomp"), (torch_copy, b"torch's libomp")):
        path.parent.mkdir(parents=True)
        path.write_bytes(body)
    assert system.share_openmp(tmp_path, fake="linux") == []
    assert not faiss_copy.is_symlink()
    linked = system.share_openmp(tmp_path, fake="darwin")
    assert linked and faiss_copy.is_symlink() and faiss_copy.read_bytes() == b"torch's libomp"
    assert system.share_openmp(tmp_path, fake="darwin") == []  # once is enough
    assert system.openmp_conflict([str(faiss_copy.resolve()), str(torch_copy.resolve())],
                                  fake="darwin") is None  # one file: one runtime
