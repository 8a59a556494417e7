"""A plain PyTorch training script that knows nothing of lnsp: an MLP, AdamW, a
DataLoader with worker processes, printing its loss. The guard's tests run it as a
user would, under `lnsp run -- python plain_train.py ARGS`.

  --steps N        optimizer steps in all
  --workers N      DataLoader worker processes (default 2)
  --block-at N     before step N: write the file --marker, then block opening the FIFO
                   --gate (a real system call) until the test writes to it
  --fail-at N      raise RuntimeError before step N
  --exit-code N    end with sys.exit(N) after the last step
  --poll           ask lnsp.guard.should_stop() each step (a graceful stop)
"""

import argparse
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block-at", type=int, default=0)
    p.add_argument("--gate", default="")
    p.add_argument("--marker", default="")
    p.add_argument("--fail-at", type=int, default=0)
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--poll", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(4096, 16)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=a.batch, shuffle=True,
                        num_workers=a.workers, persistent_workers=a.workers > 0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0
    print(f"training {a.steps} steps", flush=True)
    while step < a.steps:
        for xb, yb in loader:
            if step + 1 == a.block_at:
                open(a.marker, "w").close()
                with open(a.gate, "rb") as gate:  # blocks in open() until a writer comes
                    gate.read(1)
            if step + 1 == a.fail_at:
                raise RuntimeError(f"the script's own error at step {step + 1}")
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if a.poll:
                import lnsp.guard as guard

                guard.step(loss=loss.item())
                if guard.should_stop():
                    print(f"stopping at step {step}", flush=True)
                    return 0
            if step >= a.steps:
                break
    print(f"done {step} steps", flush=True)
    return a.exit_code


if __name__ == "__main__":
    sys.exit(main())
