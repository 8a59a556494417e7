"""ddp-docker backend: a multi-node torchrun job rehearsed on one machine, one
container of the lnsp image per node on a Docker network of the run's own.

Each container is one torchrun node (`--nnodes N`, c10d rendezvous at the first
container's name on that network, never loopback); the data is mounted read-only
and the run directory read-write at their own absolute paths in every container,
so the run directory is shared by the nodes as NFS would share it between hosts.
The network is `internal` (no route out of it): the nodes talk to each other only.
A small process on this machine (the reaper) saves each node's console output into
the run directory and removes the network when every node has ended; the ended
containers stay until the run is resumed or relaunched, for their exit codes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lnsp import procs
from lnsp.launch import LaunchError
from lnsp.launch.command import detach
from lnsp.launch.ddp import run_id, torchrun_argv
from lnsp.launch.docker import (client, container_environment, create, make_room,
                                require_image, run_labels, run_tag)
from lnsp.rundir import RunDir, RunRecord, update_json

RDZV_PORT = 29400
PYTHON = "/opt/lnsp/bin/python"  # the image's virtual environment
RUNNING = ("created", "running", "restarting")


def names(run_dir: str, nodes: int) -> tuple[str, list[str]]:
    """The run's network and its node containers (also their host names)."""
    base = f"lnsp-{run_tag(run_dir)}"
    return f"{base}-net", [f"{base}-node{i}" for i in range(nodes)]


def plan(config, options: dict) -> dict:
    nodes = int(options.get("nodes", 2))
    per_node = int(options.get("nproc", 1))
    if nodes < 1 or per_node < 1:
        raise LaunchError(f"--nodes {nodes} --nproc-per-node {per_node}: both must be >= 1")
    c = client()
    image = require_image(c, options)
    network, containers = names(config.run_dir, nodes)
    make_room(c, *containers)  # an ended job of this run (stopped, lost)
    for old in c.networks.list(names=[network]):
        old.remove()
    return {"nodes": nodes, "nproc_per_node": per_node, "image": image, "network": network,
            "containers": containers, "rendezvous": f"{containers[0]}:{RDZV_PORT}",
            "cpus": options.get("cpus"), "memory": options.get("memory"),
            "max_restarts": config.max_restarts}


