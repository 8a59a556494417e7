"""torch.distributed for lnsp: a process group whose collectives time out instead of
waiting forever, rank-aware file names, and naming the rank that stalled.

Started by torchrun (WORLD_SIZE, RANK and the rendezvous come from its environment);
a plain `lnsp train` is world size 1 and touches none of this.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from lnsp.rundir import read_json


class CollectiveError(RuntimeError):
    """A collective failed: a rank stalled (timeout) or left the job."""

    lost: tuple[int, ...] = ()  # ranks that are gone (not frozen): nothing to kill

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
        from lnsp.config import ConfigError

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


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    root: Path | None = None  # the run directory, for the ranks' heartbeats
    device: str = "cpu"  # where the synchronisation tensors live

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def heartbeat_path(self, root: Path) -> Path:
        return root / f"heartbeat-rank{self.rank}.json"

    def sync(self, loss: float, stop: bool) -> tuple[float, bool]:
        """One small all-reduce per step: the mean loss, and whether any rank was asked
        to stop (so that all stop at the same step boundary)."""
        if not self.active:
            return loss, stop
        import torch
        import torch.distributed as dist

        t = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]) / self.world, bool(t[1] > 0)

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
        me = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname()}
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

    def laggards(self) -> str:
        """The ranks by heartbeat age, oldest first: the first is the one that stalled."""
        if not self.active or self.root is None:
            return ""
        now, rows = time.time(), []
        for path in sorted(self.root.glob("heartbeat-rank*.json")):
            beat = read_json(path) or {}
            if "time" in beat:
                rows.append((now - beat["time"], int(path.stem.split("rank")[-1]), beat))
        if not rows:
            return ""
        rows.sort(key=lambda r: -r[0])
        # This rank is waiting in the collective, so the stalled one is another.
        others = [r for r in rows if r[1] != self.rank] or rows
        age, rank, beat = others[0]
        return (f"rank {rank} stalled (pid {beat.get('pid')}, step {beat.get('step')}, phase "
                f"'{beat.get('phase')}', heartbeat {age:.1f}s old; the others "
                + ", ".join(f"rank {r} {a:.1f}s" for a, r, _ in rows if r != rank) + ")")

    def beats(self) -> dict[int, dict]:
        if self.root is None:
            return {}
        return {int(p.stem.split("rank")[-1]): read_json(p) or {}
                for p in self.root.glob("heartbeat-rank*.json")}

    def lost(self, wait: float = 3.0) -> dict[int, str]:
        """The ranks that left the job: each survivor writes
        `alive-after-error-rankN.json` into the shared run directory, then waits a moment
        for the others' marks; a rank without one is gone (its process or its node).
        The run directory is shared by every node, so no collective is needed."""
        if not self.active or self.root is None:
            return []
        from lnsp.rundir import write_json

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        mark = self.root / f"alive-after-error-rank{self.rank}.json"
        write_json(mark, {"rank": self.rank, "attempt": attempt, "time": time.time()},
                   durable=False)
        start = time.time()

        def survivors():
            seen = set()
            for p in self.root.glob("alive-after-error-rank*.json"):
                m = read_json(p) or {}
                if m.get("time", 0) >= start - 60 and m.get("attempt") == attempt:
                    seen.add(int(m["rank"]))
            return seen

        while len(survivors()) < self.world and time.time() - start < wait:
            time.sleep(0.1)
        beats, gone = self.beats(), {}
        # before its first heartbeat a rank is known from run.json (rank 0 wrote it)
        known = {r["rank"]: r for r in (read_json(self.root / "run.json") or {}).get("ranks", [])}
        for rank in sorted(set(range(self.world)) - survivors()):
            b = beats.get(rank) or known.get(rank, {})
            age = f", last heartbeat {time.time() - b['time']:.1f}s ago" if b.get("time") else ""
            gone[rank] = (f"rank {rank} (node {b.get('host', '?')}, pid {b.get('pid', '?')}, "
                          f"step {b.get('step', '?')}{age})")
        return gone

    def stalled_pids(self) -> list[int]:
        """The PID of the stalled rank (oldest heartbeat of the others) if on this host."""
        if not self.active or self.root is None:
            return []
        beats = {int(p.stem.split("rank")[-1]): read_json(p) or {}
                 for p in self.root.glob("heartbeat-rank*.json")}
        here = socket.gethostname()
        others = sorted((b.get("time", 0), b.get("pid"), b.get("host")) for r, b in beats.items()
                        if r != self.rank and b.get("pid"))
        return [pid for _, pid, host in others[:1] if host == here]


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
    return Dist(dist.get_rank(), dist.get_world_size(), root,
                sync_device(backend, device))


def classify(error: Exception, d: Dist) -> CollectiveError:
    """Turn a backend error into one clear line naming what happened: a timeout
    names the rank that stalled; a rank that left is named from the survivors' marks
    and ends the survivors with 3 too (the job cannot go on without it)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():
        who = d.laggards()
        return CollectiveError(f"rank {d.rank}: a collective timed out: {who or text}", 3)
    gone = d.lost()
    if gone:
        error = CollectiveError(f"rank {d.rank}: lost {', '.join(gone.values())}; another "
                                f"rank left the job ({text})", 3)
        error.lost = tuple(gone)
        return error
    who = d.laggards()
    return CollectiveError(f"rank {d.rank}: another rank left the job ({text})"
                           + (f"; {who}" if who else ""), 1)


def shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # tearing down a broken group must not hide the real error
        pass
