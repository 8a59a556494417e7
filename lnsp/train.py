"""The trainer: set-up, one training step (shared with the probe) and the loop.

Everything about a run lands in its run directory; the loop checks for a stop
request at every step boundary and leaves exit.json on every way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from lnsp import checkpoint, data, evaluate, miner
from lnsp.config import TrainConfig
from lnsp.dumps import Dumper, native_stacks
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
    train_starts: np.ndarray  # this rank's share of the training windows
    val_starts: np.ndarray
    batch: int  # this rank's micro-batch: batch_size / world size

    @property
    def module(self) -> QueryTower:
        """The bare model (DistributedDataParallel wraps it when there are ranks)."""
        return getattr(self.model, "module", self.model)


def setup(config: TrainConfig, ds: data.Dataset, log, watchdog=None, rank: int = 0,
          world: int = 1) -> Job:
    """Index, model and optimizer for a loaded data set (for one rank of `world`)."""
    from lnsp import distributed

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
                        config.seed, prebuilt=ds.index)
    log(f"Index {type(index).__name__}: {index.ntotal} vectors of dimension {index.d} "
        f"in {time.perf_counter() - t:.1f}s")
    model = QueryTower(ds.dim, config.hidden).to(device)
    if world > 1:  # gradients are all-reduced inside backward
        model = torch.nn.parallel.DistributedDataParallel(
            model, **distributed.ddp_arguments(str(device)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    train_starts, val_starts = data.windows(ds, config.ctx_len, config.val_fraction, config.seed,
                                            rank, world)
    return Job(config, ds, index, model, optimizer, device, train_starts, val_starts,
               config.batch_size // world)


def vectors(ds: data.Dataset, ids: np.ndarray, device) -> torch.Tensor:
    """Bank rows for an id array of any shape (gathered from the memory map)."""
    rows = np.asarray(ds.bank[ids.reshape(-1)], dtype=np.float32)
    return torch.from_numpy(rows.reshape(*ids.shape, -1)).to(device)


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
        _, candidates = miner.search(job.index, query.detach().float().cpu().numpy(), cfg.k + 1)
        ok = (candidates != next_ids[:, None]) & (candidates != -1)
        mined = vectors(job.ds, np.where(ok, candidates, 0), job.device)
    with phase("loss"):
        loss = info_nce(query, positive, mined, torch.from_numpy(ok).to(job.device),
                        torch.from_numpy(next_ids).to(job.device), cfg.temperature)
    with phase("backward"):  # with ranks, gradients are all-reduced in here
        (loss * scale).backward()
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


def run(config: TrainConfig) -> int:
    """Train in the foreground (one rank of a torchrun job when started by torchrun);
    returns the process exit code (0 finished or stopped)."""
    from lnsp import distributed

    rd = RunDir(config.run_dir)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        config = config.replace(resume=True)  # torchrun restarted the job: continue it
    elif os.environ.get("LNSP_AUTO_RESUME") == "1" and rd.config.exists():
        # A node of a multi-node job that came back (its container restarted): its
        # torchrun counts from 0 again, but the job it rejoins continues the run.
        config = config.replace(resume=True)
    if rd.config.exists() and not config.resume:
        raise data.DataError(f"{rd.root}: run directory already holds a run; "
                             "pass --resume to continue it or choose another --run-dir")
    if config.resume and not rd.config.exists():
        raise data.DataError(f"{rd.root}: no run to resume here")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world:
        raise data.DataError(f"--batch-size {config.batch_size} must divide by the "
                             f"{world} ranks")
    log = RunLog(None, prefix=f"[rank {rank}] " if world > 1 else "")
    dumper = Dumper(rd.dumps, log, prefix=f"rank{rank}-" if world > 1 else "")
    stop = GracefulStop(log).install()
    ending = {"step": 0, "dist": distributed.Dist(rank, world, rd.root)}

    def on_stall(phase):
        if rank == 0:
            _write_exit(rd, "stalled", 3, ending["step"])

    watchdog = Watchdog(config.startup_timeout, config.stall_timeout, config.on_stall, dumper,
                        log, on_exit=on_stall, describe=lambda: ending["dist"].laggards())
    watchdog.start()

    # Data first: bad input leaves no run directory behind.
    watchdog.progress("load data")
    ds = data.load(config.data, config.ctx_len)
    resolve_device(config.device)
    # Every rank has checked the run directory before any rank writes to it.
    watchdog.progress("rendezvous")
    dist = ending["dist"] = distributed.init(config.pg_timeout, rd.root, config.device)
    rd.root.mkdir(parents=True, exist_ok=True)
    log.file = open(rd.log, "a", buffering=1)
    dumper.enable_crash_dumps(log.file)
    ranks = dist.ranks()
    if dist.main:
        write_json(rd.config, config.to_json())
        rd.exit.unlink(missing_ok=True)
        extra = {"ranks": ranks, "supervisor_pid": os.getppid()} if dist.active else {}
        update_json(rd.run, pid=os.getpid(), backend=os.environ.get("LNSP_BACKEND", "foreground"),
                    host=socket.gethostname(), python=sys.executable, argv=sys.argv,
                    start_time=time.time(), stall_timeout=config.stall_timeout,
                    startup_timeout=config.startup_timeout, world_size=dist.world, **extra)
    try:
        code = _loop(config, rd, ds, log, watchdog, stop, ending, dist)
    except RuntimeError as e:
        if not dist.active or isinstance(e, TrainingError):
            _fail(rd, log, ending, dist, e, 1)
            raise
        error = distributed.classify(e, dist)
        log(f"[DISTRIBUTED] {error}")
        dumper.dump("collective")
        for pid in dist.stalled_pids():  # the stalled rank cannot dump itself
            stacks = native_stacks(pid, timeout=10)
            if stacks:
                dumper.write(f"stalled-pid{pid}", f"py-spy of stalled rank pid {pid}:\n{stacks}")
            if error.exit_code == 3 and not error.lost:  # frozen: nothing else ends it
                log(f"[DISTRIBUTED] killing stalled rank pid {pid} (SIGKILL)")
                os.kill(pid, signal.SIGKILL)
        _fail(rd, log, ending, dist, error, error.exit_code)
        raise error from None
    except BaseException as e:
        _fail(rd, log, ending, dist, e, 1)
        raise
    finally:
        watchdog.stop()
    distributed.shutdown()
    return code


def _fail(rd: RunDir, log, ending, dist, error: BaseException, code: int) -> None:
    state = "stalled" if code == 3 else "failed"
    lost = getattr(error, "lost", ())
    if lost:  # a node is gone, not frozen: the job failed (exit 3, it can be restarted)
        state = "failed"
    # rank 0 records the end; when rank 0 is the one lost, the first survivor does
    if dist.main or (0 in lost and dist.rank == min(set(range(dist.world)) - set(lost))):
        _write_exit(rd, state, code, ending["step"], error=f"{type(error).__name__}: {error}")
    log(f"FAILED: {type(error).__name__}: {error}")


def _write_exit(rd: RunDir, state: str, code: int, step: int, **extra) -> None:
    write_json(rd.exit, {"state": state, "exit_code": code, "step": step,
                         "time": time.time(), **extra})


def _loop(config: TrainConfig, rd: RunDir, ds, log, watchdog, stop, ending, dist) -> int:
    from lnsp import distributed, threads

    say = log if dist.main else (lambda message: None)  # rank 0 alone logs the routine
    n_threads = threads.enforce()
    say(f"lnsp train: pid {os.getpid()}, {ds.bank.shape[0]} x {ds.dim} bank, "
        f"{len(ds.offsets) - 1} chains, threads {config.threads} ({n_threads} OpenMP)"
        + (f", {dist.world} ranks" if dist.active else ""))
    job = setup(config, ds, say, watchdog, dist.rank, dist.world)
    beats = [Heartbeat(dist.heartbeat_path(rd.root), log, config.mem_margin_mb)] \
        if dist.active else []
    if dist.main:
        beats.append(Heartbeat(rd.heartbeat, log, config.mem_margin_mb))
    val = evaluate.subset(job.val_starts, config.eval_windows, config.seed)
    # Every rank must take the same number of steps, or one waits in a collective.
    steps_per_epoch = dist.min_int(len(epoch_batches(job, 0)) // config.accum_steps)
    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    if steps_per_epoch == 0:
        raise data.DataError(f"{ds.root}: {len(job.train_starts)} training windows are fewer "
                             f"than one step ({job.batch} x {config.accum_steps})")
    epoch, position, step, best = 0, 0, 0, -1.0
    if config.resume and not rd.last_checkpoint().exists():
        say("No checkpoint yet (the run ended before its first): starting from step 0")
    elif config.resume:
        state = checkpoint.load(rd.last_checkpoint())
        job.module.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        epoch, position, step, best = (state["epoch"], state["position"], state["step"],
                                       state["best"])
        say(f"Resumed from {rd.last_checkpoint()} at epoch {epoch + 1}, step {step}")
    say(f"Training {len(job.train_starts)} windows, {steps_per_epoch} steps/epoch, "
        f"{total} steps; {len(val)} held-out windows")

    def save(path, epoch, position):  # rank 0 alone writes checkpoints
        if dist.main:
            checkpoint.save(path, job.module, job.optimizer, config, epoch=epoch,
                            position=position, step=step, best=best)

    def beat(phase):
        for heartbeat in beats:
            heartbeat.beat(epoch + 1, step, phase, loss, rate * config.batch_size
                           * config.accum_steps, work_ms=round(work_ms, 2))

    work_ms = 0.0  # this rank's own work per step (moving average), for straggler reports
    streak: dict[int, int] = {}

    loss, rate, stopping = float("nan"), 0.0, False
    window_t, window_steps = time.perf_counter(), 0
    while step < total and epoch < config.epochs:
        batches = epoch_batches(job, epoch)
        feed = micro_batches(job, batches[position * config.accum_steps:])
        while position < steps_per_epoch and step < total:
            # A stop request is honoured between steps, never inside one, on every rank.
            if stopping or (stop.requested and not dist.active):
                save(rd.last_checkpoint(), epoch, position)
                if dist.main:
                    _write_exit(rd, "stopped", 0, step, signal=stop.requested or "peer")
                say(f"Stopped on {stop.requested or 'a peer rank'} at step {step}; checkpoint "
                    f"{rd.last_checkpoint()} (continue with --resume)")
                if dist.main:
                    _plot(rd, log)
                return 0
            if dist.active:  # this rank reached the collectives of this step
                beat("sync")
            # Accumulate gradients over micro-batches, then one optimizer step.
            phases = {}
            loss = sum(train_step(job, next(feed), 1 / config.accum_steps, phases,
                                  watchdog=watchdog)
                       for _ in range(config.accum_steps)) / config.accum_steps
            # Not backward: with ranks it holds the gradient all-reduce, a wait.
            own = 1000 * sum(phases.get(k, 0.0) for k in ("load", "forward", "retrieve", "loss"))
            work_ms = own if step == 0 or not work_ms else 0.8 * work_ms + 0.2 * own
            watchdog.phase = "optimizer"
            optimizer_step(job, loss)
            loss, stopping = dist.sync(loss, bool(stop.requested))
            step, position, window_steps = step + 1, position + 1, window_steps + 1
            ending["step"] = step
            watchdog.first_step_done()
            # Heartbeat after every step: an outside observer's proof of life.
            rate = window_steps / max(time.perf_counter() - window_t, 1e-9)
            beat("train")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                watchdog.phase = "checkpoint"
                save(rd.last_checkpoint(), epoch, position)
            if step % config.log_every == 0 and dist.active and dist.main:
                slow = distributed.stragglers(dist.beats())
                for r in range(dist.world):  # consecutive checks that found rank r slow
                    streak[r] = streak.get(r, 0) + 1 if r in slow else 0
                    if streak[r] == distributed.STRAGGLER_CHECKS:
                        log(f"[STRAGGLER] {slow[r]}")
            if step % config.log_every == 0 or step == total:
                say(f"Epoch {epoch + 1}/{config.epochs} | Step {step} | Loss {loss:.4f} "
                    f"| {rate:.2f} it/s")
                window_t, window_steps = time.perf_counter(), 0
        # End of epoch (or of the step budget): rank 0 evaluates, checkpoints, keeps
        # the best; the others wait at the barrier.
        watchdog.progress("evaluate")
        done_epoch = position >= steps_per_epoch
        next_epoch, next_position = (epoch + 1, 0) if done_epoch else (epoch, position)
        if dist.main:
            metrics = {"epoch": epoch + 1, "step": step, "loss": loss,
                       **evaluate.evaluate(job.module, ds, job.index, val, config.ctx_len,
                                           job.device)}
            with open(rd.metrics, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            say(f"Eval epoch {epoch + 1}: Hit@1 {metrics['hit@1']:.3f} "
                f"Hit@5 {metrics['hit@5']:.3f} Hit@10 {metrics['hit@10']:.3f} "
                f"MRR {metrics['mrr']:.3f} | copy-last Hit@10 "
                f"{metrics['baseline_hit@10']:.3f} MRR {metrics['baseline_mrr']:.3f}")
            watchdog.progress("checkpoint")
            if metrics["hit@10"] >= best:  # on a tie the later, longer-trained model
                best = metrics["hit@10"]
                save(rd.checkpoints / "best.pt", next_epoch, next_position)
            save(rd.checkpoints / f"epoch_{next_epoch:03d}.pt", next_epoch, next_position)
            save(rd.last_checkpoint(), next_epoch, next_position)
        epoch, position = next_epoch, next_position
        watchdog.progress("barrier")
        dist.barrier()
        for heartbeat in beats:
            heartbeat.epoch_end(epoch)
        watchdog.progress("train")
    if dist.main:
        _write_exit(rd, "finished", 0, step)
    say(f"Finished: {step} steps; run directory {rd.root}")
    if dist.main:
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
