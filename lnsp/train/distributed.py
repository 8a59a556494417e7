"""torch.distributed for lnsp: a process group whose collectives time out instead of
waiting forever, naming the rank that stalled, and the post-mortem of a failed
collective (which rank, its stacks, and killing it when it is frozen).

Started by torchrun (WORLD_SIZE, RANK and the rendezvous come from its environment);
a plain `lnsp train` is world size 1 and touches none of this.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from lnsp.errors import CollectiveError
from lnsp.rundir import ExitCode, Heartbeat, RunDir

__all__ = ["CollectiveError", "Dist", "init", "classify", "laggards", "stalled_pid",
           "post_mortem", "shutdown", "nccl_environment", "backend_for", "device_for",
           "sync_device", "ddp_arguments", "stragglers"]

# The NCCL flight recorder: the last collectives of each rank, written on a timeout
# into the run's dumps/ (one file per rank, the rank appended to the name).
TRACE_ENTRIES = 2000
STRAGGLER_FACTOR = 5.0  # a rank this many times slower than the others' median
STRAGGLER_CHECKS = 3  # ... at this many checks in a row (a busy host gives 5x for a moment)


def nccl_environment(dumps: Path) -> dict[str, str]:
    """What the launchers set for every rank: NCCL errors end the rank instead of
    hanging it, and the flight recorder's traces land among the run's dumps."""
    # torch 2.13 reads the recorder's TORCH_FR_* names; TORCH_NCCL_TRACE_BUFFER_SIZE
    # and TORCH_NCCL_DEBUG_INFO_TEMP_FILE are their deprecated aliases (a warning per rank).
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "TORCH_FR_BUFFER_SIZE": str(TRACE_ENTRIES),
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(Path(dumps) / "nccl-trace-rank")}


def backend_for(device: str) -> str:
    """NCCL for ranks on CUDA devices, gloo for CPU ranks."""
    return "nccl" if device.startswith("cuda") else "gloo"


def device_for(requested: str, local_rank: int, cuda_devices: int) -> str:
    """A rank's device: the GPU of its LOCAL_RANK on its node when the run trains on
    CUDA (one rank per GPU), else the device asked for."""
    wants_cuda = requested == "cuda" or (requested == "auto" and cuda_devices > 0)
    if not wants_cuda:
        return "cpu" if requested == "auto" else requested
    if local_rank >= cuda_devices:
        from lnsp.errors import ConfigError

        raise ConfigError(f"local rank {local_rank} has no GPU: this node has {cuda_devices}; "
                          f"start at most {cuda_devices} ranks per node (--nproc)")
    return f"cuda:{local_rank}"


def sync_device(backend: str, device: str) -> str:
    """Where the small synchronisation tensors live: NCCL reduces GPU memory only."""
    return device if backend == "nccl" else "cpu"


def ddp_arguments(device: str) -> dict:
    """DistributedDataParallel's placement: one GPU per process, or none on CPU."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return {"device_ids": [index], "output_device": index}
    return {}


