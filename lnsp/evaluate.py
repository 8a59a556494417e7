"""Held-out evaluation: Hit@1/5/10 and MRR@100 of the true next id over a search of
the whole bank, for the model and for the copy-last baseline. Context ids are
excluded from the ranking for both."""

from __future__ import annotations

import numpy as np
import torch

from lnsp import miner
from lnsp.data import Dataset, window_ids

CUTOFF = 100


def ranks(index, queries: np.ndarray, context: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each target among the search results minus the context ids;
    CUTOFF + 1 when it is not in the top CUTOFF."""
    _, ids = miner.search(index, queries, CUTOFF + context.shape[1])
    keep = (ids != -1) & ~(ids[:, :, None] == context[:, None, :]).any(-1)
    position = np.cumsum(keep, axis=1)
    hit = (ids == target[:, None]) & keep
    found = hit.any(axis=1)
    rank = position[np.arange(len(ids)), hit.argmax(axis=1)]
    return np.where(found & (rank <= CUTOFF), rank, CUTOFF + 1)


def summarise(rank: np.ndarray, prefix: str = "") -> dict:
    out = {f"{prefix}hit@{k}": float((rank <= k).mean()) for k in (1, 5, 10)}
    out[f"{prefix}mrr"] = float(np.where(rank <= CUTOFF, 1.0 / rank, 0.0).mean())
    return out


@torch.no_grad()
def evaluate(model, ds: Dataset, index, starts: np.ndarray, ctx_len: int,
             device: torch.device, batch: int = 256) -> dict:
    """Model and copy-last figures over the windows at `starts`."""
    was_training = model.training
    model.eval()
    model_ranks, base_ranks = [], []
    for i in range(0, len(starts), batch):
        context, target = window_ids(ds, starts[i:i + batch], ctx_len)
        vectors = np.asarray(ds.bank[context.reshape(-1)]).reshape(*context.shape, -1)
        query = model(torch.from_numpy(vectors).to(device)).float().cpu().numpy()
        model_ranks.append(ranks(index, query, context, target))
        base_ranks.append(ranks(index, vectors[:, -1], context, target))
    model.train(was_training)
    return {**summarise(np.concatenate(model_ranks)),
            **summarise(np.concatenate(base_ranks), "baseline_")}


def subset(starts: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed sample of n windows (all when n is 0 or larger than the set)."""
    if n == 0 or n >= len(starts):
        return starts
    return np.sort(np.random.default_rng(seed + 1).choice(starts, size=n, replace=False))
