"""A signal sent into a Linux container goes by name: the host's number may be another
signal there (macOS's SIGUSR1 is 30, Linux's SIGPWR, which ends the process). The
engine is replaced by a recorder (tests/test_docker.py runs the real one); the command
run inside a node is run here for real."""

from __future__ import annotations

import select
import signal
import subprocess
import sys

import pytest

from conftest import wait_until

from lnsp import system
from lnsp.launch import ddp_docker, docker
from lnsp.rundir import RunRecord


class Container:
    """What the docker backends ask of a docker-py container, recorded."""

    def __init__(self, name="node-0", status="running"):
        self.name, self.status, self.calls = name, status, []

    def kill(self, signal=None):
        self.calls.append(("kill", signal))

    def exec_run(self, argv, user=None):
        self.calls.append(("exec", argv))


@pytest.fixture
def on_a_mac(monkeypatch):
    """This process's numbers as a Mac's: SIGUSR1 is 30."""
    monkeypatch.setenv(system.FAKE_ENV, "darwin")
    assert system.signal_number("SIGUSR1") == 30


def test_docker_dump_sends_the_name_from_a_mac(monkeypatch, on_a_mac):
    box = Container()
    monkeypatch.setattr(docker, "_container", lambda run: box)
    docker.send(RunRecord(container_id="abc"), 30)  # signal.SIGUSR1 on macOS
    docker.send(RunRecord(container_id="abc"), 15)
    assert box.calls == [("kill", "SIGUSR1"), ("kill", "SIGTERM")]


def test_docker_dump_sends_the_name_from_linux(monkeypatch):
    monkeypatch.delenv(system.FAKE_ENV, raising=False)
    box = Container()
    monkeypatch.setattr(docker, "_container", lambda run: box)
    docker.send(RunRecord(container_id="abc"), signal.SIGUSR1)
    assert box.calls == [("kill", "SIGUSR1")]


def test_ddp_docker_dump_names_the_signal_inside_each_node(monkeypatch, on_a_mac):
    nodes = [Container("job-0"), Container("job-1")]
    monkeypatch.setattr(ddp_docker, "_containers", lambda run: nodes)
    run = RunRecord(ranks=[{"host": "job-0", "pid": 7, "start": 1.5},
                           {"host": "job-1", "pid": 8, "start": 2.5},
                           {"host": "job-1", "pid": 9, "start": 3.5}])
    ddp_docker.send(run, 30)
    (kind, argv), = nodes[1].calls
    assert kind == "exec" and argv[0] == ddp_docker.PYTHON
    assert argv[3:] == ["SIGUSR1", "8", "2.5", "9", "3.5"] and "30" not in argv
    ddp_docker.send(run, 9)  # SIGKILL ends the containers themselves
    assert nodes[0].calls[-1] == ("kill", None)


def test_the_command_run_inside_a_node_delivers_the_named_signal(reap):
    """The node's command, run here with this interpreter: the process gets SIGUSR1 by
    this system's own number."""
    target = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time\n"
         "signal.signal(signal.SIGUSR1, lambda *a: (print('got USR1', flush=True), sys.exit(0)))\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    reap(target.pid)
    assert select.select([target.stdout], [], [], 30)[0] and target.stdout.readline() == "ready\n"
    from lnsp.procs import start_time

    argv = ddp_docker.signal_argv("SIGUSR1", [target.pid, start_time(target.pid)])
    subprocess.run([sys.executable, *argv[1:]], check=True, timeout=30)
    wait_until(lambda: target.poll() is not None, 10, what="the handler")
    assert target.stdout.read() == "got USR1\n" and target.returncode == 0
