"""The trainer: set-up, one training step (shared with the probe and bench), the
run's state and the `fit` loop.

Everything about a run lands in its run directory through the recorder; the loop
checks for a stop request at every step boundary and leaves exit.json on every way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from lnsp.train import checkpoint
from lnsp.data import dataset as data
from lnsp.train import distributed
from lnsp.train import evaluate
from lnsp.model import miner
from lnsp.model import precision
from lnsp.config import TrainConfig
from lnsp.errors import LnspError, RunDirError, TrainingError
from lnsp.guard.restarts import restart_refused
from lnsp.model.loss import SAME, info_nce
from lnsp.model.tower import QueryTower, resolve_device
from lnsp.train.recorder import Recorder
from lnsp.rundir import ExitCode, RunDir, RunLog

__all__ = ["Job", "RunState", "TrainingError", "setup", "train_step", "optimizer_step",
           "epoch_batches", "micro_batches", "fit", "run"]


@dataclass
class Job:
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

    @property
    def module(self) -> QueryTower:
        """The bare model (DistributedDataParallel wraps it when there are ranks)."""
        return getattr(self.model, "module", self.model)


def setup(config: TrainConfig, ds: data.Dataset, log, watchdog=None, rank: int = 0,
          world: int = 1) -> Job:
    """Index, model and optimizer for a loaded data set (for one rank of `world`)."""
    from lnsp.train import distributed

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if world > 1:  # one GPU per rank: the one of its LOCAL_RANK on its node
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = torch.device(distributed.device_for(
            config.device, int(os.environ.get("LOCAL_RANK", "0")), cuda))
    if watchdog:
        watchdog.progress("index")
    t = time.perf_counter()
    index = miner.build(ds.bank, config.index, config.nlist, config.nprobe, ds.root, log,
                        config.seed, prebuilt=ds.index, k=config.k + 1)
    log(f"Index {type(index).__name__}: {index.ntotal} vectors of dimension {index.d} "
        f"in {time.perf_counter() - t:.1f}s")
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
    train_starts, val_starts = data.windows(ds, config.ctx_len, config.val_fraction, config.seed,
                                            rank, world)
    recall = miner.RecallCheck(index, ds.bank, config.recall_every,
                               adjust=config.nprobe == 0, log=log)
    return Job(config, ds, index, model, optimizer, device, train_starts, val_starts,
               config.batch_size // world, recall)


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


def train_step(job: Job, starts: np.ndarray, scale: float = 1.0, phases: dict | None = None,
               watchdog=None) -> float:
    """Forward, mine, loss and backward of one micro-batch; returns its loss. Each
    phase is named to the watchdog as it starts and timed into `phases`."""
    cfg = job.config

    @contextlib.contextmanager
    def phase(name):
        if watchdog:
            watchdog.phase = name
        t = time.perf_counter()
        yield
        if job.device.type == "mps":  # asynchronous: its GPU time belongs to this phase
            torch.mps.synchronize()
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    with phase("load"):
        context_ids, next_ids = data.window_ids(job.ds, starts, cfg.ctx_len)
        context = vectors(job.ds, context_ids, job.device)
        positive = vectors(job.ds, next_ids, job.device)
    with phase("forward"):
        query = job.model(context)
    # Mine with the current query; the TRUE next vector stays the positive.
    with phase("retrieve"):
        # k + ctx_len + 1 so that k candidates remain once the context is masked out.
        queries = query.detach().float().cpu().numpy()
        _, candidates = miner.search(job.index, queries, cfg.k + cfg.ctx_len + 1)
        if job.recall is not None:  # the first search, then every --recall-every: vs exact
            job.recall.observe(queries, candidates)
        # Evaluation never ranks the context: neither may training push away from it.
        in_context = (candidates[:, :, None] == context_ids[:, None, :]).any(-1)
        ok = (candidates != next_ids[:, None]) & (candidates != -1) & ~in_context
        mined = vectors(job.ds, np.where(ok, candidates, 0), job.device)
        # Text repeats sentences: a candidate identical to the true next vector is the
        # positive under another id (a false negative), one identical to a context vector
        # is context; evaluation counts them so, and training masks them out likewise.
        ok = torch.from_numpy(ok).to(job.device) & ~repeats(mined, positive, context)
    with phase("loss"):
        loss = info_nce(query, positive, mined, ok,
                        torch.from_numpy(next_ids).to(job.device), cfg.temperature,
                        torch.from_numpy(context_ids).to(job.device), cfg.cosine_weight,
                        context)
    with phase("backward"):  # with ranks, gradients are all-reduced in here
        (loss * scale).backward()
    return float(loss.detach())


def optimizer_step(job: Job, loss: float) -> None:
    """Clip-free step that refuses a non-finite loss or gradient."""
    grads = [p.grad for p in job.model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
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
    order = np.random.default_rng([job.config.seed, epoch]).permutation(job.train_starts)
    n = len(order) // job.batch
    return [order[i * job.batch:(i + 1) * job.batch] for i in range(n)]


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


@dataclass
class RunState:
    """Where the run is: checkpointed as one object, so a resumed run continues exactly."""
    epoch: int = 0  # epochs completed
    position: int = 0  # optimizer steps done in the current epoch
    step: int = 0  # optimizer steps done in all
    best: float = -1.0  # the best held-out Hit@10 so far

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "RunState":
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        self.position += 1

    def end_interval(self, steps_per_epoch: int) -> int:
        """After an evaluation: the next epoch starts when this one is complete (not when
        the step budget cut it short). Returns the epoch just evaluated (1-based)."""
        evaluated = self.epoch + 1
        if self.position >= steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return evaluated

    def improved(self, hit10: float) -> bool:
        """Keep the best model; on a tie the later, longer-trained one."""
        if hit10 >= self.best:
            self.best = hit10
            return True
        return False


EVAL_CHUNK = 128  # held-out windows between two signs of progress to the watchdog


def held_out(job: Job, val: np.ndarray, dist, tick=lambda: None) -> dict:
    """The evaluation figures over the held-out windows, evaluated in chunks with a sign
    of progress after each (a long evaluation is work, not a stall). With ranks, each
    evaluates its slice and the sums (hits, reciprocal ranks) and counts are
    all-reduced, so the figures equal one process's and no rank waits at a barrier for
    the whole of it."""
    shards = np.array_split(val, dist.world)
    sharded = dist.active and min(len(s) for s in shards) > 0  # too few: each does all
    mine = shards[dist.rank] if sharded else val
    sums: dict = {}
    for chunk in np.array_split(mine, max(1, -(-len(mine) // EVAL_CHUNK))):
        part = evaluate.evaluate(job.module, job.ds, job.index, chunk, job.config.ctx_len,
                                 job.device, decay=evaluate.run_decay(job))
        for k, v in part.items():
            if isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        tick()
    keys = sorted(sums)
    totals = [sums[k] for k in keys] + [float(len(mine))]
    if sharded:
        totals = dist.sum(totals)
    return {k: s / totals[-1] for k, s in zip(keys, totals)}


def plan(job: Job, dist) -> tuple[int, int]:
    """Optimizer steps per epoch (the same on every rank, or one would wait in a
    collective) and in all."""
    cfg = job.config
    steps_per_epoch = dist.min_int(len(epoch_batches(job, 0)) // cfg.accum_steps)
    if steps_per_epoch == 0:
        raise data.DataError(f"{job.ds.root}: {len(job.train_starts)} training windows are "
                             f"fewer than one step ({job.batch} x {cfg.accum_steps})")
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def resume(job: Job, rec: Recorder) -> RunState:
    """The state (and weights, optimizer, RNG, learned budgets) of last.pt, or a fresh
    start."""
    rd, say = rec.rd, rec.say
    if not job.config.resume:
        rec.resumed(RunState(), None)
        return RunState()
    if not rd.last_checkpoint().exists():
        say("No checkpoint yet (the run ended before its first): starting from step 0")
        rec.resumed(RunState(), None)
        return RunState()
    saved = checkpoint.load(rd.last_checkpoint())
    job.module.load_state_dict(saved["model"])
    job.optimizer.load_state_dict(saved["optimizer"])
    checkpoint.restore_rng(saved)  # the CPU generator, and MPS's where it was saved
    if job.recall is not None:
        job.recall.restore(saved.get("miner"))
    if saved.get("bf16") is not None:  # the precision auto chose when the run started
        job.module.bf16 = bool(saved["bf16"])
    state = RunState.from_checkpoint(saved)
    say(f"Resumed from {rd.last_checkpoint()} at epoch {state.epoch + 1}, step {state.step}")
    rec.resumed(state, saved)
    return state


def fit(job: Job, state: RunState, rec: Recorder, watchdog, stop, dist) -> int:
    """The training loop; returns the exit code (0: finished or stopped)."""
    cfg, rd = job.config, rec.rd
    rec.recall = job.recall
    val = evaluate.subset(job.val_starts, cfg.eval_windows, cfg.seed)
    steps_per_epoch, rec.total = plan(job, dist)
    rec.say(f"Training {len(job.train_starts)} windows, {steps_per_epoch} steps/epoch, "
            f"{rec.total} steps; {len(val)} held-out windows")
    stopping = False
    while state.step < rec.total and state.epoch < cfg.epochs:
        # The epoch's batches are a function of (seed, epoch): a resumed run skips the
        # ones it has done and sees the rest exactly as it would have.
        batches = epoch_batches(job, state.epoch)
        feed = micro_batches(job, batches[state.position * cfg.accum_steps:])
        while state.position < steps_per_epoch and state.step < rec.total:
            # A stop request is honoured between steps, never inside one, on every rank.
            stop.announce()
            if stopping or (stop.requested and not dist.active):
                rec.checkpoint(rd.last_checkpoint(), job, state)
                watchdog.stop()  # what follows (the plot) is not training
                return rec.stopped(stop.requested)
            if dist.active:  # this rank reached the collectives of this step
                rec.beat(state, "sync")
            # Forward, mine, loss and backward per micro-batch; one optimizer step.
            phases: dict = {}
            loss = sum(train_step(job, next(feed), 1 / cfg.accum_steps, phases, watchdog)
                       for _ in range(cfg.accum_steps)) / cfg.accum_steps
            watchdog.phase = "optimizer"
            optimizer_step(job, loss)
            # The ranks agree on the mean loss, and on stopping at the same boundary.
            loss, stopping = dist.sync(loss, bool(stop.requested))
            state.advance()
            watchdog.step_done()
            rec.step_done(state, loss, phases)
            if dist.active and dist.main and state.step % cfg.log_every == 0:
                rec.stragglers(distributed.stragglers(dist.work_times()))
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                watchdog.phase = "checkpoint"
                rec.checkpoint(rd.last_checkpoint(), job, state)
        # End of an epoch (or of the step budget): every rank evaluates its slice of
        # the held-out windows; rank 0 records the figures and writes the checkpoints.
        watchdog.progress("evaluate")
        rec.beat(state, "evaluate")  # outside observers see the phase, not a silent step

        def alive():  # each chunk: progress to the watchdog, life to the supervisor
            watchdog.progress()
            rec.beat(state, "evaluate")

        metrics = held_out(job, val, dist, alive)
        epoch = state.end_interval(steps_per_epoch)
        watchdog.progress("checkpoint")
        rec.evaluated(epoch, metrics)
        if state.improved(metrics["hit@10"]):
            rec.checkpoint(rd.best_checkpoint(), job, state)
        rec.checkpoint(rd.epoch_checkpoint(state.epoch), job, state)
        rec.checkpoint(rd.last_checkpoint(), job, state)
        # The others wait for rank 0's checkpoints (seconds), not for an evaluation.
        watchdog.progress("barrier")
        dist.barrier()
        rec.epoch_end(state.epoch)
        watchdog.progress("train")
    watchdog.stop()  # what follows (calibration, the plot) is not training
    if rec.main:  # the decider's thresholds for best.pt, measured on held-out windows
        from lnsp.train.calibrate import after_training
        after_training(rd, job.ds, rec.say, tick=lambda: rec.beat(state, "calibrate"))
    return rec.finished()


def _check_run_dir(config: TrainConfig, rd: RunDir) -> TrainConfig:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        config = config.replace(resume=True)  # torchrun restarted the job: continue it
    elif os.environ.get("LNSP_AUTO_RESUME") == "1" and rd.config.exists():
        # A node of a multi-node job that came back (its container restarted): its
        # torchrun counts from 0 again, but the job it rejoins continues the run.
        config = config.replace(resume=True)
    if rd.config.exists() and not config.resume:
        raise RunDirError(f"{rd.root}: run directory already holds a run; "
                          "pass --resume to continue it or choose another --run-dir")
    if config.resume and not rd.config.exists():
        raise RunDirError(f"{rd.root}: no run to resume here")
    return config


def _restart_refused(rd: RunDir, rank: int) -> int | None:
    refused = restart_refused(rd)
    if refused is None:
        return None
    message, code = refused
    RunLog(rd.log if rank == 0 else None, prefix=f"[rank {rank}] ")(f"[RESTART] {message}")
    if rank == 0 and code == ExitCode.CRASH_LOOP:
        ended = rd.read_exit()
        rd.write_exit("failed", code, ended.step if ended else 0, cause=message)
    return code


def run(config: TrainConfig) -> int:
    """Train in the foreground (one rank of a torchrun job when started by torchrun);
    returns the process exit code (0 finished or stopped)."""
    from lnsp.guard import threads
    from lnsp.guard.dumps import Dumper
    from lnsp.diagnose.hangbundle import Explanation
    from lnsp.guard.watchdog import GracefulStop, Watchdog

    rd = RunDir(config.run_dir)
    config = _check_run_dir(config, rd)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        code = _restart_refused(rd, rank)  # torchrun restarts whatever the ending
        if code is not None:
            return code
    if config.batch_size % world:
        raise data.DataError(f"--batch-size {config.batch_size} must divide by the "
                             f"{world} ranks")
    log = RunLog(None, prefix=f"[rank {rank}] " if world > 1 else "")
    dumper = Dumper(rd.dumps, log, prefix=f"rank{rank}-" if world > 1 else "")
    stop = GracefulStop(log).install()
    rec = Recorder(rd, log, config, rank, world)
    dist = distributed.Dist(rank, world, rd.root)
    watchdog = Watchdog(config.startup_timeout, config.stall_timeout, config.on_stall, dumper,
                        log, on_exit=rec.stalled, describe=lambda: dist.laggards(),
                        on_tick=[stop.announce], slow_window=config.slow_window,
                        diagnose=lambda: Explanation(rd, os.getpid(), dumper.prefix, log).start())
    rec.watchdog = watchdog
    watchdog.start()

    # Data first: bad input leaves no run directory behind.
    watchdog.progress("load data")
    ds = data.load(config.data, config.ctx_len)
    resolve_device(config.device)
    # One trainer per run directory, before anything is written to it: rank 0 holds the
    # lock for the job (the ranks share the directory and must not refuse each other).
    lock = rd.lock_trainer() if rank == 0 else None
    if rank == 0 and lock is None:
        raise RunDirError(f"{rd.root}: a trainer is already running in this run directory "
                          f"(pid {rd.trainer_lock_holder() or '?'}); stop it first "
                          f"(lnsp stop {rd.root}) or choose another --run-dir")
    # Every rank has checked the run directory before any rank writes to it.
    watchdog.progress("rendezvous")
    dist = distributed.init(config.pg_timeout, rd.root, config.device)
    rd.root.mkdir(parents=True, exist_ok=True)
    log.file = open(rd.log, "a", buffering=1)
    dumper.enable_crash_dumps(log.file)
    rec.started(dist.ranks())
    try:
        n_threads = threads.enforce()
        rec.say(f"lnsp train: pid {os.getpid()}, {ds.bank.shape[0]} x {ds.dim} bank, "
                f"{len(ds.offsets) - 1} chains, threads {config.threads} ({n_threads} OpenMP)"
                + (f", {dist.world} ranks" if dist.active else ""))
        job = setup(config, ds, rec.say, watchdog, dist.rank, dist.world)
        code = fit(job, resume(job, rec), rec, watchdog, stop, dist)
    except RuntimeError as e:
        if not dist.active or isinstance(e, LnspError):
            rec.failed(e)
            raise
        error = distributed.post_mortem(e, dist, dumper, log)
        rec.failed(error)
        raise error from None
    except BaseException as e:
        rec.failed(e)
        raise
    finally:
        watchdog.stop()
    distributed.shutdown()
    return code
