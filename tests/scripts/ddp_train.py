"""A plain torch.distributed training script (gloo, CPU) that knows nothing of lnsp:
each rank trains an MLP wrapped in DistributedDataParallel on its shard, printing its
loss. Run by torchrun; the guard's tests run it as `lnsp launch ddp -- python ddp_train.py`.

  --steps N      optimizer steps in all
  --block-rank R, --block-at N, --gate G, --marker M
                 rank R, before step N, writes M and blocks opening the FIFO G
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--block-rank", type=int, default=-1)
    p.add_argument("--block-at", type=int, default=0)
    p.add_argument("--gate", default="")
    p.add_argument("--marker", default="")
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, a.steps + 1):
        if rank == a.block_rank and step == a.block_at:
            open(a.marker, "w").close()
            with open(a.gate, "rb") as gate:
                gate.read(1)
        x = torch.randn(32, 16)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
