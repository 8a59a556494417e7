"""Two OpenMP runtimes in one process, named by `lnsp doctor` and by the hang catalogue
as the hazard each pair is: two libomp.dylib copies on macOS (torch's and faiss's
wheels), different families anywhere, two libgomp copies on Linux (torch's and faiss's
wheels here). macOS's pair is fed through the fake platform; Linux's is this machine's.
Beside them, py-spy's permission problem, named in each system's words."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lnsp

from lnsp import system
from lnsp.diagnose import doctor
from lnsp.diagnose import hangs

IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"  # the intel-openmp wheel (Linux x86_64)
TORCH_MAC = "/Users/me/.venv/lib/python3.12/site-packages/torch/lib/libomp.dylib"
FAISS_MAC = "/Users/me/.venv/lib/python3.12/site-packages/faiss/.dylibs/libomp.dylib"


def facts(pools, user_kmp=None, here=None) -> dict:
    """What doctor.facts() gathers, with the pools given."""
    return {"pools": pools, "thread_env": {"KMP_DUPLICATE_LIB_OK": user_kmp},
            "kmp_duplicate_lib_ok_here": here, "start_method": "spawn",
            "stdout_tty": True, "python_unbuffered": True,
            "open_files": {"soft": 65536, "hard": 65536},
            "tools": {"caffeinate": "/usr/bin/caffeinate", "tmux": None, "docker": None,
                      "py-spy": "/x/py-spy"}}


def omp(path: str) -> dict:
    return {"api": "openmp", "threads": 8, "library": path.rsplit("/", 1)[-1], "filepath": path,
            "version": None, "threading_layer": None}


def test_doctor_names_two_libomp_copies_on_macos(monkeypatch):
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    found = doctor.hazards(facts([omp(TORCH_MAC), omp(FAISS_MAC)], here="True"))
    line = next(h for h in found if "OpenMP runtimes loaded" in h)
    assert "2 copies of LLVM libomp" in line and "Error #15" in line, line
    assert TORCH_MAC in line and FAISS_MAC in line
    # threadpoolctl's True, not the user's: said so.
    assert any(h.startswith("KMP_DUPLICATE_LIB_OK=True in this process was set by "
                            "threadpoolctl") for h in found), found


def test_doctor_names_the_users_kmp_duplicate_lib_ok_beside_the_copies(monkeypatch):
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    found = doctor.hazards(facts([omp(TORCH_MAC), omp(FAISS_MAC)], user_kmp="TRUE",
                                 here="TRUE"))
    assert any(h.startswith("KMP_DUPLICATE_LIB_OK=TRUE hides") for h in found), found
    assert not any("set by threadpoolctl" in h for h in found)


def test_doctor_names_mixed_families_and_libgomp_copies():
    found = doctor.hazards(facts([omp("/usr/lib/libgomp.so.1"), omp("/opt/intel/libiomp5.so")]))
    assert any("different OpenMP runtimes" in h and "MKL_THREADING_LAYER=GNU" in h
               for h in found), found
    found = doctor.hazards(facts([omp("/x/torch/lib/libgomp-a34b3233.so.1"),
                                  omp("/x/faiss_cpu.libs/libgomp-d22c30c5.so.1.0.0")]))
    assert any("2 copies of GNU libgomp" in h and "fork" in h for h in found), found
    assert not doctor.hazards(facts([omp("/usr/lib/libgomp.so.1")]))


@pytest.mark.skipif(sys.platform != "linux", reason="torch's and faiss's Linux wheels")
def test_doctor_here_names_torchs_and_faisss_libgomp_with_their_paths():
    r = lnsp("doctor", "--json")
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    paths = [p["filepath"] for p in f["pools"] if p["api"] == "openmp"]
    line = next(h for h in f["hazards"] if "OpenMP runtimes loaded" in h)
    assert all(p in line for p in paths) and "copies of GNU libgomp" in line, line


def stuck_in_openmp(runtimes: list[str], environ=None) -> hangs.Facts:
    """A main thread that sat in __kmp_suspend_64 (libomp) for two samples at 0% CPU."""
    frames = [{"name": "__kmp_suspend_64", "file": "libomp.dylib", "path": TORCH_MAC,
               "line": 0, "native": True},
              {"name": "train_step", "file": "train.py", "path": "train.py", "line": 9,
               "native": False}]
    samples = []
    for i in range(2):
        thread = {"comm": "main", "state": "S", "cpu_s": 0.0, "wait_s": 0.0, "wchan": None,
                  "syscall": None}
        samples.append({"time": float(i), "state": "S", "ppid": 0, "pgrp": 1, "tty_nr": 0,
                        "tpgid": -1, "majflt": 0, "pswpin": 0, "pswpout": 0,
                        "threads": {1: thread}, "throttle": None, "pyspy": True,
                        "stacks": {1: {"name": "main", "owns_gil": None, "frames": frames}}})
    from lnsp.diagnose.diagnosis import fold

    ctx = {"runtimes": [{"path": p, "api": "openmp", "family": system.openmp_family(p)}
                        for p in runtimes], "environ": environ or {}}
    return hangs.Facts(pid=1, samples=samples, threads=fold(samples), ctx=ctx)


def test_catalogue_names_two_libomp_copies_as_the_duplicate_runtime_hang(monkeypatch):
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    v = hangs.judge(stuck_in_openmp([TORCH_MAC, FAISS_MAC], {"KMP_DUPLICATE_LIB_OK": "TRUE"}))
    assert v["kind"] == "duplicate-openmp", v
    assert "2 copies of LLVM libomp" in v["summary"] and "Error #15" in v["summary"]
    assert any(e.startswith("hazard: 2 copies of LLVM libomp loaded (torch's and faiss-cpu's "
                            "macOS wheels") for e in v["evidence"]), v["evidence"]
    assert any("KMP_DUPLICATE_LIB_OK=TRUE hides" in e for e in v["evidence"])


def test_catalogue_keeps_libgomp_copies_a_hazard_but_not_the_verdict():
    v = hangs.judge(stuck_in_openmp(["/x/torch/lib/libgomp-a34b3233.so.1",
                                     "/x/faiss_cpu.libs/libgomp-d22c30c5.so.1.0.0"]))
    assert v["kind"] != "duplicate-openmp", v
    assert any(e.startswith("hazard: 2 copies of GNU libgomp") for e in v["evidence"])


def test_mapped_files_on_macos_come_from_lsof(tmp_path, monkeypatch):
    # macOS has no /proc/PID/maps: `lsof -Fn` lists the loaded dylibs (a fake lsof here).
    lsof = tmp_path / "lsof"
    lsof.write_text(f"#!/bin/sh\nprintf 'p42\\nftxt\\nn/usr/bin/python3\\nftxt\\nn{TORCH_MAC}\\n"
                    f"ftxt\\nn{FAISS_MAC}\\nf3\\nn{TORCH_MAC}\\nf4\\nnlocalhost:5000\\n'\n")
    lsof.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    from lnsp.diagnose.proc import runtimes

    assert [r["path"] for r in runtimes(42)] == [TORCH_MAC, FAISS_MAC]
    monkeypatch.delenv(system.FAKE_ENV)
    if system.has_proc():  # Linux: this process's own maps, read for real
        assert os.path.realpath(sys.executable) in system.mapped_files(os.getpid())


def test_unread_stacks_are_explained_in_each_systems_words(monkeypatch):
    facts = stuck_in_openmp([])
    for s in facts.samples:
        s["pyspy"] = False
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    assert any("py-spy needs sudo on macOS" in e for e in hangs.judge(facts)["evidence"])
    monkeypatch.setenv(system.FAKE_ENV, "linux")
    assert any("no ptrace permission" in e for e in hangs.judge(facts)["evidence"])


def test_doctor_on_macos_says_py_spy_needs_sudo(monkeypatch):
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    monkeypatch.setattr(os, "geteuid", lambda: 501)  # a Mac's first user, not root
    found = doctor.hazards(facts([]))
    assert any(h.startswith("py-spy needs sudo on macOS") and "sudo lnsp diagnose PID" in h
               for h in found), found
    monkeypatch.setenv(system.FAKE_ENV, "linux")
    assert not any("sudo" in h for h in doctor.hazards(facts([])))


# Values of KMP_DUPLICATE_LIB_OK: words the runtime takes in part, in full only, with
# text after them, and its noes (None: unset).
KMP_VALUES = ["TRUE", "True", "t", "1", "10", "yes", "y", "yesterday", "on", ".t.", "enabled",
              "FALSE", "0", "", "no", "o", "off", "enable", "2", None]


@pytest.mark.skipif(not IOMP.exists(), reason="needs Intel's OpenMP runtime (libiomp5): "
                                               "pip install -e '.[test]' on Linux x86_64")
def test_kmp_duplicate_lib_ok_is_read_as_the_openmp_runtime_reads_it(tmp_path):
    """Two copies of libiomp5 started in one real process, once per value: the process
    lives past the second copy exactly where lnsp.system.kmp_duplicate_ok says yes (the
    doctor and the hang catalogue ask it); else OMP: Error #15 aborts it."""
    copies = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        copies.append(str(shutil.copy(IOMP, tmp_path / name)))
    start = ("import ctypes, sys\n"
             "for path in sys.argv[1:]:\n    ctypes.CDLL(path).omp_get_max_threads()")
    lived = []
    for value in KMP_VALUES:
        env = {k: v for k, v in os.environ.items() if k != "KMP_DUPLICATE_LIB_OK"}
        if value is not None:
            env["KMP_DUPLICATE_LIB_OK"] = value
        out = subprocess.run([sys.executable, "-c", start, *copies], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 or "Error #15" in out.stderr, out.stderr
        lived.append(out.returncode == 0)
    assert dict(zip(KMP_VALUES, map(system.kmp_duplicate_ok, KMP_VALUES))) == \
        dict(zip(KMP_VALUES, lived))
    assert True in lived and False in lived
