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
           "post_mortem", "shutdown"]


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


def classify(error: Exception, rank: int, who: str = "") -> CollectiveError:
    """Turn a backend error into one clear line naming what happened: a timeout is a
    stall (code 3), anything else a rank that left (code 1)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():
        return CollectiveError(f"rank {rank}: a collective timed out: {who or text}",
                               ExitCode.STALLED)
    return CollectiveError(f"rank {rank}: another rank left the job ({text})"
                           + (f"; {who}" if who else ""), ExitCode.INTERNAL)


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

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

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

    def beats(self) -> dict[int, Heartbeat]:
        return RunDir(self.root).rank_heartbeats() if self.active and self.root else {}

    def laggards(self) -> str:
        return laggards(self.beats(), self.rank, time.time()) if self.active else ""

    def stalled_pids(self) -> list[int]:
        pid = stalled_pid(self.beats(), self.rank, socket.gethostname())
        return [pid] if pid else []


def post_mortem(error: Exception, d: Dist, dumper, log) -> CollectiveError:
    """After a failed collective: name what happened, dump this rank, take py-spy stacks
    of the stalled rank (it cannot dump itself) and, when it is frozen, kill it so that
    torchrun can restart the job. Returns the error to raise."""
    from lnsp.dumps import native_stacks

    failure = classify(error, d.rank, d.laggards())
    log(f"[DISTRIBUTED] {failure}")
    dumper.dump("collective")
    for pid in d.stalled_pids():
        stacks = native_stacks(pid, timeout=10)
        if stacks:
            dumper.write(f"stalled-pid{pid}", f"py-spy of stalled rank pid {pid}:\n{stacks}")
        if failure.exit_code == ExitCode.STALLED:  # frozen: nothing else ends it
            log(f"[DISTRIBUTED] killing stalled rank pid {pid} (SIGKILL)")
            os.kill(pid, signal.SIGKILL)
    return failure


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


def shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # tearing down a broken group must not hide the real error
        pass
