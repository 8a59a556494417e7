"""Maps two OpenMP runtimes (torch's GNU libgomp and Intel's libiomp5 from the
intel-openmp wheel), then waits forever inside libiomp5 on an OpenMP lock."""
import ctypes
import os
import sys

import torch

torch.set_num_threads(2)
x = torch.ones(256, 256)
x @ x
iomp = ctypes.CDLL(os.path.join(sys.prefix, "lib", "libiomp5.so"))
lock = ctypes.create_string_buffer(64)
iomp.omp_init_lock(lock)
iomp.omp_set_lock(lock)
print("ready", flush=True)
iomp.omp_set_lock(lock)  # never granted: the runtime spins in its lock wait
