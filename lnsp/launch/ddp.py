"""ddp backend: a detached torchrun job (data parallel, gloo on CPU), restarted by
torchrun's elastic agent (--max-restarts); every rank resumes from last.pt."""

from __future__ import annotations

import socket
import sys

from lnsp import procs
from lnsp.launch.command import detach, environment
from lnsp.rundir import RunDir, RunRecord


def torchrun_argv(config, nproc: int, nnodes: int = 1, node_rank: int = 0,
                  master: str | None = None, rendezvous: str | None = None,
                  python: str = sys.executable) -> list[str]:
    """`python -m torch.distributed.run ... -m lnsp train ...` for one node: standalone,
    a static rendezvous at `master` (host:port), or a c10d rendezvous at `rendezvous`
    (host:port) named after the run, where a node that comes back can rejoin."""
    if nnodes == 1:
        where = ["--standalone"]
    elif rendezvous:
        where = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rendezvous}", f"--rdzv-id={run_id(config.run_dir)}"]
    else:
        host, _, port = (master or "127.0.0.1:29500").partition(":")
        where = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={host}",
                 f"--master-port={port or 29500}"]
    return [python, "-m", "torch.distributed.run", *where,
            f"--nproc-per-node={nproc}", f"--max-restarts={config.max_restarts}",
            "--monitor-interval=1", "-m", "lnsp", "train", *config.to_argv()]


def run_id(run_dir: str) -> str:
    from pathlib import Path

    return "".join(c if c.isalnum() or c in "_-" else "-" for c in Path(run_dir).name)


def plan(config, options: dict) -> dict:
    return {"nproc": int(options.get("nproc") or 2)}


def start(config, info: dict) -> None:
    from lnsp.train.distributed import nccl_environment

    dumps = RunDir(config.run_dir).dumps
    dumps.mkdir(parents=True, exist_ok=True)  # NCCL's traces land here on a timeout
    from lnsp.system import gloo_loopback

    # One machine (--standalone): every rank talks over the loopback.
    env = {**environment(config, "ddp", info["nproc"]), **nccl_environment(dumps),
           **gloo_loopback()}
    if info.get("command"):  # a user's script: `lnsp run --nproc N`, each rank guarded
        from lnsp.launch.command import trainer_argv

        argv = trainer_argv(config, info["command"], info["nproc"])
    else:
        argv = torchrun_argv(config, info["nproc"])
    detach(argv, env, RunDir(config.run_dir).console)


def notes(config, info: dict) -> list[str]:
    return [f"  torchrun: {info['nproc']} ranks, gloo; console output "
            f"{RunDir(config.run_dir).console}"]


def ranks_here(run: RunRecord) -> list[dict]:
    """The job's live ranks on this host, each still the process rank 0 recorded in
    run.json (its PID and start time)."""
    here = socket.gethostname()
    return [r for r in run.ranks
            if r.get("host") == here and procs.running(r["pid"], r.get("start"))]


def rank_pids(run: RunRecord) -> list[int]:
    """Live PIDs of the job's ranks on this host (rank 0 records them in run.json)."""
    return [r["pid"] for r in ranks_here(run)]


def agent_alive(run: RunRecord) -> bool:
    """torchrun's agent (rank 0's parent, recorded with its start time)."""
    return procs.running(run.supervisor_pid, run.supervisor_start)


def alive(run: RunRecord) -> bool:
    return agent_alive(run) or bool(rank_pids(run))


def trainer_alive(run: RunRecord) -> bool:
    return bool(rank_pids(run))


def send(run: RunRecord, signum: int) -> None:
    """To every rank: a dump from each, or a stop that all ranks agree on."""
    for r in ranks_here(run):
        procs.send_signal(r["pid"], r.get("start"), signum, f"rank {r['rank']}")


def kill(run: RunRecord) -> None:
    """The agent first, so that it cannot restart what is killed next, then the ranks."""
    import signal

    if agent_alive(run):
        procs.send_signal(run.supervisor_pid, run.supervisor_start,
                          signal.SIGKILL, "torchrun agent")
    send(run, signal.SIGKILL)


def kill_supervisor(run: RunRecord) -> None:
    """Nothing left to do: kill() ended the agent first."""


def wait_gone(run: RunRecord, timeout: float) -> bool:
    return procs.wait_for(lambda: not alive(run), timeout, interval=0.2)


def extra_status(run: RunRecord) -> dict:
    return {}  # the ranks are in every row of a job already
