"""One rank of a two-process gloo job on loopback: rank 0 enters all_reduce, rank 1
never arrives (it sleeps)."""
import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
print(f"ready {rank}", flush=True)
if rank == 0:
    dist.all_reduce(torch.ones(4))
else:
    time.sleep(3600)
