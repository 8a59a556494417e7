"""Nodes as containers, against the real engine: each node of a torchrun job is a
container of the lnsp image on a Docker network the launcher creates (internal: no
route out) and removes at the end. A job that is stopped and resumed ends with the
weights of an uninterrupted 2-rank loopback run; then the faults between nodes: a
node killed, a node cut off the network, a node slowed down.

Every container has a CPU limit and every wait a bound; the faults strike once the
first checkpoint exists (a state the test sees), never at a guessed step.
Without an engine these tests skip with the reason; with LNSP_REQUIRE_DOCKER=1 (CI)
they fail instead."""

import os
import subprocess

import pytest

from conftest import FAST_TRAIN, env, lnsp, read_json, wait_until
from lnsp.config import TrainConfig
from lnsp.launch.ddp import torchrun_argv
from lnsp.rundir import ExitCode

# xdist_group: one worker runs every container test, so the image is built once
pytestmark = [pytest.mark.docker, pytest.mark.timeout(600), pytest.mark.xdist_group("docker")]
IMAGE = ""  # the session's image (conftest.lnsp_image), set by the `image` fixture
DDP = [a for a in FAST_TRAIN if a not in ("--batch-size", "16")] + ["--batch-size", "32"]


@pytest.fixture(scope="module")
def image(lnsp_image):
    """The suite's one image, built as `make train-ddp-docker` gets it (image ensure)."""
    global IMAGE
    IMAGE = lnsp_image
    return lnsp_image


def docker(*args, check=True) -> str:
    r = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 or not check, r.stderr
    return r.stdout


@pytest.fixture
def nodes():
    """Removes the runs' containers and networks at the end, whatever happened."""
    runs = []
    yield runs.append
    from lnsp.launch.ddp_docker import names

    for run in runs:
        network, containers = names(str(run), 2)
        for name in containers:
            docker("rm", "-f", name, check=False)
        docker("network", "rm", network, check=False)