def stragglers(beats: dict[int, dict], factor: float = STRAGGLER_FACTOR) -> dict[int, str]:
    """Ranks whose own work per step (`work_ms` in their heartbeats: load, forward,
    mining, loss; not the collectives, where every rank waits for the slowest) is
    `factor` times the median of the others'. In a synchronous job every rank's wall
    step time is the same, so only the work time tells the slow node from the rest."""
    times = {r: b["work_ms"] for r, b in beats.items() if b.get("work_ms")}
    found = {}
    for rank, ms in sorted(times.items()):
        others = sorted(v for r, v in times.items() if r != rank)
        if not others:
            continue
        median = others[len(others) // 2]
        if ms > factor * median:
            host = beats[rank].get("host", "?")
            found[rank] = (f"rank {rank} on {host} is a straggler: {ms:.1f} ms of its own work "
                           f"per step, {ms / median:.1f}x the others' {median:.1f} ms")
    return found


def laggards(beats: dict[int, Heartbeat], me: int, now: float) -> str:
    """The ranks by heartbeat age, oldest first, in words: the oldest of the others is
    the one that stalled (this rank is waiting in the collective, so not it)."""
    rows = sorted(((now - b.time, r, b) for r, b in beats.items()), key=lambda row: -row[0])
    if not rows:
        return ""
    others = [row for row in rows if row[1] != me] or rows
    age, rank, beat = others[0]
    return (f"rank {rank} stalled (pid {beat.pid}, step {beat.step}, phase "
            f"'{beat.phase}', heartbeat {age:.1f}s old; the others "
            + ", ".join(f"rank {r} {a:.1f}s" for a, r, _ in rows if r != rank) + ")")


def stalled_pid(beats: dict[int, Heartbeat], me: int, host: str) -> int | None:
    """The PID of the stalled rank (oldest heartbeat of the others) if it runs on `host`."""
    others = sorted((b.time, b.pid, b.host) for r, b in beats.items() if r != me and b.pid)
    return others[0][1] if others and others[0][2] == host else None


def classify(error: Exception, rank: int, who: str = "",
             lost: dict[int, str] | None = None) -> CollectiveError:
    """Turn a backend error into one clear line naming what happened: a timeout is a
    stall (code 3); a rank that is gone (`lost`: named by the survivors) ends the
    survivors with 3 too, the job cannot go on without it; anything else, code 1."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if timed_out(error):
        return CollectiveError(f"rank {rank}: a collective timed out: {who or text}",
                               ExitCode.STALLED)
    if lost:
        failure = CollectiveError(f"rank {rank}: another rank left the job: lost "
                                  f"{', '.join(lost.values())} ({text})", ExitCode.STALLED)
        failure.lost = tuple(lost)
        return failure
    return CollectiveError(f"rank {rank}: another rank left the job ({text})"
                           + (f"; {who}" if who else ""), ExitCode.INTERNAL)


def timed_out(error: Exception) -> bool:
    return "timed out" in str(error).lower() or "timeout" in str(error).lower()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    root: Path | None = None  # the run directory, for the ranks' heartbeats
    device: str = "cpu"  # where the synchronisation tensors live (the GPU under NCCL)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sync(self, loss: float, stop: bool) -> tuple[float, bool]:
        """One small all-reduce per step: the mean loss, and whether any rank was asked
        to stop (so that all stop at the same step boundary)."""
        if not self.active:
            return loss, stop
        total, stops = self.sum([loss, 1.0 if stop else 0.0])
        return total / self.world, stops > 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def min_int(self, value: int) -> int:
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t[0])

    def ranks(self) -> list[dict]:
        """Every rank's pid and host (a collective: all ranks call it)."""
        from lnsp.procs import start_time

        me = {"rank": self.rank, "pid": os.getpid(), "start": start_time(),
              "host": socket.gethostname()}
        if not self.active:
            return [me]
        import torch.distributed as dist

        everyone = [None] * self.world
        dist.all_gather_object(everyone, me)
        return everyone

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def beats(self) -> dict[int, Heartbeat]:
        return RunDir(self.root).rank_heartbeats() if self.active and self.root else {}

    def laggards(self) -> str:
        return laggards(self.beats(), self.rank, time.time()) if self.active else ""

    def stalled_pids(self) -> list[int]:
        pid = stalled_pid(self.beats(), self.rank, socket.gethostname())
        return [pid] if pid else []

    def work_times(self) -> dict[int, dict]:
        """Each rank's own work per step and host, from the heartbeats."""
        return {r: {"work_ms": b.extra.get("work_ms"), "host": b.host}
                for r, b in self.beats().items()}

    def lost(self, wait: float = 3.0) -> dict[int, str]:
        """The ranks that left the job, in words: each survivor writes
        `alive-after-error-rankN.json` into the shared run directory, then waits a
        moment for the others'; a rank without one is gone (its process or its node).
        The run directory is shared by every node, so no collective is needed."""
        if not self.active or self.root is None:
            return {}
        from lnsp.rundir import read_json, write_json

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        write_json(RunDir(self.root).survivor_mark(self.rank),
                   {"rank": self.rank, "attempt": attempt, "time": time.time()}, durable=False)
        start = time.time()

        def survivors():
            seen = set()
            for p in RunDir(self.root).survivor_marks():
                m = read_json(p) or {}
                if m.get("time", 0) >= start - 60 and m.get("attempt") == attempt:
                    seen.add(int(m["rank"]))
            return seen

        while len(survivors()) < self.world and time.time() - start < wait:
            time.sleep(0.1)
        beats, gone = self.beats(), {}
        # before its first heartbeat a rank is known from run.json (rank 0 wrote it)
        known = {r["rank"]: r for r in RunDir(self.root).read_run().get("ranks", [])}
        for rank in sorted(set(range(self.world)) - survivors()):
            b = beats.get(rank)
            host, pid = (b.host, b.pid) if b else (known.get(rank, {}).get("host", "?"),
                                                  known.get(rank, {}).get("pid", "?"))
            seen = (f", step {b.step}, last heartbeat {time.time() - b.time:.1f}s ago"
                    if b else "")
            gone[rank] = f"rank {rank} (node {host}, pid {pid}{seen})"
        return gone


def post_mortem(error: Exception, d: Dist, dumper, log) -> CollectiveError:
    """After a failed collective: name what happened, dump this rank, take py-spy stacks
    of the stalled rank (it cannot dump itself) and, when it is frozen, kill it so that
    torchrun can restart the job. Returns the error to raise."""
    from lnsp.guard.dumps import native_stacks

    lost = {} if timed_out(error) else d.lost()
    failure = classify(error, d.rank, d.laggards(), lost)
    log(f"[DISTRIBUTED] {failure}")
    dumper.dump("collective")
    for pid in [] if lost else d.stalled_pids():  # a lost rank is gone: nothing to kill
        stacks = native_stacks(pid, timeout=10)
        if stacks:
            dumper.write(f"stalled-pid{pid}", f"py-spy of stalled rank pid {pid}:\n{stacks}")
        if failure.exit_code == ExitCode.STALLED:  # frozen: nothing else ends it
            _kill_rank(pid, d.root, log)
    return failure


def _kill_rank(pid: int, root: Path | None, log) -> None:
    """SIGKILL to a stalled rank, only while its PID is still the rank that rank 0
    recorded in run.json (with its start time)."""
    from lnsp.errors import LaunchError
    from lnsp.procs import send_signal

    ranks = RunDir(root).read_run().get("ranks", []) if root else []
    here = socket.gethostname()
    started = next((r.get("start") for r in ranks
                    if r.get("pid") == pid and r.get("host") == here), None)
    log(f"[DISTRIBUTED] killing stalled rank pid {pid} (SIGKILL)")
    try:
        send_signal(pid, started, signal.SIGKILL, "stalled rank")
    except LaunchError as e:
        log(f"[DISTRIBUTED] not killing: {e}")


def init(pg_timeout: float, root: Path, requested: str = "cpu") -> Dist:
    """Join the process group when torchrun started this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(root=root)
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(requested, local_rank,
                        torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # before any CUDA work: NCCL binds to it
    backend = backend_for(device)
    rank, timeout = int(os.environ["RANK"]), timedelta(seconds=pg_timeout)
    # The group's keys live under a prefix of their own per torchrun attempt: after a
    # restart the store still holds the last attempt's addresses, and the new ranks
    # would try to connect to processes that are gone (seen here with gloo).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    # Without the agent's store (multi-node jobs) each attempt has a fresh store, and
    # a node that came back counts its attempts from 0 again: no prefix then.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"lnsp/attempt-{attempt}" if agent_store else "lnsp"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store),
                            rank=rank, world_size=world, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), root, sync_device(backend, device))


def shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # tearing down a broken group must not hide the real error
        pass
