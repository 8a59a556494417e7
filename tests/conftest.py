"""Shared fixtures: small real data sets, real `lnsp` processes, bounded waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "driver.py"
# Small and fast: a 64-d bank of 2,400 rows; a step takes a few milliseconds.
SMALL = {"chains": 150, "length": 16, "dim": 64}
FAST_TRAIN = ["--hidden", "32", "--batch-size", "16", "--k", "20", "--log-every", "5",
              "--eval-windows", "200", "--threads", "safe"]
# What differs on a Mac (lnsp/system.py); each use says why. py-spy needs sudo there
# in every mode and there is no /proc: a diagnosis, a native dump and an outside dump of
# a frozen process read no stacks, so their verdict is `unknown` (docs/background.md, "macOS").
MACOS = sys.platform == "darwin"
NO_STACKS_ON_MACOS = "py-spy needs sudo on macOS and there is no /proc: no stacks to judge"
# `make test-quick` (LNSP_TEST_QUICK=1): the edit loop's tests, those that start no
# process beyond pytest's own. A test that tries is skipped at that moment, its reason
# saying so; `make test` runs them all.
QUICK = os.environ.get("LNSP_TEST_QUICK") == "1"
QUICK_SKIP = "starts a real process: `make test` runs it (make test-quick runs none)"


@pytest.fixture(scope="session", autouse=True)
def _quick_mode_starts_no_process():
    """In quick mode every way of starting a process skips the test that tried."""
    if not QUICK:
        yield
        return

    def refuse(*args, **kwargs):
        pytest.skip(QUICK_SKIP)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "_execute_child", refuse)
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
            if hasattr(os, name):
                mp.setattr(os, name, refuse)
        yield


def wait_until(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_json(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def env(**extra) -> dict:
    """The environment of a child `lnsp`: this process's, less the thread variables
    that importing lnsp here set (a user's shell has none of them)."""
    from lnsp.system import gloo_loopback
    from lnsp.guard.threads import user_environment

    # gloo_loopback: macOS's ranks on loopback (torchrun started by a test directly).
    e = {**user_environment(), **gloo_loopback(), "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": str(ROOT), **extra}
    return {k: str(v) for k, v in e.items()}


def lnsp(*args, cwd=None, timeout=120, extra_env=None) -> subprocess.CompletedProcess:
    """Run `python -m lnsp ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "lnsp", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=env(**(extra_env or {})), stdin=subprocess.DEVNULL)


def spawn(*args, fault: str | None = None, at_step: int = 3, marker=None, cwd=None,
          extra_env=None, **kw) -> subprocess.Popen:
    """Start `lnsp ARGS` in the background, through the fault driver when asked; the
    driver creates `marker` just before the fault blocks."""
    extra = dict(extra_env or {})
    if fault:
        extra.update(LNSP_TEST_FAULT=fault, LNSP_TEST_FAULT_STEP=at_step)
        if marker:
            extra.update(LNSP_TEST_MARKER=marker)
        cmd = [sys.executable, str(DRIVER), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "lnsp", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env(**extra), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def release(gate) -> None:
    """Open the driver's FIFO gate: its blocked read returns. Only called once the
    marker shows that the reader is there (an open for writing waits for a reader)."""
    with open(gate, "wb") as g:
        g.write(b"x")


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Wait for a spawned process; kill it (and fail) past the timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process did not end within {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    from lnsp.data import synth

    return synth.write(tmp_path_factory.mktemp("data") / "small", **SMALL)


@pytest.fixture
def reap():
    """Processes registered here are killed at the end of the test, whatever happens."""
    procs: list[int] = []
    yield procs.append
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _engine_problem() -> str | None:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return None
    except Exception as e:
        return f"no Docker engine reachable ({type(e).__name__})"


# The engine may be shared: this session's image carries a tag of its own.
TEST_IMAGE = f"lnsp:test-t{os.getpid()}"


@pytest.fixture(scope="session")
def lnsp_image():
    """An image built from this checkout exactly as `make train-docker` gets lnsp:latest
    (`lnsp image ensure`: online, or offline with the base image and the wheelhouse made
    on the spot), under this session's own tag, once for the whole suite. Without an
    engine: skip, or fail under LNSP_REQUIRE_DOCKER=1."""
    problem = _engine_problem()
    if problem:
        if os.environ.get("LNSP_REQUIRE_DOCKER") == "1":
            pytest.fail(problem + " and LNSP_REQUIRE_DOCKER=1")
        pytest.skip(problem)
    from lnsp.launch.image import SOURCE_LABEL, source_hash

    r = lnsp("image", "ensure", "--tag", TEST_IMAGE, timeout=850)  # within the 900 s
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import docker

    labels = docker.from_env(timeout=30).images.get(TEST_IMAGE).labels or {}
    assert labels.get(SOURCE_LABEL) == source_hash(), (labels, r.stdout[-2000:])
    yield TEST_IMAGE
    # --no-prune: the untagged parent layers stay, the cache of the next build
    subprocess.run(["docker", "rmi", "--no-prune", TEST_IMAGE], capture_output=True)