def launch(run, data, *extra, cwd):
    r = lnsp("launch", "ddp-docker", "--nodes", "2", "--image", IMAGE, "--cpus", "1",
             "--data", data, "--run-dir", run, *DDP, *extra, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return wait_until(lambda: (read_json(run / "run.json") or {}).get("ranks"), 120,
                      what="the ranks in run.json")


def status(run, cwd):
    import json

    r = lnsp("status", run, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def ended(run):
    return read_json(run / "exit.json")


def weights(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def other_node(run, ranks):
    """The container that does not hold rank 0 (c10d assigns ranks as nodes join)."""
    host = next(r["host"] for r in ranks if r["rank"] == 0)
    return next(c for c in read_json(run / "run.json")["containers"] if c != host)


def network_gone(name):
    return subprocess.run(["docker", "network", "inspect", name],
                          capture_output=True).returncode != 0


def test_two_nodes_stop_resume_and_match_a_loopback_run(image, small_data, tmp_path, nodes):
    run = tmp_path / "pair"
    nodes(run)
    steps = ["--epochs", "50", "--max-steps", "150", "--checkpoint-every", "10"]
    ranks = launch(run, small_data, *steps, cwd=tmp_path)
    info = read_json(run / "run.json")
    assert sorted(r["host"] for r in ranks) == info["containers"]  # one rank per container
    net = info["network"]
    attrs = docker("network", "inspect", net)
    assert '"Internal": true' in attrs
    for name in info["containers"]:
        c = docker("inspect", "-f", "{{json .Mounts}} {{.Config.User}} {{.HostConfig.NanoCpus}}",
                   name)
        assert f'"Destination":"{small_data.resolve()}"' in c and '"RW":false' in c
        assert f"{os.getuid()}:{os.getgid()}" in c and "1000000000" in c
    wait_until(lambda: (run / "checkpoints" / "last.pt").exists(), 120, what="a checkpoint")
    row = status(run, tmp_path)
    assert row["backend"] == "ddp-docker" and row["state"] in ("running", "finished")
    assert [k["rank"] for k in row["ranks"]] == [0, 1]
    if row["state"] == "running":  # a dump from each rank, then a stop both agree on
        r = lnsp("dump", run, cwd=tmp_path)
        assert r.returncode == 0 and "Thread" in r.stdout, r.stdout + r.stderr
        r = lnsp("stop", run, "--grace", "120", cwd=tmp_path, timeout=150)
        assert r.returncode == ExitCode.DONE, r.stdout + r.stderr
    stopped = wait_until(lambda: ended(run), 60, what="exit.json")
    assert stopped["state"] in ("stopped", "finished"), stopped
    if row["state"] == "running":
        assert "stopped at step" in r.stdout, r.stdout  # ended within the grace, not killed
    wait_until(lambda: network_gone(net), 60, what="the network removed")
    if stopped["state"] == "stopped":
        beats = [read_json(run / f"heartbeat-rank{k}.json")["step"] for k in (0, 1)]
        assert beats == [stopped["step"]] * 2
        r = lnsp("launch", "ddp-docker", "--nodes", "2", "--image", IMAGE, "--cpus", "1",
                 "--run-dir", run, "--resume", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        done = wait_until(lambda: (lambda e: e if e and e["state"] == "finished" else None)(
            ended(run)), 180, what="the resumed job to finish")
        assert "Resumed from" in (run / "training.log").read_text()
    else:
        done = stopped
    assert done["step"] == 150
    r = lnsp("logs", run, cwd=tmp_path)
    assert r.returncode == 0 and "Finished: 150 steps" in r.stdout
    wait_until(lambda: network_gone(net), 60, what="the network removed")
    for path in run.rglob("*"):
        assert path.stat().st_uid == os.getuid(), path

    # The same job on loopback: torchrun, 2 ranks, no interruption.
    config = TrainConfig(**read_json(run / "config.json")).replace(
        run_dir=str(tmp_path / "loop"), resume=False)
    loop = subprocess.run(torchrun_argv(config, 2), env=env(), capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert loop.returncode == 0, loop.stdout[-3000:] + loop.stderr[-3000:]
    a, b = weights(run / "checkpoints" / "last.pt"), weights(tmp_path / "loop" / "checkpoints"
                                                           / "last.pt")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |weight difference| containers vs loopback: {diff:.3g}")
    assert diff < 1e-4, diff


def test_a_killed_node_is_named_by_the_survivor_which_dumps_and_exits_3(image, small_data,
                                                                        tmp_path, nodes):
    run = tmp_path / "kill"
    nodes(run)
    ranks = launch(run, small_data, "--epochs", "500", "--checkpoint-every", "3",
                   "--pg-timeout", "60", cwd=tmp_path)
    wait_until(lambda: (run / "checkpoints" / "last.pt").exists(), 120, what="a checkpoint")
    victim = other_node(run, ranks)
    docker("kill", victim)
    done = wait_until(lambda: ended(run), 60, what="the survivor's exit.json")
    print(f"\nkilled {victim}: {done['error'][:160]}")
    assert done["exit_code"] == ExitCode.STALLED and done["state"] == "failed", done
    assert f"(node {victim}," in done["error"] and "lost rank 1" in done["error"], done
    assert list((run / "dumps").glob("rank0-*collective*.txt"))
    wait_until(lambda: network_gone(read_json(run / "run.json")["network"]), 60,
               what="the network removed")


def test_a_killed_node_that_returns_resumes_and_ends_at_the_same_step(image, small_data,
                                                                      tmp_path, nodes):
    run = tmp_path / "back"
    nodes(run)
    ranks = launch(run, small_data, "--epochs", "50", "--max-steps", "40", "--checkpoint-every",
                   "3", "--max-restarts", "1", "--pg-timeout", "60", cwd=tmp_path)
    wait_until(lambda: (run / "checkpoints" / "last.pt").exists(), 120, what="a checkpoint")
    victim = other_node(run, ranks)
    docker("kill", victim)
    # the survivor has named it; the host comes back (the engine restarts the node)
    wait_until(lambda: "lost rank" in (run / "training.log").read_text(), 60,
               what="the survivor to name the lost node")
    docker("start", victim)
    done = wait_until(lambda: (lambda e: e if e and e["state"] == "finished" else None)(
        ended(run)), 240, what="the resumed job to finish")
    assert done["step"] == 40
    log = (run / "training.log").read_text()
    print("\n" + "\n".join(x[:160] for x in log.splitlines() if "lost rank" in x or "Resumed" in x))
    assert "Resumed from" in log and f"(node {victim}," in log
    assert [read_json(run / f"heartbeat-rank{k}.json")["step"] for k in (0, 1)] == [40, 40]


def test_a_node_cut_off_the_network_times_out_naming_it_and_loses_nothing(image, small_data,
                                                                          tmp_path, nodes):
    run = tmp_path / "part"
    nodes(run)
    ranks = launch(run, small_data, "--epochs", "500", "--checkpoint-every", "3",
                   "--pg-timeout", "8", "--stall-timeout", "120", cwd=tmp_path)
    wait_until(lambda: (run / "checkpoints" / "last.pt").exists(), 120, what="a checkpoint")
    info = read_json(run / "run.json")
    victim = other_node(run, ranks)
    docker("network", "disconnect", info["network"], victim)
    done = wait_until(lambda: ended(run), 90, what="the collective timeout")
    print(f"\ncut off {victim}: {done['error'][:200]}")
    assert done["exit_code"] == ExitCode.STALLED and done["state"] == "stalled", done
    assert "a collective timed out: rank 1 stalled" in done["error"], done
    assert "heartbeat" in done["error"]
    state = weights(run / "checkpoints" / "last.pt")  # whole and loadable
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state and 0 < ckpt["step"] <= done["step"] and ckpt["step"] % 3 == 0


def test_a_slow_node_is_reported_as_a_straggler_not_a_hang(image, small_data, tmp_path, nodes):
    run = tmp_path / "slow"
    nodes(run)
    ranks = launch(run, small_data, "--epochs", "50", "--max-steps", "60", "--checkpoint-every",
                   "5", "--stall-timeout", "60", cwd=tmp_path)
    wait_until(lambda: (run / "checkpoints" / "last.pt").exists(), 120, what="a checkpoint")
    victim = other_node(run, ranks)
    docker("update", "--cpus", "0.02", victim)  # 2 ms of CPU in every 100 ms
    named = f"[STRAGGLER] rank 1 on {victim} is a straggler"
    wait_until(lambda: ended(run) or named in (run / "training.log").read_text(), 240,
               what="the slowed node named a straggler")
    docker("update", "--cpus", "1", victim, check=False)  # its speed back: the job goes on
    done = wait_until(lambda: ended(run), 120, what="the job to finish")
    log = (run / "training.log").read_text()
    print("\n" + "\n".join(x for x in log.splitlines() if "[STRAGGLER]" in x))
    assert named in log, log[-2000:]
    assert done["state"] == "finished" and done["step"] == 60, done
    assert "[WATCHDOG] no progress" not in log and "timed out" not in log  # no stall
