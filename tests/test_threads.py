"""The thread policy: set before heavy imports, enforced on every live pool, and the
fork-after-OpenMP hang unreachable from lnsp."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_TRAIN, MACOS, env, lnsp, read_json, wait_until

READ_POOLS = """
import json, sys
import lnsp
from lnsp.guard import threads
import numpy, torch, faiss
threads.enforce()
print(json.dumps({"pools": threads.pools(), "torch": torch.get_num_threads(),
                  "faiss": faiss.omp_get_max_threads()}))
"""


def pools(*argv, **extra_env):
    r = subprocess.run([sys.executable, "-c", READ_POOLS, *argv], capture_output=True,
                       text=True, env=env(**extra_env), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(autouse=True)
def no_user_thread_vars(monkeypatch):
    from lnsp.guard.threads import THREAD_VARS

    for name in (*THREAD_VARS, "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT",
                 "LNSP_THREADS", "LNSP_THREAD_DEFAULTS"):
        monkeypatch.delenv(name, raising=False)


def test_safe_policy_gives_one_thread_in_every_pool():
    live = pools("--threads", "safe")
    assert live["torch"] == 1 and live["faiss"] == 1
    assert live["pools"] and all(p["threads"] == 1 for p in live["pools"]), live


def test_fast_policy_sizes_openmp_and_keeps_blas_at_one():
    live = pools("--threads", "2")
    assert live["torch"] == 2 and live["faiss"] == 2
    for p in live["pools"]:
        expected = 2 if p["api"] == "openmp" or p["threading_layer"] == "openmp" else 1
        assert p["threads"] == expected, p


def test_the_users_own_variables_win():
    live = pools("--threads", "fast", OMP_NUM_THREADS="1")
    assert live["torch"] == 1 and all(p["threads"] == 1 for p in live["pools"]), live


def test_variables_are_set_before_numpy_loads():
    code = ("import os, lnsp, numpy; "
            "print(os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS'])")
    r = subprocess.run([sys.executable, "-c", code, "--threads", "safe"], capture_output=True,
                       text=True, env=env(), timeout=60)
    assert r.stdout.split() == ["1", "1"], r.stderr


def test_dataloader_workers_with_two_threads_finish(small_data, tmp_path):
    """Workers after OpenMP work would hang if forked; lnsp starts them with spawn."""
    run = tmp_path / "run"
    r = lnsp("train", "--data", small_data, "--run-dir", run, *FAST_TRAIN, "--threads", "2",
             "--workers", "2", "--max-steps", "30", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_json(run / "exit.json")["state"] == "finished"


def test_a_resumed_run_keeps_its_stored_policy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"threads": "safe"}))
    code = "import os, lnsp; print(os.environ['OMP_NUM_THREADS'])"
    r = subprocess.run([sys.executable, "-c", code, "train", "--run-dir", str(tmp_path),
                        "--resume"], capture_output=True, text=True, env=env(), timeout=60)
    assert r.stdout.strip() == "1", r.stderr


def test_fast_shares_the_cores_between_the_ranks_of_a_machine():
    from lnsp.guard.threads import cpu_count, parse_policy

    assert parse_policy("fast", ranks=1)[1] == cpu_count()
    assert parse_policy("fast", ranks=cpu_count())[1] == 1
    assert parse_policy("fast", ranks=4 * cpu_count())[1] == 1
    assert parse_policy("3", ranks=2)[1] == 3  # an explicit count stays as given


LAUNCH_ENV = """
import lnsp  # chooses this process's own thread variables, as every lnsp command does
from lnsp.config import TrainConfig
from lnsp.launch.command import environment
from lnsp.guard.threads import cpu_count
print(environment(TrainConfig(threads="safe"), "nohup")["OMP_NUM_THREADS"],
      environment(TrainConfig(threads="fast"), "ddp", cpu_count())["OMP_NUM_THREADS"])
"""


def test_a_launcher_passes_on_the_runs_policy_not_its_own():
    r = subprocess.run([sys.executable, "-c", LAUNCH_ENV], capture_output=True, text=True,
                       env=env(), timeout=60)
    assert r.stdout.split() == ["1", "1"], r.stderr


def test_a_launcher_passes_on_the_users_own_values():
    r = subprocess.run([sys.executable, "-c", LAUNCH_ENV], capture_output=True, text=True,
                       env=env(OMP_NUM_THREADS="3"), timeout=60)
    assert r.stdout.split() == ["3", "3"], r.stderr


BLAS_SEARCH = """
import glob, json
import lnsp
import numpy as np, faiss
from lnsp.guard import threads
threads.enforce()
def ticks():
    out = {}
    for task in glob.glob("/proc/self/task/*"):
        fields = open(task + "/stat").read().rsplit(")", 1)[1].split()
        out[task] = int(fields[11]) + int(fields[12])  # utime + stime
    return out
