"""The container path against the real engine: image, a run to the end, dumps, stop,
resume, status, compare. The `docker` CLI is used here as a second, real client. The
image comes from `lnsp image ensure`, the call `make train-docker` makes (under a tag of
this session's own).

Without an engine these tests skip with the reason; with LNSP_REQUIRE_DOCKER=1 (CI)
they fail instead."""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import FAST_TRAIN, TEST_IMAGE, _engine_problem, lnsp, read_json, wait_until
from lnsp.rundir import ExitCode

# xdist_group: one worker runs every container test, so the image is built once
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900),  # the first builds the image
              pytest.mark.xdist_group("docker")]
# The engine may be shared: this session's image and containers carry names of their own.
TAG = f"t{os.getpid()}"
IMAGE = TEST_IMAGE  # lnsp:test-<TAG>, built by conftest's lnsp_image through `lnsp image ensure`


@pytest.fixture(scope="module")
def image(lnsp_image):
    return lnsp_image


def docker_cli(*args) -> str:
    if not shutil.which("docker"):
        pytest.skip("docker CLI not installed")
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def status(run, cwd):
    r = lnsp("status", run, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


@pytest.fixture
def cleanup():
    names = []
    yield names.append
    for name in names:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_image_bakes_the_thread_environment(image):
    config = json.loads(docker_cli("image", "inspect", image))[0]["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        assert env[name] == "1", name
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONFAULTHANDLER"] == "1"
    assert config["Entrypoint"] == ["lnsp"] and config["User"] == "lnsp"
    out = docker_cli("run", "--rm", "--entrypoint", "py-spy", image, "--version")
    assert out.startswith("py-spy")
    out = docker_cli("run", "--rm", image, "doctor", "--json")
    pools = json.loads(out)["pools"]
    assert pools and all(p["threads"] == 1 for p in pools), pools


def test_container_run_dump_stop_resume_finish(image, small_data, tmp_path, cleanup):
    from lnsp.launch.docker import container_name

    run = tmp_path / f"crun-{TAG}"
    cleanup(container_name(str(run)))
    r = lnsp("launch", "docker", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
             "--epochs", "200", "--image", image, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    info = read_json(run / "run.json")
    attrs = json.loads(docker_cli("inspect", info["container_id"]))[0]
    assert attrs["Name"] == "/" + container_name(str(run))
    assert attrs["Name"].startswith(f"/lnsp-crun-{TAG}-")  # the run's name, then its path's hash
    assert attrs["Config"]["Labels"]["lnsp.run"] == f"crun-{TAG}"
    host = attrs["HostConfig"]
    assert host["Init"] is True and "SYS_PTRACE" in host["CapAdd"]
    assert host["ShmSize"] >= 2**30 and attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
    mounts = {m["Destination"]: m["RW"] for m in attrs["Mounts"]}
    assert mounts == {str(small_data.resolve()): False, str(run.resolve()): True}

    wait_until(lambda: (read_json(run / "heartbeat.json") or {}).get("step", 0) >= 5, 120,
               what="the container's first steps")
    assert status(run, tmp_path)["state"] == "running"
    for n in (1, 2, 3):
        r = lnsp("dump", run, cwd=tmp_path)
        assert r.returncode == 0 and "Thread" in r.stdout, r.stderr
        assert len(list((run / "dumps").glob("*.txt"))) == n
    assert status(run, tmp_path)["state"] == "running"

    r = lnsp("stop", run, "--grace", "60", cwd=tmp_path)
    assert r.returncode == ExitCode.DONE and "stopped at step" in r.stdout, r.stdout + r.stderr
    stopped = status(run, tmp_path)
    assert stopped["state"] == "stopped" and stopped["container_exit_code"] == ExitCode.DONE
    assert (run / "checkpoints" / "last.pt").stat().st_uid == os.getuid()

    r = lnsp("launch", "docker", "--run-dir", run, "--resume", "--epochs", "3", "--image", image,
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: status(run, tmp_path)["state"] == "finished", 180,
               what="the resumed container run to finish")
    log = (run / "training.log").read_text()
    assert "Resumed from" in log and "Finished" in log
    for path in run.rglob("*"):
        assert path.stat().st_uid == os.getuid(), path


def test_a_killed_container_is_reported_failed_with_its_exit_code(image, small_data, tmp_path,
                                                                   cleanup):
    from lnsp.launch.docker import container_name

    run = tmp_path / f"killed-{TAG}"
    cleanup(container_name(str(run)))
    r = lnsp("launch", "docker", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
             "--epochs", "200", "--image", image, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: read_json(run / "heartbeat.json"), 120, what="a heartbeat")
    docker_cli("kill", container_name(str(run)))
    row = wait_until(lambda: (lambda s: s if s["state"] == "failed" else None)(
        status(run, tmp_path)), 30, what="status failed")
    assert row["container_state"] == "exited" and row["container_exit_code"] == 137


def test_compare_prints_native_and_container_columns(image, tmp_path):
    r = lnsp("compare", "--threads", "safe", "--image", image, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    head, *rows = r.stdout.splitlines()
    assert "native" in head and "container" in head
    values = {row[2:15].strip(): row[15:].split() for row in rows if row[2:15].strip()}
    assert values["threads"] == ["safe", "safe"] and values["omp_threads"] == ["1", "1"]
    assert len(values["forward_ms"]) == 2


def _docker_run(root, container_id):
    from lnsp.rundir import RunDir

    rd = RunDir(root)
    rd.update_run(backend="docker", container_id=container_id, launch_time=time.time() - 3600)
    return rd


def test_an_engine_that_does_not_answer_leaves_the_state_unknown_not_failed(tmp_path):
    # A real socket that takes connections and never answers: a hung engine.
    path = tmp_path / "engine.sock"
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(path))
    engine.listen(16)
    try:
        _docker_run(tmp_path / "run", "f" * 64)
        r = lnsp("status", tmp_path / "run", "--json", cwd=tmp_path,
                 extra_env={"DOCKER_HOST": f"unix://{path}", "LNSP_DOCKER_TIMEOUT": "1"})
    finally:
        engine.close()
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["state"] == "unknown" and "not reachable" in row["error"], row


def test_a_container_the_engine_does_not_know_is_gone(tmp_path):
    problem = _engine_problem()
    if problem:
        if os.environ.get("LNSP_REQUIRE_DOCKER") == "1":
            pytest.fail(problem + " and LNSP_REQUIRE_DOCKER=1")
        pytest.skip(problem)
    _docker_run(tmp_path / "run", "0" * 64)  # no such container
    row = status(tmp_path / "run", tmp_path)
    assert row["state"] == "failed" and row["container"] is None, row


def test_ensure_keeps_an_image_built_from_this_checkout(image):
    r = lnsp("image", "ensure", "--tag", image, timeout=60)
    assert r.returncode == 0 and f"image {image} is up to date" in r.stdout, r.stdout + r.stderr
    assert "building" not in r.stdout


def test_a_users_own_script_runs_to_finished_in_the_container(image, tmp_path, cleanup):
    """`lnsp launch docker -- python train.py`: the script's folder read-only, the run
    directory read-write, the image's python (torch) for the host's interpreter path."""
    import sys
    from pathlib import Path

    script = tmp_path / "plain_train.py"
    shutil.copy(Path(__file__).parent / "scripts" / "plain_train.py", script)
    run = tmp_path / "runs" / f"guard-{TAG}"
    r = lnsp("launch", "docker", "--image", image, "--run-dir", run, "--", sys.executable,
             script, "--steps", 300, "--workers", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cleanup(read_json(run / "run.json")["container_name"])
    wait_until(lambda: (read_json(run / "exit.json") or {}).get("state"), 300,
               what="the script's container run to end")
    ended = read_json(run / "exit.json")
    assert ended["state"] == "finished", (run / "training.log").read_text()[-3000:]
    assert read_json(run / "heartbeat.json")["step"] == 300
    info = read_json(run / "run.json")
    assert info["backend"] == "docker" and info["guard"] is True
    assert info["command"][0] == "python"  # the image's interpreter, not the host's path


def test_containers_of_runs_with_one_name_in_two_folders_do_not_collide(image, tmp_path,
                                                                        cleanup):
    """runs/a/exp.1 and runs/b/exp.1 get containers of their own, and the engine's name
    filter (a regular expression: `.` matches `-`) never picks a neighbour's."""
    import docker as docker_py

    from lnsp.launch.docker import container_name, existing

    a, b = container_name(str(tmp_path / "a" / "exp.1")), container_name(str(tmp_path / "b" /
                                                                               "exp.1"))
    assert a != b and a.startswith("lnsp-exp-1-")
    engine = docker_py.from_env(timeout=30)
    created = engine.containers.create(image, command=["--help"], name=f"{a}x")
    cleanup(created.name)
    assert existing(engine, a) is None  # `{a}x` holds `a` as a substring: not it
    mine = engine.containers.create(image, command=["--help"], name=a)
    cleanup(mine.name)
    assert existing(engine, a).id == mine.id


def test_a_container_that_cannot_start_leaves_no_run_behind(image, small_data, tmp_path):
    """The engine refuses the container (a memory limit under its minimum): one line,
    and the run directory is not stranded, so the same launch can be made again."""
    run = tmp_path / f"refused-{TAG}"
    r = lnsp("launch", "docker", "--image", image, "--memory", "1k", "--data", small_data,
             "--run-dir", run, *FAST_TRAIN, cwd=tmp_path)
    assert r.returncode == ExitCode.INTERNAL and "could not be started" in r.stderr, \
        r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not run.exists()
