"""Autoregressive next-vector generation from a checkpoint: the query tower predicts
v, FAISS finds its neighbours, the decider picks SNAP / BLEND / NOVEL, and the
chosen vector joins the context. One JSON line per step."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import torch

from lnsp import checkpoint, data, miner
from lnsp.config import load as load_config
from lnsp.decider import Lane, decide
from lnsp.model import QueryTower


class Retriever:
    """FAISS search with a time budget; a failure or a timeout returns None."""

    def __init__(self, index, bank, timeout_s: float = 1.0, log=print):
        self.index, self.bank, self.timeout_s, self.log = index, bank, timeout_s, log
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lnsp-retrieve")

    def search(self, v: np.ndarray, k: int):
        future = self.pool.submit(miner.search, self.index, v[None, :], k)
        try:
            _, ids = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.log(f"retriever timed out after {self.timeout_s:g}s: NOVEL for this step")
            return None
        except Exception as e:  # any search failure degrades to NOVEL, never a crash
            self.log(f"retriever failed ({type(e).__name__}: {e}): NOVEL for this step")
            return None
        ids = ids[0][ids[0] >= 0]
        return ids, np.asarray(self.bank[ids], dtype=np.float32)


def step(model, context: list[np.ndarray], ctx_len: int, retriever: Retriever, profile: Lane,
         recent: list[int]) -> tuple[dict, np.ndarray]:
    """One generation step: predict, retrieve, decide. Returns (record, vector)."""
    t = time.perf_counter()
    with torch.no_grad():
        window = torch.from_numpy(np.stack(context[-ctx_len:])[None])
        v = model(window)[0].numpy()
    found = retriever.search(v, profile.k)
    if found is None:
        d = decide(v, np.zeros((0, len(v))), np.zeros(0, np.int64), profile)
    else:
        d = decide(v, found[1], found[0], profile, recent)
    record = {"decision": d.decision, "c": d.c, "neighbor_id": d.neighbor_id,
              "alpha": d.alpha, "lane": profile.name,
              "latency_ms": (time.perf_counter() - t) * 1e3}
    return record, d.vector


def generate(checkpoint_path: str, data_dir: str, steps: int, profile: Lane,
             start: int | None = None, context_ids: list[int] | None = None, seed: int = 0,
             out: str | None = None, echo=print, retriever_timeout: float = 1.0) -> dict:
    state = checkpoint.load(Path(checkpoint_path))
    config = load_config(state["config"])
    ds = data.load(data_dir, config.ctx_len)
    torch.manual_seed(seed)
    model = QueryTower(ds.dim, config.hidden)
    model.load_state_dict(state["model"])
    model.eval()
    index = miner.build(ds.bank, "flat", prebuilt=ds.index, log=lambda m: None)
    retriever = Retriever(index, ds.bank, retriever_timeout, echo)

    _, held_out = data.split_chains(ds, config.ctx_len, config.val_fraction, config.seed)
    if context_ids is None:
        if start is None:  # a held-out chain chosen by the seed
            start = int(np.random.default_rng(seed).choice(held_out))
        if not 0 <= start < len(ds.offsets) - 1:
            raise data.DataError(f"--start {start}: no such chain (0..{len(ds.offsets) - 2})")
        chain = ds.chain(start)
        if len(chain) < config.ctx_len:
            raise data.DataError(f"--start {start}: chain has {len(chain)} vectors, "
                                 f"ctx_len is {config.ctx_len}")
        context_ids = [int(i) for i in chain[:config.ctx_len]]
        truth = [int(i) for i in chain[config.ctx_len:]] if start in set(held_out) else []
    else:
        bad = [i for i in context_ids if not 0 <= i < ds.bank.shape[0]]
        if bad:
            raise data.DataError(f"--context-ids: {bad} out of range (bank has "
                                 f"{ds.bank.shape[0]} rows)")
        truth = []
    context = [np.asarray(ds.bank[i], dtype=np.float32) for i in context_ids]
    recent = list(context_ids)
    records = []
    sink = open(out, "w") if out else None
    try:
        for t in range(steps):
            record, vector = step(model, context, config.ctx_len, retriever, profile, recent)
            record = {"step": t + 1, **record}
            records.append(record)
            context.append(vector)
            if record["decision"] in ("SNAP", "BLEND"):
                recent.append(record["neighbor_id"])
            if sink:
                sink.write(json.dumps(record) + "\n")
    finally:
        if sink:
            sink.close()
    counts = Counter(r["decision"] for r in records)
    cs = [r["c"] for r in records if r["c"] is not None]
    snaps = [(r, truth[i]) for i, r in enumerate(records[:len(truth)]) if r["decision"] == "SNAP"]
    summary = {"steps": steps, "lane": profile.name, "start_chain": start,
               "decisions": dict(counts), "mean_c": float(np.mean(cs)) if cs else None,
               "held_out": bool(truth),
               "snap_true_next": (sum(r["neighbor_id"] == t for r, t in snaps) / len(snaps)
                                  if snaps else None)}
    return summary
