"""Make targets as a person runs them."""

import os
import signal
import socket
import subprocess

import psutil
import pytest

from conftest import ROOT, env, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_tensorboard_serves_this_machine_only(tmp_path):
    """The event files hold the config and the run's figures: `make tensorboard` listens
    on the loopback, not on every interface (it passed --bind_all before)."""
    if not (ROOT / ".venv" / "bin" / "tensorboard").exists():
        pytest.skip("no .venv with tensorboard (make setup)")
    port = _free_port()
    proc = subprocess.Popen(["make", "-s", "tensorboard", f"PORT={port}"], cwd=ROOT, env=env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def listening():
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                for c in child.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                        return c.laddr.ip
        except psutil.Error:
            return None
        return None

    try:
        address = wait_until(listening, 60, interval=0.2, what="TensorBoard to listen")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert address == "127.0.0.1"


def test_make_test_quick_skips_every_test_that_starts_a_process_and_runs_the_rest():
    """`make test-quick` is the edit loop: a test that starts a real process is skipped at
    that moment (its reason says so), one that does not runs; its failures still fail."""
    quick = {"LNSP_TEST_QUICK": "1"}
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-v", "-rs",
                        "-p", "no:cacheprovider", "tests/test_config.py",
                        "tests/test_launch.py::test_tmux_run_is_listed_and_finishes"],
                       cwd=ROOT, env=env(**quick), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "test_tmux_run_is_listed_and_finishes SKIPPED" in r.stdout, r.stdout[-3000:]
    assert "starts a real process" in r.stdout, r.stdout[-3000:]
    assert "test_config.py::test_env_example_lists_every_field_with_its_default PASSED" in r.stdout
