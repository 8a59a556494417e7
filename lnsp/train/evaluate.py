"""Held-out evaluation: Hit@1/5/10 and MRR@100 of the true next id over a search of
the whole bank, for the model and for the two parameter-free baselines: copy-last
(the last context vector as the query) and the best fixed blend of the context
(weights decaying by a factor per step toward the past, the factor chosen once on
training windows). Context ids are excluded from the ranking for all three.

Text corpora repeat sentences (boilerplate), and a repeated sentence is the same vector
under another bank id: a retrieved row identical to the true next vector counts as
that vector, and a row identical to a context vector is excluded as the context is,
for the model and the baselines alike (which copy the index returns first is arbitrary)."""

from __future__ import annotations

import numpy as np
import torch

from lnsp.model import miner
from lnsp.model.loss import SAME
from lnsp.data.dataset import Dataset, window_ids

CUTOFF = 100
DECAYS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # 0.0 is copy-last
CHOICE_WINDOWS = 2000  # training windows the blend's decay is chosen on
# Extra results searched so that CUTOFF remain once repeats of the context are excluded
# too (a window whose context repeats more often than this ranks a little pessimistically).
REPEATS = 20


def same(bank, a, b) -> np.ndarray:
    """Whether bank rows a and b are the same vector: the id itself, or a repeat of it
    (text corpora repeat sentences, and which copy the index returns first is arbitrary)."""
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    x = np.asarray(bank[a], dtype=np.float64)
    y = np.asarray(bank[b], dtype=np.float64)
    return (a == b) | (np.einsum("ij,ij->i", x, y) >= SAME)


def copies(bank, ids: np.ndarray, context: np.ndarray, target: np.ndarray):
    """For search results ids (B, N): whether each is the target or a repeat of it, and
    whether it is a context id or a repeat of one that is not also a repeat of the target
    (a next sentence that repeats one in its context stays findable, as its id always
    was). -1 (no result) is neither."""
    valid = ids != -1
    rows = np.where(valid, ids, 0)
    found = np.asarray(bank[rows.reshape(-1)], dtype=np.float32).reshape(*ids.shape, -1)
    truth = np.asarray(bank[target], dtype=np.float32)
    ctx = np.asarray(bank[context.reshape(-1)], dtype=np.float32).reshape(*context.shape, -1)
    # Batched products (BLAS): a quarter of the time of the same einsum.
    is_target = (ids == target[:, None]) | ((found @ truth[:, :, None])[..., 0] >= SAME)
    in_context = ((ids[:, :, None] == context[:, None, :]).any(-1)
                  | ((found @ ctx.transpose(0, 2, 1) >= SAME).any(-1) & ~is_target))
    return is_target & valid, in_context & valid


def blend(vectors: np.ndarray, decay: float) -> np.ndarray:
    """(B, T, D) context -> (B, D) unit queries: weight decay**age, age 0 the last."""
    age = np.arange(vectors.shape[1] - 1, -1, -1)
    weights = np.where(age == 0, 1.0, decay ** age.astype(float))
    query = np.einsum("t,btd->bd", weights, vectors)
    return (query / np.linalg.norm(query, axis=1, keepdims=True)).astype(np.float32)


def choose_decay(ds: Dataset, index, train_starts: np.ndarray, ctx_len: int,
                 seed: int = 0, batch: int = 256) -> float:
    """The decay with the best Hit@10 (then MRR) on a fixed sample of training
    windows: the blend is tuned on training data only, as the model is. Ranked
    `batch` windows at a time, as `evaluate` does: the search results' vectors of all
    2,000 at once are 0.8 GB at 768-d."""
    starts = subset(train_starts, CHOICE_WINDOWS, seed)
    context, target = window_ids(ds, starts, ctx_len)
    vectors = np.asarray(ds.bank[context.reshape(-1)]).reshape(*context.shape, -1)
    scores = {}
    for decay in DECAYS:
        rank = np.concatenate([
            ranks(index, blend(vectors[i:i + batch], decay), context[i:i + batch],
                  target[i:i + batch], ds.bank) for i in range(0, len(starts), batch)])
        s = summarise(rank)
        scores[decay] = (s["hit@10"], s["mrr"])
    return max(DECAYS, key=lambda d: scores[d])


