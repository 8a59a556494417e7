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
