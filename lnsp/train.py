"""The trainer: set-up, one training step (shared with the probe) and the loop.

Everything about a run lands in its run directory; the loop checks for a stop
request at every step boundary and leaves exit.json on every way out.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lnsp import checkpoint, data, evaluate, miner
from lnsp.config import TrainConfig
from lnsp.dumps import Dumper
from lnsp.loss import info_nce
from lnsp.model import QueryTower, resolve_device
from lnsp.rundir import RunDir, RunLog, update_json, write_json
from lnsp.watchdog import GracefulStop, Heartbeat, Watchdog


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, a missing checkpoint): one clear line."""


@dataclass
class Job:
    config: TrainConfig
    ds: data.Dataset
    index: object
    model: QueryTower
    optimizer: torch.optim.Optimizer
    device: torch.device
    train_starts: np.ndarray
    val_starts: np.ndarray


def setup(config: TrainConfig, ds: data.Dataset, log, watchdog=None) -> Job:
    """Index, model and optimizer for a loaded data set."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if watchdog:
        watchdog.progress("index")
    t = time.perf_counter()
    index = miner.build(ds.bank, config.index, config.nlist, config.nprobe, ds.root, log,
                        config.seed, prebuilt=ds.index)
    log(f"Index {type(index).__name__}: {index.ntotal} vectors of dimension {index.d} "
        f"in {time.perf_counter() - t:.1f}s")
    model = QueryTower(ds.dim, config.hidden).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    train_starts, val_starts = data.windows(ds, config.ctx_len, config.val_fraction, config.seed)
    return Job(config, ds, index, model, optimizer, device, train_starts, val_starts)


def vectors(ds: data.Dataset, ids: np.ndarray, device) -> torch.Tensor:
    """Bank rows for an id array of any shape (gathered from the memory map)."""
    rows = np.asarray(ds.bank[ids.reshape(-1)], dtype=np.float32)
    return torch.from_numpy(rows.reshape(*ids.shape, -1)).to(device)


def train_step(job: Job, starts: np.ndarray, scale: float = 1.0, phases: dict | None = None,
               watchdog=None) -> float:
    """Forward, mine, loss and backward of one micro-batch; returns its loss."""
    cfg, clock = job.config, time.perf_counter

    def mark(name, t0):
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + clock() - t0
        if watchdog:
            watchdog.phase = name

    t = clock()
    context_ids, next_ids = data.window_ids(job.ds, starts, cfg.ctx_len)
    context, positive = vectors(job.ds, context_ids, job.device), vectors(job.ds, next_ids, job.device)
    mark("load", t)
    t = clock()
    query = job.model(context)
    mark("forward", t)
    # Mine with the current query; the TRUE next vector stays the positive.
    t = clock()
    _, candidates = miner.search(job.index, query.detach().float().cpu().numpy(), cfg.k + 1)
    ok = (candidates != next_ids[:, None]) & (candidates != -1)
    mined = vectors(job.ds, np.where(ok, candidates, 0), job.device)
    mark("retrieve", t)
    t = clock()
    loss = info_nce(query, positive, mined, torch.from_numpy(ok).to(job.device),
                    torch.from_numpy(next_ids).to(job.device), cfg.temperature)
    mark("loss", t)
    t = clock()
    (loss * scale).backward()
    mark("backward", t)
    return float(loss.detach())


def optimizer_step(job: Job, loss: float) -> None:
    """Clip-free step that refuses a non-finite loss or gradient."""
    grads = [p.grad.norm() for p in job.model.parameters() if p.grad is not None]
    norm = float(torch.stack(grads).norm()) if grads else 0.0
    if not (np.isfinite(loss) and np.isfinite(norm)):
        job.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"non-finite {'loss' if not np.isfinite(loss) else 'gradient norm'} "
                            f"(loss {loss}, grad norm {norm}): stopped before optimizer.step(); "
                            "lower --lr or raise --temperature")
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)


def epoch_batches(job: Job, epoch: int) -> list[np.ndarray]:
    """The epoch's micro-batches (window starts), shuffled by seed and epoch alone so
    that a resumed run sees exactly the batches it would have seen."""
    cfg = job.config
    order = np.random.default_rng([cfg.seed, epoch]).permutation(job.train_starts)
    n = len(order) // cfg.batch_size
    return [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(n)]


def micro_batches(job: Job, batches: list[np.ndarray]):
    """Iterate the micro-batches, through DataLoader workers when asked. Workers are
    started with spawn: a fork after OpenMP has run can hang the child forever."""
    if job.config.workers == 0:
        return iter(batches)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                         num_workers=job.config.workers,
                                         multiprocessing_context="spawn",
                                         collate_fn=np.asarray)
    return iter(loader)


def run(config: TrainConfig) -> int:
    """Train in the foreground; returns the process exit code (0 finished or stopped)."""
    rd = RunDir(config.run_dir)
    if rd.config.exists() and not config.resume:
        raise data.DataError(f"{rd.root}: run directory already holds a run; "
                             "pass --resume to continue it or choose another --run-dir")
    if config.resume and not rd.config.exists():
        raise data.DataError(f"{rd.root}: no run to resume here")
    log = RunLog(None)
    dumper = Dumper(rd.dumps, log)
    stop = GracefulStop(log).install()
    ending = {"state": "stalled", "step": 0}
    watchdog = Watchdog(config.startup_timeout, config.stall_timeout, config.on_stall, dumper,
                        log, on_exit=lambda phase: _write_exit(rd, "stalled", 3, ending["step"]))
    watchdog.start()

    # Data first: bad input leaves no run directory behind.
    watchdog.progress("load data")
    ds = data.load(config.data, config.ctx_len)
    resolve_device(config.device)
    rd.root.mkdir(parents=True, exist_ok=True)
    log.file = open(rd.log, "a", buffering=1)
    dumper.enable_crash_dumps(log.file)
    write_json(rd.config, config.to_json())
    rd.exit.unlink(missing_ok=True)
    update_json(rd.run, pid=os.getpid(), backend=os.environ.get("LNSP_BACKEND", "foreground"),
                host=socket.gethostname(), python=sys.executable, argv=sys.argv,
                start_time=time.time(), stall_timeout=config.stall_timeout,
                startup_timeout=config.startup_timeout)
    try:
        code = _loop(config, rd, ds, log, watchdog, stop, ending)
    except BaseException as e:
        _write_exit(rd, "failed", 1, ending["step"], error=f"{type(e).__name__}: {e}")
        log(f"FAILED: {type(e).__name__}: {e}")
        raise
    finally:
        watchdog.stop()
    return code


def _write_exit(rd: RunDir, state: str, code: int, step: int, **extra) -> None:
    write_json(rd.exit, {"state": state, "exit_code": code, "step": step,
                         "time": time.time(), **extra})


def _loop(config: TrainConfig, rd: RunDir, ds, log, watchdog, stop, ending) -> int:
    from lnsp import threads

    n_threads = threads.enforce()
    log(f"lnsp train: pid {os.getpid()}, {ds.bank.shape[0]} x {ds.dim} bank, "
        f"{len(ds.offsets) - 1} chains, threads {config.threads} ({n_threads} OpenMP)")
    job = setup(config, ds, log, watchdog)
    heartbeat = Heartbeat(rd.heartbeat, log, config.mem_margin_mb)
    val = evaluate.subset(job.val_starts, config.eval_windows, config.seed)
    steps_per_epoch = len(epoch_batches(job, 0)) // config.accum_steps
    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    if steps_per_epoch == 0:
        raise data.DataError(f"{ds.root}: {len(job.train_starts)} training windows are fewer "
                             f"than one step ({config.batch_size} x {config.accum_steps})")
    epoch, position, step, best = 0, 0, 0, -1.0
    if config.resume and not rd.last_checkpoint().exists():
        log("No checkpoint yet (the run ended before its first): starting from step 0")
    elif config.resume:
        state = checkpoint.load(rd.last_checkpoint())
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        epoch, position, step, best = (state["epoch"], state["position"], state["step"],
                                       state["best"])
        log(f"Resumed from {rd.last_checkpoint()} at epoch {epoch + 1}, step {step}")
    log(f"Training {len(job.train_starts)} windows, {steps_per_epoch} steps/epoch, "
        f"{total} steps; {len(val)} held-out windows")

    def save(path, epoch, position):
        checkpoint.save(path, job.model, job.optimizer, config, epoch=epoch,
                        position=position, step=step, best=best)

    loss, window_t, window_steps = float("nan"), time.perf_counter(), 0
    while step < total and epoch < config.epochs:
        batches = epoch_batches(job, epoch)
        feed = micro_batches(job, batches[position * config.accum_steps:])
        while position < steps_per_epoch and step < total:
            # A stop request is honoured between steps, never inside one.
            if stop.requested:
                save(rd.last_checkpoint(), epoch, position)
                _write_exit(rd, "stopped", 0, step, signal=stop.requested)
                log(f"Stopped on {stop.requested} at step {step}; checkpoint "
                    f"{rd.last_checkpoint()} (continue with --resume)")
                _plot(rd, log)
                return 0
            # Accumulate gradients over micro-batches, then one optimizer step.
            loss = sum(train_step(job, next(feed), 1 / config.accum_steps, watchdog=watchdog)
                       for _ in range(config.accum_steps)) / config.accum_steps
            watchdog.phase = "optimizer"
            optimizer_step(job, loss)
            step, position, window_steps = step + 1, position + 1, window_steps + 1
            ending["step"] = step
            watchdog.first_step_done()
            # Heartbeat after every step: an outside observer's proof of life.
            rate = window_steps / max(time.perf_counter() - window_t, 1e-9)
            heartbeat.beat(epoch + 1, step, "train", loss,
                           rate * config.batch_size * config.accum_steps)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                watchdog.phase = "checkpoint"
                save(rd.last_checkpoint(), epoch, position)
            if step % config.log_every == 0 or step == total:
                log(f"Epoch {epoch + 1}/{config.epochs} | Step {step} | Loss {loss:.4f} "
                    f"| {rate:.2f} it/s")
                window_t, window_steps = time.perf_counter(), 0
        # End of epoch (or of the step budget): evaluate, checkpoint, keep the best.
        watchdog.progress("evaluate")
        metrics = {"epoch": epoch + 1, "step": step, "loss": loss,
                   **evaluate.evaluate(job.model, ds, job.index, val, config.ctx_len, job.device)}
        with open(rd.metrics, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        log(f"Eval epoch {epoch + 1}: Hit@1 {metrics['hit@1']:.3f} Hit@5 {metrics['hit@5']:.3f} "
            f"Hit@10 {metrics['hit@10']:.3f} MRR {metrics['mrr']:.3f} | copy-last Hit@10 "
            f"{metrics['baseline_hit@10']:.3f} MRR {metrics['baseline_mrr']:.3f}")
        done_epoch = position >= steps_per_epoch
        epoch, position = (epoch + 1, 0) if done_epoch else (epoch, position)
        watchdog.progress("checkpoint")
        if metrics["hit@10"] >= best:  # on a tie the later, longer-trained model
            best = metrics["hit@10"]
            save(rd.checkpoints / "best.pt", epoch, position)
        save(rd.checkpoints / f"epoch_{epoch:03d}.pt", epoch, position)
        save(rd.last_checkpoint(), epoch, position)
        heartbeat.epoch_end(epoch)
        watchdog.progress("train")
    _write_exit(rd, "finished", 0, step)
    log(f"Finished: {step} steps; run directory {rd.root}")
    _plot(rd, log)
    return 0


def _plot(rd: RunDir, log) -> None:
    """plots.png for the run when matplotlib is installed (an optional extra)."""
    try:
        from lnsp import plot
        plot.draw(rd)
    except ImportError:
        pass
    except Exception as e:  # a plot must never fail a finished run
        log(f"plot not drawn: {e}")