def ranks(index, queries: np.ndarray, context: np.ndarray, target: np.ndarray,
          bank=None) -> np.ndarray:
    """1-based rank of each target among the search results minus the context ids;
    CUTOFF + 1 when it is not in the top CUTOFF. Given the bank, a repeat of the target
    is the target and a repeat of a context vector is excluded (see the module note)."""
    _, ids = miner.search(index, queries, CUTOFF + context.shape[1] + REPEATS)
    if bank is None:
        is_target = ids == target[:, None]
        in_context = (ids[:, :, None] == context[:, None, :]).any(-1)
    else:
        is_target, in_context = copies(bank, ids, context, target)
    keep = (ids != -1) & ~in_context
    position = np.cumsum(keep, axis=1)
    hit = is_target & keep
    found = hit.any(axis=1)
    rank = position[np.arange(len(ids)), hit.argmax(axis=1)]
    return np.where(found & (rank <= CUTOFF), rank, CUTOFF + 1)


def summarise(rank: np.ndarray, prefix: str = "") -> dict:
    out = {f"{prefix}hit@{k}": float((rank <= k).mean()) for k in (1, 5, 10)}
    out[f"{prefix}mrr"] = float(np.where(rank <= CUTOFF, 1.0 / rank, 0.0).mean())
    return out


def run_decay(job) -> float:
    """The blend's decay for a training job, chosen once (then cached on the job) on
    the windows of all training chains, so that every rank picks the same one."""
    decay = getattr(job, "blend_decay", None)
    if decay is None:
        from lnsp.data.dataset import windows

        cfg = job.config
        train, _ = windows(job.ds, cfg.ctx_len, cfg.val_fraction, cfg.seed)
        decay = job.blend_decay = choose_decay(job.ds, job.index, train, cfg.ctx_len, cfg.seed)
    return decay


@torch.no_grad()
def evaluate(model, ds: Dataset, index, starts: np.ndarray, ctx_len: int,
             device: torch.device, batch: int = 256, decay: float | None = None) -> dict:
    """Model, copy-last (`baseline_*`) and, given its decay, best-blend (`blend_*`)
    figures over the windows at `starts`."""
    was_training = model.training
    model.eval()
    model_ranks, base_ranks, blend_ranks = [], [], []
    # Mean cosine of each query to the true next vector: what a generator that
    # decodes the query as a vector (rather than ranking the bank) relies on.
    cosines = {"cos": [], "baseline_cos": [], "blend_cos": []}
    for i in range(0, len(starts), batch):
        context, target = window_ids(ds, starts[i:i + batch], ctx_len)
        vectors = np.asarray(ds.bank[context.reshape(-1)]).reshape(*context.shape, -1)
        query = model(torch.from_numpy(vectors).to(device)).float().cpu().numpy()
        model_ranks.append(ranks(index, query, context, target, ds.bank))
        base_ranks.append(ranks(index, vectors[:, -1], context, target, ds.bank))
        truth = np.asarray(ds.bank[target])
        cosines["cos"].append((query * truth).sum(1))
        cosines["baseline_cos"].append((vectors[:, -1] * truth).sum(1))
        if decay is not None:
            mixed = blend(vectors, decay)
            blend_ranks.append(ranks(index, mixed, context, target, ds.bank))
            cosines["blend_cos"].append((mixed * truth).sum(1))
    model.train(was_training)
    out = {**summarise(np.concatenate(model_ranks)),
           **summarise(np.concatenate(base_ranks), "baseline_")}
    if decay is not None:
        out.update(summarise(np.concatenate(blend_ranks), "blend_"), blend_decay=decay)
    # float64 means: chunked evaluations (ranks, progress ticks) add up to the same figure.
    out.update({k: float(np.concatenate(v).astype(np.float64).mean())
                for k, v in cosines.items() if v})
    return out


def subset(starts: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed sample of n windows (all when n is 0 or larger than the set)."""
    if n == 0 or n >= len(starts):
        return starts
    return np.sort(np.random.default_rng(seed + 1).choice(starts, size=n, replace=False))
