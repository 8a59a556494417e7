"""The training loop: the run's state, `fit` (epochs of `Trainer.step`, evaluation,
checkpoints) and `run` (the process: the guard, the run directory, the ranks).

The loop runs on the guard's public API, as a user's script does (lnsp.guard: phases,
should_stop; its optimizer hook counts the steps). Everything about a run lands in its
run directory through the recorder; the loop checks for a stop request at every step
boundary and leaves exit.json on every way out.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

import lnsp.guard as guard
from lnsp.config import TrainConfig
from lnsp.data import dataset as data
from lnsp.errors import LnspError, RunDirError, TrainingError
from lnsp.guard.phases import Phase
from lnsp.guard.restarts import restart_refused
from lnsp.model.tower import resolve_device
from lnsp.rundir import ExitCode, RunDir, RunLog
from lnsp.train import checkpoint, distributed, evaluate
from lnsp.train.recorder import Recorder
from lnsp.train.trainer import Trainer

__all__ = ["RunState", "TrainingError", "fit", "run"]


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


def held_out(job: Trainer, val: np.ndarray, dist, tick=lambda: None) -> dict:
    """The evaluation figures over the held-out windows, evaluated in chunks, each an
    evaluate phase of the guard (a long evaluation is work, not a stall). With ranks, each
    evaluates its slice and the sums (hits, reciprocal ranks) and counts are
    all-reduced, so the figures equal one process's and no rank waits at a barrier for
    the whole of it."""
    shards = np.array_split(val, dist.world)
    sharded = dist.active and min(len(s) for s in shards) > 0  # too few: each does all
    mine = shards[dist.rank] if sharded else val
    sums: dict = {}
    for chunk in np.array_split(mine, max(1, -(-len(mine) // EVAL_CHUNK))):
        with guard.phase(Phase.EVALUATE):
            part = evaluate.evaluate(job.module, job.ds, job.index, chunk,
                                     job.config.ctx_len, job.device,
                                     decay=evaluate.run_decay(job))
        for k, v in part.items():
            if isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        tick()
    keys = sorted(sums)
    totals = [sums[k] for k in keys] + [float(len(mine))]
    if sharded:
        totals = dist.sum(totals)
    return {k: s / totals[-1] for k, s in zip(keys, totals)}


def plan(job: Trainer, dist) -> tuple[int, int]:
    """Optimizer steps per epoch (the same on every rank, or one would wait in a
    collective) and in all."""
    cfg = job.config
    steps_per_epoch = dist.min_int(len(job.epoch_batches(0)) // cfg.accum_steps)
    if steps_per_epoch == 0:
        raise data.DataError(f"{job.ds.root}: {len(job.train_starts)} training windows are "
                             f"fewer than one step ({job.batch} x {cfg.accum_steps})")
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def resume(job: Trainer, rec: Recorder) -> RunState:
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


def fit(job: Trainer, state: RunState, rec: Recorder, dist) -> int:
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
        # ones it has done and sees the rest exactly as it would have. The epoch's start
        # (its DataLoader workers starting up) is a phase of its own; from its first step
        # on, the guard's optimizer hook marks each step's end.
        with guard.phase(Phase.TRAIN):
            batches = job.epoch_batches(state.epoch)
            feed = job.micro_batches(batches[state.position * cfg.accum_steps:])
            while state.position < steps_per_epoch and state.step < rec.total:
                # A stop request is honoured between steps, never inside one, on every rank.
                if stopping or (guard.should_stop() and not dist.active):
                    rec.checkpoint(rd.last_checkpoint(), job, state)
                    return rec.stopped()
                if dist.active:  # this rank reached the collectives of this step
                    rec.beat(state, Phase.SYNC)
                # Forward, mine, loss and backward per micro-batch; one optimizer step.
                phases: dict = {}
                loss = job.step([next(feed) for _ in range(cfg.accum_steps)], phases)
                # The ranks agree on the mean loss, and on stopping at the same boundary.
                loss, stopping = dist.sync(loss, guard.should_stop())
                state.advance()
                rec.step_done(state, loss, phases)
                if dist.active and dist.main and state.step % cfg.log_every == 0:
                    rec.stragglers(distributed.stragglers(dist.work_times()))
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    with guard.phase(Phase.CHECKPOINT):
                        rec.checkpoint(rd.last_checkpoint(), job, state)
        # End of an epoch (or of the step budget): every rank evaluates its slice of
        # the held-out windows; rank 0 records the figures and writes the checkpoints.
        rec.beat(state, Phase.EVALUATE)  # outside observers see the phase, not a silent step
        with guard.phase(Phase.EVALUATE):
            metrics = held_out(job, val, dist, lambda: rec.beat(state, Phase.EVALUATE))
        epoch = state.end_interval(steps_per_epoch)
        with guard.phase(Phase.CHECKPOINT):
            rec.evaluated(epoch, metrics)
            if state.improved(metrics["hit@10"]):
                rec.checkpoint(rd.best_checkpoint(), job, state)
            rec.checkpoint(rd.epoch_checkpoint(state.epoch), job, state)
            rec.checkpoint(rd.last_checkpoint(), job, state)
        # The others wait for rank 0's checkpoints (seconds), not for an evaluation.
        with guard.phase(Phase.BARRIER):
            dist.barrier()
        rec.epoch_end(state.epoch)
    rec.end_of_training()  # what follows (calibration, the plot) is not training
    if rec.main:  # the decider's thresholds for best.pt, measured on held-out windows
        from lnsp.train.calibrate import after_training
        after_training(rd, job.ds, rec.say, tick=lambda: rec.beat(state, Phase.CALIBRATE))
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
    from lnsp.diagnose.hangbundle import Explanation
    from lnsp.guard import threads
    from lnsp.guard.runtime import Runtime

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
    rec = Recorder(rd, log, config, rank, world)
    dist = distributed.Dist(rank, world, rd.root)
    # The guard, as a user's script gets it from `lnsp run`, but the records are the
    # recorder's, and the diagnosis runs in this process (py-spy is in this interpreter).
    rt = Runtime(config.guard_settings(), log=log, records=False,
                 diagnose=lambda: Explanation(rd, os.getpid(), rt.dumper.prefix, log).start(),
                 describe=lambda: dist.laggards(), on_exit=rec.stalled)
    rec.guard(rt.install())
    try:
        # Data first: bad input leaves no run directory behind.
        with guard.phase(Phase.LOAD_DATA):
            ds = data.load(config.data, config.ctx_len)
            resolve_device(config.device)
        # One trainer per run directory, before anything is written to it: rank 0 holds
        # the lock for the job (the ranks share the directory and must not refuse each
        # other).
        lock = rd.lock_trainer() if rank == 0 else None
        if rank == 0 and lock is None:
            raise RunDirError(f"{rd.root}: a trainer is already running in this run "
                              f"directory (pid {rd.trainer_lock_holder() or '?'}); stop it "
                              f"first (lnsp stop {rd.root}) or choose another --run-dir")
        # Every rank has checked the run directory before any rank writes to it.
        with guard.phase(Phase.RENDEZVOUS):
            dist = distributed.init(config.pg_timeout, rd.root, config.device)
    except BaseException:
        rt.close()
        raise
    rd.root.mkdir(parents=True, exist_ok=True)
    log.file = open(rd.log, "a", buffering=1)
    rt.dumper.enable_crash_dumps(log.file)
    rec.started(dist.ranks())
    try:
        n_threads = threads.enforce()
        rec.say(f"lnsp train: pid {os.getpid()}, {ds.bank.shape[0]} x {ds.dim} bank, "
                f"{len(ds.offsets) - 1} chains, threads {config.threads} ({n_threads} OpenMP)"
                + (f", {dist.world} ranks" if dist.active else ""))
        job = Trainer.build(config, ds, rec.say, dist.rank, dist.world)
        code = fit(job, resume(job, rec), rec, dist)
    except RuntimeError as e:
        if not dist.active or isinstance(e, LnspError):
            rec.failed(e)
            raise
        error = distributed.post_mortem(e, dist, rt.dumper, log)
        rec.failed(error)
        raise error from None
    except BaseException as e:
        rec.failed(e)
        raise
    finally:
        rt.close()
    distributed.shutdown()
    return code
