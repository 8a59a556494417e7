"""`lnsp doctor`: the live thread pools, the environment, the tools, the hazards."""

import json
import subprocess
import sys

from conftest import MACOS, env, lnsp


def test_doctor_json_names_pools_tools_and_hazards():
    r = lnsp("doctor", "--json", extra_env={"LNSP_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    # macOS: numpy's arm64 wheels use Accelerate, which threadpoolctl does not list.
    assert {p["api"] for p in facts["pools"]} >= ({"openmp"} if MACOS else {"openmp", "openblas"})
    assert facts["thread_env"]["OMP_NUM_THREADS"] == "2"
    assert facts["start_method"] == "spawn"
    assert set(facts["tools"]) == {"caffeinate", "tmux", "docker", "py-spy"}
    assert facts["docker_engine"]
    if not MACOS:  # torch's and faiss's libgomp here; a Mac's copies are tested with fakes
        assert any("OpenMP runtimes loaded" in h for h in facts["hazards"])
    # threadpoolctl sets KMP_DUPLICATE_LIB_OK in its own process: not the user's setting
    # (said as such where it hides a second libomp, as on a Mac).
    assert facts["thread_env"]["KMP_DUPLICATE_LIB_OK"] is None
    assert not any("KMP_DUPLICATE_LIB_OK" in h and "set by threadpoolctl" not in h
                   for h in facts["hazards"])


def test_doctor_names_block_buffered_output():
    e = env()
    e.pop("PYTHONUNBUFFERED")
    r = subprocess.run([sys.executable, "-m", "lnsp", "doctor"], capture_output=True,
                       text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "block-buffered" in r.stdout and "PYTHONUNBUFFERED unset" in r.stdout


def test_doctor_names_kmp_duplicate_lib_ok():
    r = lnsp("doctor", "--json", extra_env={"KMP_DUPLICATE_LIB_OK": "TRUE"})
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["thread_env"]["KMP_DUPLICATE_LIB_OK"] == "TRUE"
    assert any(h.startswith("KMP_DUPLICATE_LIB_OK=TRUE hides") for h in facts["hazards"])