bank = np.random.default_rng(0).standard_normal((10000, 768), dtype=np.float32)
index = faiss.IndexFlatIP(768)
index.add(bank)
index.search(bank[:64], 101)
before = ticks()
for _ in range(15):
    index.search(bank[:64], 101)  # 64 queries: faiss's BLAS path
after = ticks()
print(json.dumps(sorted((after[t] - before.get(t, 0) for t in after), reverse=True)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_a_blas_bound_faiss_search_runs_on_every_core_of_the_policy():
    """Per-thread CPU time, not wall time: the second thread must carry its share of a
    flat search at 64 queries however loaded the machine is."""
    r = subprocess.run([sys.executable, "-c", BLAS_SEARCH, "--threads", "2"],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr
    busiest = json.loads(r.stdout)
    assert busiest[1] >= 0.3 * busiest[0] > 0, busiest


def test_fast_spins_briefly_only_for_one_process_on_an_idle_machine():
    """Idle OpenMP threads spin ~0.1 ms (GOMP_SPINCOUNT) before sleeping only where that
    was measured to pay: `fast`, more than one thread, one process, fewer other
    processes wanting a core than half the threads. Everywhere else they sleep at once
    (PASSIVE)."""
    from lnsp.guard.threads import SPIN_COUNT, machine_idle, policy_env, runnable_others

    assert policy_env("2", load=0.3)["GOMP_SPINCOUNT"] == str(SPIN_COUNT)
    for quiet in (policy_env("2", load=1.0), policy_env("2", load=6.0),
                  policy_env("safe", load=0.0), policy_env("2", ranks=2, load=0.0)):
        assert "GOMP_SPINCOUNT" not in quiet and quiet["OMP_WAIT_POLICY"] == "PASSIVE", quiet
    assert machine_idle(8, 3.9) and not machine_idle(8, 4.0)
    if MACOS:  # no procs_running there: the 1-minute load average needs a minute to rise
        return
    # Measured here: a busy process of our own is seen wanting a core.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_until(lambda: runnable_others() >= 1, 10, what="the busy process runnable")
    finally:
        busy.kill()
        busy.wait()


def test_a_spin_chosen_for_the_parent_is_not_inherited_but_the_users_is():
    code = "import os, lnsp; print(os.environ.get('GOMP_SPINCOUNT'))"
    run = lambda **e: subprocess.run([sys.executable, "-c", code, "--threads", "safe"],
                                     capture_output=True, text=True, env=env(**e),
                                     timeout=60).stdout.strip()
    assert run(GOMP_SPINCOUNT="10000", LNSP_THREAD_DEFAULTS="OMP_NUM_THREADS,GOMP_SPINCOUNT") \
        == "None"
    assert run(GOMP_SPINCOUNT="5") == "5"  # the user's own


def test_on_macos_fast_sizes_accelerate_and_counts_performance_cores(tmp_path, monkeypatch):
    """On a Mac (faked: LNSP_FAKE_PLATFORM, and a `sysctl` first on PATH that answers as
    an M-series chip with 6 performance cores), `fast` takes the performance cores and
    gives Accelerate's pool (VECLIB_MAXIMUM_THREADS) the same count."""
    from lnsp import system
    from lnsp.guard.threads import cpu_count, policy_env

    sysctl = tmp_path / "sysctl"
    sysctl.write_text('#!/bin/sh\n[ "$2" = hw.perflevel0.physicalcpu ] && echo 6 || exit 1\n')
    sysctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    assert cpu_count() == 6
    fast = policy_env("fast", load=100.0)
    assert fast["OMP_NUM_THREADS"] == fast["VECLIB_MAXIMUM_THREADS"] == "6", fast
    assert policy_env("3", load=100.0)["VECLIB_MAXIMUM_THREADS"] == "3"
    assert policy_env("safe")["VECLIB_MAXIMUM_THREADS"] == "1"
    # The same in a real process, set at import as every lnsp command does.
    code = "import os, lnsp; print(os.environ['VECLIB_MAXIMUM_THREADS'])"
    r = subprocess.run([sys.executable, "-c", code, "--threads", "fast"], capture_output=True,
                       text=True, env=env(PATH=os.environ["PATH"], LNSP_FAKE_PLATFORM="darwin"),
                       timeout=60)
    assert r.stdout.strip() == "6", r.stderr
    # Linux keeps its pthreads BLAS pools at one thread (numpy's OpenBLAS).
    monkeypatch.setenv(system.FAKE_ENV, "linux")
    assert policy_env("3", load=100.0)["VECLIB_MAXIMUM_THREADS"] == "1"
