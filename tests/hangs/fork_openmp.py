"""Runs OpenMP (torch, 2 threads), then forks: the child's first parallel region waits
forever for pool threads that fork did not copy."""
import os
import sys

import torch

torch.set_num_threads(2)
x = torch.ones(512, 512)
x @ x
pid = os.fork()
if pid == 0:
    print(f"child {os.getpid()}", flush=True)
    x @ x
    os._exit(0)
os.waitpid(pid, 0)
sys.exit(0)
