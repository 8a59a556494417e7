"""One training step, written once: `Trainer.step` is what `fit` runs, what the probe
times phase by phase and what the bench measures against a plain loop.

Each part of the step is a phase of the guard (`lnsp.guard.phase`): under a guarded
run the watchdog learns its budget and names it in a stall; without one it costs a
function call.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import lnsp.guard as guard
from lnsp.config import TrainConfig
from lnsp.data import dataset as data
from lnsp.errors import TrainingError
from lnsp.guard.phases import Phase
from lnsp.model import miner, precision
from lnsp.model.loss import SAME, info_nce
from lnsp.model.tower import QueryTower, resolve_device
from lnsp.train import distributed

__all__ = ["Trainer", "vectors", "repeats"]


@dataclass
class Trainer:
    config: TrainConfig
    ds: data.Dataset
    index: object
    model: QueryTower
    optimizer: torch.optim.Optimizer
    device: torch.device
    train_starts: np.ndarray  # this rank's share of the training windows
    val_starts: np.ndarray
    batch: int  # this rank's micro-batch: batch_size / world size
    recall: miner.RecallCheck | None = None  # the mined recall on the model's own queries

    @classmethod
    def build(cls, config: TrainConfig, ds: data.Dataset, log, rank: int = 0,
              world: int = 1) -> "Trainer":
        """Index, model and optimizer for a loaded data set (for one rank of `world`)."""
        torch.manual_seed(config.seed)
        device = resolve_device(config.device)
        if world > 1:  # one GPU per rank: the one of its LOCAL_RANK on its node
            cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
            device = torch.device(distributed.device_for(
                config.device, int(os.environ.get("LOCAL_RANK", "0")), cuda))
        with guard.phase(Phase.INDEX):
            t = time.perf_counter()
            index = miner.build(ds.bank, config.index, config.nlist, config.nprobe, ds.root,
                                log, config.seed, prebuilt=ds.index, k=config.k + 1)
            log(f"Index {type(index).__name__}: {index.ntotal} vectors of dimension "
                f"{index.d} in {time.perf_counter() - t:.1f}s")
        bf16 = precision.tower_bf16(config.precision, device, config.hidden)
        model = QueryTower(ds.dim, config.hidden, bf16=bf16).to(device)
        log(f"Query tower: GRU {ds.dim} -> {config.hidden}, matrix products in "
            f"{'bf16 (autocast)' if bf16 else 'fp32'} "
            f"({precision.describe(config.precision, device, config.hidden)})")
        if world > 1:  # gradients are all-reduced inside backward
            model = torch.nn.parallel.DistributedDataParallel(
                model, **distributed.ddp_arguments(str(device)))
        # The fused AdamW: one kernel over all parameters (1.8 ms a step at the seed's size
        # here, against 10-13 ms for the default foreach/for-loop ones).
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay,
                                      fused=True if device.type in ("cpu", "cuda") else None)
        train_starts, val_starts = data.windows(ds, config.ctx_len, config.val_fraction,
                                                config.seed, rank, world)
        recall = miner.RecallCheck(index, ds.bank, config.recall_every,
                                   adjust=config.nprobe == 0, log=log)
        return cls(config, ds, index, model, optimizer, device, train_starts, val_starts,
                   config.batch_size // world, recall)

    @property
    def module(self) -> QueryTower:
        """The bare model (DistributedDataParallel wraps it when there are ranks)."""
        return getattr(self.model, "module", self.model)

    # ------------------------------------------------------------ the step
    def step(self, micro_batches, phases: dict | None = None) -> float:
        """One optimizer step over `micro_batches` (window starts, one array each; their
        gradients are accumulated): returns the mean loss. Each phase's seconds are
        added to `phases` when given."""
        n = len(micro_batches)
        loss = sum(self.micro_step(starts, 1 / n, phases) for starts in micro_batches) / n
        with self._phase(Phase.OPTIMIZER, phases):
            self.optimize(loss)
        return loss

    @contextlib.contextmanager
    def _phase(self, name: Phase, phases: dict | None):
        with guard.phase(name):
            t = time.perf_counter()
            yield
            if self.device.type == "mps":  # asynchronous: its GPU time belongs to this phase
                torch.mps.synchronize()
            if phases is not None:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    def micro_step(self, starts: np.ndarray, scale: float = 1.0,
                   phases: dict | None = None) -> float:
        """Forward, mine, loss and backward of one micro-batch; returns its loss."""
        cfg = self.config
        with self._phase(Phase.LOAD, phases):
            context_ids, next_ids = data.window_ids(self.ds, starts, cfg.ctx_len)
            context = vectors(self.ds, context_ids, self.device)
            positive = vectors(self.ds, next_ids, self.device)
        with self._phase(Phase.FORWARD, phases):
            query = self.model(context)
        # Mine with the current query; the TRUE next vector stays the positive.
        with self._phase(Phase.RETRIEVE, phases):
            # k + ctx_len + 1 so that k candidates remain once the context is masked out.
            queries = query.detach().float().cpu().numpy()
            _, candidates = miner.search(self.index, queries, cfg.k + cfg.ctx_len + 1)
            if self.recall is not None:  # the first search, then every --recall-every
                self.recall.observe(queries, candidates)
            # Evaluation never ranks the context: neither may training push away from it.
            in_context = (candidates[:, :, None] == context_ids[:, None, :]).any(-1)
            ok = (candidates != next_ids[:, None]) & (candidates != -1) & ~in_context
            mined = vectors(self.ds, np.where(ok, candidates, 0), self.device)
            # Text repeats sentences: a candidate identical to the true next vector is the
            # positive under another id (a false negative), one identical to a context
            # vector is context; evaluation counts them so, and training masks them out.
            ok = torch.from_numpy(ok).to(self.device) & ~repeats(mined, positive, context)
        with self._phase(Phase.LOSS, phases):
            loss = info_nce(query, positive, mined, ok,
                            torch.from_numpy(next_ids).to(self.device), cfg.temperature,
                            torch.from_numpy(context_ids).to(self.device), cfg.cosine_weight,
                            context)
        with self._phase(Phase.BACKWARD, phases):  # with ranks, the all-reduce is in here
            (loss * scale).backward()
        return float(loss.detach())

    def optimize(self, loss: float) -> None:
        """Clip-free step that refuses a non-finite loss or gradient."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not (np.isfinite(loss) and np.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite {'loss' if not np.isfinite(loss) else 'gradient norm'} "
                                f"(loss {loss}, grad norm {norm}): stopped before "
                                "optimizer.step(); lower --lr or raise --temperature")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ batches
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's micro-batches (window starts), shuffled by seed and epoch alone so
        that a resumed run sees exactly the batches it would have seen."""
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_starts)
        n = len(order) // self.batch
        return [order[i * self.batch:(i + 1) * self.batch] for i in range(n)]

    def micro_batches(self, batches: list[np.ndarray]):
        """Iterate the micro-batches, through DataLoader workers when asked. Workers are
        started with spawn: a fork after OpenMP has run can hang the child forever."""
        if self.config.workers == 0:
            return iter(batches)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                             num_workers=self.config.workers,
                                             multiprocessing_context="spawn",
                                             collate_fn=np.asarray)
        return iter(loader)


def vectors(ds: data.Dataset, ids: np.ndarray, device) -> torch.Tensor:
    """Bank rows for an id array of any shape (gathered from the memory map)."""
    rows = np.asarray(ds.bank[ids.reshape(-1)], dtype=np.float32)
    return torch.from_numpy(rows.reshape(*ids.shape, -1)).to(device)


@torch.no_grad()
def repeats(mined: torch.Tensor, positive: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, K) True where a mined vector (B, K, D) repeats the positive (B, D) or a
    context vector (B, T, D): cosine >= SAME, the rule evaluation ranks by."""
    # One batched product against [positive, context]: (B, K, 1 + T).
    scores = torch.bmm(mined, torch.cat([positive.unsqueeze(1), context], 1).transpose(1, 2))
    return (scores >= SAME).any(-1)
