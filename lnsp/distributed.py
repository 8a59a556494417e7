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

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    root: Path | None = None  # the run directory, for the ranks' heartbeats

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

        t = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.world, bool(t[1] > 0)

    def min_int(self, value: int) -> int:
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
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


def init(pg_timeout: float, root: Path) -> Dist:
    """Join the process group when torchrun started this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(root=root)
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank, timeout = int(os.environ["RANK"]), timedelta(seconds=pg_timeout)
    # The group's keys live under a prefix of their own per torchrun attempt: after a
    # restart the store still holds the last attempt's addresses, and the new ranks
    # would try to connect to processes that are gone (seen here with gloo).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"lnsp/attempt-{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), root)


def classify(error: Exception, d: Dist) -> CollectiveError:
    """Turn a backend error into one clear line naming what happened."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    who = d.laggards()
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():
        return CollectiveError(f"rank {d.rank}: a collective timed out: {who or text}", 3)
    return CollectiveError(f"rank {d.rank}: another rank left the job ({text})"
                           + (f"; {who}" if who else ""), 1)


def shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # tearing down a broken group must not hide the real error
        pass
