"""A DataLoader whose only worker blocks in __getitem__: the main thread waits on the
worker queue."""
import threading

import torch
from torch.utils.data import DataLoader, Dataset


class Stuck(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        threading.Event().wait()  # a read that never returns, in the worker
        return torch.zeros(1)


if __name__ == "__main__":
    loader = DataLoader(Stuck(), num_workers=1, multiprocessing_context="fork")
    print("ready", flush=True)
    for batch in loader:
        pass