def node_environment(config, info: dict) -> dict[str, str]:
    from lnsp.train.distributed import nccl_environment

    run = str(RunDir(config.run_dir).root.resolve())
    return container_environment(
        config, "ddp-docker", info["nproc_per_node"], **nccl_environment(RunDir(run).dumps),
        # A store per rendezvous round, not the agent's: a node that comes back
        # starts counting its attempts at 0, so attempts cannot name the keys.
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", LNSP_AUTO_RESUME="1")


def start(config, info: dict) -> None:
    rd = RunDir(config.run_dir)
    data, run = str(Path(config.data).resolve()), str(rd.root.resolve())
    inside = config.replace(data=data, run_dir=run)
    rd.dumps.mkdir(parents=True, exist_ok=True)  # the NCCL traces' folder must exist
    c = client()
    network = c.networks.create(info["network"], driver="bridge", internal=True,
                                labels=run_labels(run))
    env, ids = node_environment(config, info), []
    try:
        for i, name in enumerate(info["containers"]):
            argv = torchrun_argv(inside, info["nproc_per_node"], info["nodes"], i,
                                 rendezvous=info["rendezvous"], python=PYTHON)
            container = create(
                c, info, name, run, labels={"lnsp.node": str(i)}, entrypoint=argv[:1],
                command=argv[1:], hostname=name, network=network.name,
                volumes={data: {"bind": data, "mode": "ro"}, run: {"bind": run, "mode": "rw"}},
                working_dir=run, environment=env)
            ids.append(container.id)
        update_json(rd.run, container_ids=ids)
        for cid in ids:
            c.containers.get(cid).start()
    except Exception as e:
        for cid in ids:
            try:
                c.containers.get(cid).remove(force=True)
            except Exception:
                pass
        network.remove()
        raise LaunchError(f"could not start the nodes: {type(e).__name__}: {e}", 1) from None
    # The reaper outlives this command, as the job does.
    detach([sys.executable, "-m", "lnsp.launch.ddp_docker", run], {}, rd.reaper_log)


def notes(config, info: dict) -> list[str]:
    return [f"  nodes: {', '.join(info['containers'])} (image {info['image']}, "
            f"{info['nproc_per_node']} rank(s) each) on network {info['network']}; "
            f"rendezvous {info['rendezvous']}"]


def _containers(run: RunRecord) -> list:
    c = client()
    found = []
    for name in run.containers:
        try:
            found.append(c.containers.get(name))
        except Exception:
            found.append(None)
    return found


def alive(run: RunRecord) -> bool:
    return any(x is not None and x.status in RUNNING for x in _containers(run))


trainer_alive = alive


def send(run: RunRecord, signum: int) -> None:
    """SIGKILL ends the containers; other signals go to every rank (a dump from each,
    or a stop all ranks agree on) through the engine, never to torchrun itself, whose
    default action for SIGUSR1 would end the node. By name, as in the docker backend:
    this host's number may be another signal inside the Linux container."""
    from lnsp.system import signal_name

    name = signal_name(signum)
    live = [x for x in _containers(run) if x is not None and x.status == "running"]
    if not live:
        raise LaunchError(f"no node of {run.network or 'the job'} is running")
    if name == "SIGKILL":
        for x in live:
            x.kill()
        return
    pids: dict[str, list[str]] = {}
    for r in run.ranks:  # each rank's PID with its start time, inside its node
        pids.setdefault(r["host"], []).extend([str(r["pid"]), str(r.get("start"))])
    for x in live:
        mine = pids.get(x.name, [])
        if mine:  # lnsp.procs.send_signal inside the node: its PIDs are the node's own
            x.exec_run(signal_argv(name, mine), user=f"{os.getuid()}:{os.getgid()}")


def signal_argv(name: str, pairs: list) -> list[str]:
    """The command that sends signal `name` inside a node to each (pid, start) of
    `pairs` (flat: pid, start, pid, start ...): the number is the container's own
    (signal.Signals[name] there), never this host's, and each process is checked to be
    the recorded one before its signal."""
    return [PYTHON, "-c", SEND, name, *map(str, pairs)]


# Each (pid, start) pair checked before its signal; a refused one is skipped, not fatal.
SEND = """import signal, sys
from lnsp.errors import LaunchError
from lnsp.procs import send_signal
signum = signal.Signals[sys.argv[1]]
for pid, start in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        send_signal(int(pid), None if start == "None" else float(start), signum, "rank")
    except LaunchError as e:
        print(e)
"""


def kill(run: RunRecord) -> None:
    """SIGKILL ends the node containers themselves (torchrun's agents with them)."""
    import signal

    send(run, signal.SIGKILL)


def kill_supervisor(run: RunRecord) -> None:
    """Nothing left to do: each node's agent lived in a container kill() ended."""


def wait_gone(run: RunRecord, timeout: float) -> bool:
    return procs.wait_for(lambda: not alive(run), timeout, interval=0.2)


def extra_status(run: RunRecord) -> dict:
    nodes = []
    for name, x in zip(run.containers, _containers(run)):
        state = (x.attrs.get("State", {}) if x is not None else {})
        nodes.append({"container": name, "state": state.get("Status"),
                      "exit_code": None if state.get("Running") or x is None
                      else state.get("ExitCode")})
    return {"network": run.network, "nodes": nodes}


def reap(run_dir: str, poll: float = 1.0) -> None:
    """Wait until no node runs, then keep each node's console output and remove the
    network. A node restarted while others wait (--max-restarts) counts as running."""
    rd = RunDir(run_dir)
    run = rd.read_run_record() or RunRecord()
    while True:
        try:
            if not alive(rd.read_run_record() or run):
                break
        except LaunchError:
            pass  # the engine is briefly unreachable: ask again
        time.sleep(poll)
    import docker.errors

    c = client()
    for x in _containers(run):
        try:  # a node removed meanwhile (relaunched, or cleaned up) has no output left
            rd.node_console(x.name.rsplit('-', 1)[-1]).write_bytes(
                x.logs(stdout=True, stderr=True))
        except (AttributeError, docker.errors.NotFound):
            pass
    for network in c.networks.list(names=[run.network]):
        try:
            network.reload()
            for x in network.containers:
                network.disconnect(x, force=True)
            network.remove()
        except docker.errors.NotFound:
            pass
    print(f"{time.strftime('%H:%M:%S')} nodes ended; network {run.network} removed",
          flush=True)


if __name__ == "__main__":
    reap(sys.argv[1])
