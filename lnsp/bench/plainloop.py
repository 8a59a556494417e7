"""A training loop written the way a user of PyTorch and FAISS would write it, with no
lnsp code: every pool at all cores, a GRU query tower, a FAISS flat search for hard
negatives, an InfoNCE step. The yardstick `lnsp bench` holds lnsp's default against.

Run it by path, never as `-m lnsp.bench.plainloop`: importing the lnsp package would set
lnsp's thread variables first. It reads commands from stdin, one per line, so that an
orchestrator can alternate it block by block with another loop:

    python lnsp/bench/plainloop.py BANK.npy BATCH [HIDDEN CTX K]
    stdin:  run STEPS      -> stdout: {"steps": STEPS, "seconds": S}
            quit
"""

import json
import os
import sys
import time

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Tower(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        _, h = self.gru(x)
        return F.normalize(self.norm(self.proj(h[-1])), dim=-1)


def main(path, batch, hidden=768, ctx=10, k=100):
    cores = os.cpu_count()
    torch.set_num_threads(cores)
    faiss.omp_set_num_threads(cores)
    bank = np.load(path)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    vectors = torch.from_numpy(bank)
    torch.manual_seed(0)
    model = Tower(bank.shape[1], hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)

    def step():
        ids = rng.integers(0, len(bank), size=(batch, ctx + 1))
        query = model(vectors[ids[:, :ctx]])
        positive = vectors[ids[:, ctx]]
        _, found = index.search(query.detach().numpy(), k + 1)
        ok = torch.from_numpy((found != ids[:, ctx:]) & (found != -1))
        hard = torch.bmm(vectors[np.where(ok.numpy(), found, 0)], query.unsqueeze(-1))
        hard = hard.squeeze(-1).masked_fill(~ok, float("-inf"))
        pos = (query * positive).sum(-1, keepdim=True)
        same = torch.from_numpy(ids[:, ctx][None, :] == ids[:, ctx][:, None])
        in_batch = (query @ positive.T).masked_fill(same, float("-inf"))
        logits = torch.cat([pos, hard, in_batch], dim=1) / 0.05
        loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    print(json.dumps({"ready": True, "lnsp_loaded": "lnsp" in sys.modules,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        steps = int(words[1])
        t = time.perf_counter()
        for _ in range(steps):
            step()
        print(json.dumps({"steps": steps, "seconds": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *[int(a) for a in sys.argv[2:]])
