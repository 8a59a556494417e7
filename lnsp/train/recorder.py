"""What a training run leaves behind as it goes: heartbeats after every step, the log
line and steps.jsonl record per interval, metrics.jsonl per evaluation, checkpoints,
the exit record and the plot. The rank checks live here: every rank beats its own
heartbeat; rank 0 alone logs the routine and writes what the ranks share."""

from __future__ import annotations

import os
import socket
import sys
import time

from lnsp import procs
from lnsp.train import checkpoint
from lnsp import progress
from lnsp.observe import tensorboard
from lnsp.rundir import ExitCode, RunDir, StepRecord
from lnsp.guard.watchdog import Heartbeat, process_started

# The goodput record's figures charted in TensorBoard (not its pid, step or time).
GOODPUT_FIGURES = ("goodput", "wall_s", "shares", "seconds")


def supervisor(run: dict, world: int) -> dict:
    """run.json's supervisor fields for this trainer: under torchrun, its agent (our
    parent); alone, the supervisor recorded there if it is our parent, else none (a
    run resumed in the foreground after a detached or container run must not keep that
    run's supervisor PID, which by now may name any process). None clears a field."""
    parent = os.getppid()
    if world > 1 or run.get("supervisor_pid") == parent:
        return {"supervisor_pid": parent, "supervisor_start": procs.start_time(parent)}
    return {"supervisor_pid": None, "supervisor_start": None}


class Recorder:
    def __init__(self, rd: RunDir, log, config, rank: int = 0, world: int = 1):
        self.rd, self.log, self.config = rd, log, config
        self.rank, self.world = rank, world
        self.main = rank == 0
        self.beats: list[Heartbeat] = []
        self.step = 0  # the last step done: what the exit record names
        self.loss = float("nan")
        self.samples_per_s = 0.0
        self.total = 0  # steps in the run: the last one always logs
        self.runtime = None  # the guard (lnsp.guard.runtime.Runtime) that protects the run
        self.watchdog = None  # its learned budgets, slowdown and goodput go into the records
        self.goodput_prior: dict = {}  # goodput.json of the earlier attempts
        self.recall = None  # the job's miner.RecallCheck: its latest measure goes in steps.jsonl
        self.steps_trained = 0  # optimizer steps this attempt ran (redone ones too)
        self._window_t, self._window_steps, self._phases = time.perf_counter(), 0, {}
        self.rate = progress.Rate()  # steps over the last 30 s: the ETA's speed
        self.eta_s: float | None = None
        self.tb = None  # TensorBoard writer (rank 0), opened at the first record
        self.bar = None  # progress bar on a terminal (rank 0)
        self.work_ms = 0.0  # this rank's own work per step (moving average): stragglers
        self._streak: dict[int, int] = {}

    def guard(self, runtime) -> None:
        """The run's guard: its watchdog's budgets, slowdown and goodput go into the
        records, its stop request into the exit record."""
        self.runtime, self.watchdog = runtime, runtime.watchdog

    def end_of_training(self) -> None:
        """What follows (calibration, the plot) is not training: the guard stands down."""
        if self.runtime is not None:
            self.runtime.close()

    def say(self, message: str) -> None:
        """The routine (steps, evaluations): logged by rank 0 alone."""
        if self.main:
            self.log(message)

    def started(self, ranks: list[dict]) -> None:
        """The run directory is ours: heartbeats, a fresh exit record, config and run.json."""
        if self.world > 1:
            self.beats.append(Heartbeat(self.rd.rank_heartbeat(self.rank), self.log,
                                        self.config.mem_margin_mb))
        if not self.main:
            return
        self.beats.append(Heartbeat(self.rd.heartbeat, self.log, self.config.mem_margin_mb))
        from lnsp.rundir import write_json

        write_json(self.rd.config, self.config.to_json())
        self.rd.clear_exit()
        extra = {"ranks": ranks if self.world > 1 else None,
                 **supervisor(self.rd.read_run(), self.world)}
        self.rd.update_run(pid=os.getpid(), backend=os.environ.get("LNSP_BACKEND", "foreground"),
                           host=socket.gethostname(), python=sys.executable, argv=sys.argv,
                           start_time=time.time(), stall_timeout=self.config.stall_timeout,
                           startup_timeout=self.config.startup_timeout, world_size=self.world,
                           attempts_from=self.rd.read_run().get("attempts_from", [])
                           + [self.rd.checkpoint_step() if self.config.resume else 0],
                           **extra)

    # ------------------------------------------------------------ every step
    def beat(self, state, phase: str) -> None:
        # work_ms: this rank's own work per step, which tells a straggler (distributed)
        extra = {**(self.watchdog.vitals() if self.watchdog else {}),
                 "work_ms": round(self.work_ms, 2)}
        for heartbeat in self.beats:
            heartbeat.beat(state.epoch + 1, state.step, phase, self.loss, self.samples_per_s,
                           {**(extra or {}), "total_steps": self.total, "eta_s": self.eta_s})

    def _writer(self, step: int):
        """TensorBoard's writer, opened once: a resumed run drops the events from `step`
        on that its earlier life wrote after the checkpoint it resumed from."""
        if self.tb is None:
            self.tb = tensorboard.open_writer(self.rd.tb, self.config.to_json(),
                                              purge_step=step if self.config.resume else None)
        return self.tb

    def step_done(self, state, loss: float, phases: dict) -> None:
        """After every optimizer step: the heartbeat (an outside observer's proof of
        life); per log interval, the log line and the steps.jsonl record."""
        self.step, self.loss = state.step, loss
        self.steps_trained += 1
        self._window_steps += 1
        # Not backward: with ranks it holds the gradient all-reduce, a wait.
        own = 1000 * sum(phases.get(k, 0.0) for k in ("load", "forward", "retrieve", "loss"))
        self.work_ms = own if not self.work_ms else 0.8 * self.work_ms + 0.2 * own
        for name, seconds in phases.items():
            self._phases[name] = self._phases.get(name, 0.0) + seconds
        rate = self._window_steps / max(time.perf_counter() - self._window_t, 1e-9)
        self.samples_per_s = rate * self.config.batch_size * self.config.accum_steps
        self.rate.add(state.step, time.monotonic())
        eta = self.rate.eta(self.total - state.step)
        self.eta_s = None if eta is None else round(eta, 1)
        self.beat(state, "train")
        if self.main:  # a bar only where a person watches a terminal; logs keep their lines
            if self.bar is None:
                self.bar = progress.Progress(self.total, "train", unit="step", lines=False,
                                             initial=state.step - 1)
            self.bar.update(1, f"epoch {state.epoch + 1}/{self.config.epochs} loss {loss:.4f}")
        if state.step % self.config.log_every and state.step != self.total:
            return
        self.say(f"Epoch {state.epoch + 1}/{self.config.epochs} | Step {state.step} | "
                 f"Loss {loss:.4f} | {rate:.2f} it/s")
        if self.main:
            rss = self.beats[-1].rss_mb() if self.beats else 0.0
            record = StepRecord(
                step=state.step, epoch=state.epoch + 1, loss=loss,
                samples_per_s=self.samples_per_s,
                phases={k: v / self._window_steps for k, v in self._phases.items()},
                rss_mb=round(rss, 1), time=time.time(),
                extra={"miner": self.recall.last} if self.recall and self.recall.last else {})
            self.rd.append_step(record)
            self._writer(state.step).step(record)
            goodput = self.write_goodput()
            if goodput:
                self._writer(state.step).summary(
                    "goodput", {k: goodput[k] for k in GOODPUT_FIGURES if k in goodput},
                    state.step)
        self._window_t, self._window_steps, self._phases = time.perf_counter(), 0, {}

    def stragglers(self, slow: dict[int, str]) -> None:
        """Rank 0, per log interval: a rank found slow at STRAGGLER_CHECKS checks in a
        row is logged once per streak (a busy host makes one check noisy)."""
        from lnsp.train.distributed import STRAGGLER_CHECKS

        for rank in range(self.world):
            self._streak[rank] = self._streak.get(rank, 0) + 1 if rank in slow else 0
            if self._streak[rank] == STRAGGLER_CHECKS:
                self.log(f"[STRAGGLER] {slow[rank]}")

    # ------------------------------------------------------------ epochs
    def evaluated(self, epoch: int, metrics: dict) -> None:
        if not self.main:
            return
        record = {"epoch": epoch, "step": self.step, "loss": self.loss, **metrics}
        self.rd.append_metrics(record)
        self._writer(self.step).metrics(record)
        self.log(f"Eval epoch {epoch}: Hit@1 {metrics['hit@1']:.3f} "
                 f"Hit@5 {metrics['hit@5']:.3f} Hit@10 {metrics['hit@10']:.3f} "
                 f"MRR {metrics['mrr']:.3f} | copy-last Hit@10 "
                 f"{metrics['baseline_hit@10']:.3f} MRR {metrics['baseline_mrr']:.3f} "
                 f"| blend({metrics['blend_decay']:g}) Hit@10 {metrics['blend_hit@10']:.3f} "
                 f"MRR {metrics['blend_mrr']:.3f}")

    def checkpoint(self, path, job, state) -> None:
        """Rank 0 alone writes checkpoints (the ranks' weights are the same). The learned
        budgets go with them: a resumed run is guarded at once."""
        if not self.main:
            return
        budgets = self.watchdog.budgets.state() if self.watchdog else {}
        miner_state = job.recall.state() if job.recall is not None else {}
        checkpoint.save(path, job.module, job.optimizer, job.config, budgets=budgets,
                        miner=miner_state, bf16=bool(job.module.bf16), **state.as_dict())
        if path == self.rd.last_checkpoint():
            self.rd.write_checkpoint_record(state.step, state.epoch)
        self.beat(state, "checkpoint")  # a large model's write takes a while: still alive

    # ------------------------------------------------------------ goodput
    def resumed(self, state, saved: dict | None) -> None:
        """A new attempt: budgets from the checkpoint, the goodput of the earlier
        attempts, and the steps that this one must redo charged as such."""
        if self.watchdog is None:
            return
        if saved:
            self.watchdog.budgets.restore(saved.get("budgets"))
        prior = self.rd.read_goodput() if self.config.resume else {}
        self.goodput_prior = prior
        if not prior:
            return
        g = self.watchdog.goodput
        g.restore(prior.get("seconds"))
        redo = max(0, int(prior.get("step", 0)) - state.step)
        trained = max(1, int(prior.get("steps_trained", 0)))
        if redo:
            g.move("training", "redone", redo * prior["seconds"].get("training", 0.0) / trained)
            self.log(f"[GOODPUT] {redo} steps since the last checkpoint are redone")

    def write_goodput(self) -> dict | None:
        """goodput.json: cumulative over the attempts (never parsed from the log); the
        record written, or None (no watchdog, or not rank 0)."""
        if not self.main or self.watchdog is None:
            return None
        self.watchdog.account()
        g = self.watchdog.goodput
        attempt_wall = sum(g.seconds.values()) - sum(
            (self.goodput_prior.get("seconds") or {}).values())
        record = {
            **g.summary(), "pid": os.getpid(), "step": self.step,
            "steps_trained": int(self.goodput_prior.get("steps_trained", 0))
            + self.steps_trained,
            "attempts": int(self.goodput_prior.get("attempts", 0)) + 1,
            "attempt_wall_s": round(attempt_wall, 3), "time": time.time(),
            # when the first attempt's process started: the span the shares cover
            "since": self.goodput_prior.get("since") or process_started()}
        self.rd.write_goodput(record)
        return record

    def log_goodput(self) -> None:
        if not self.main or self.watchdog is None:
            return
        self.write_goodput()
        s = self.watchdog.goodput.summary()
        self.log(f"[GOODPUT] {s['goodput']:.1%} of {s['wall_s']:.1f}s wall time trained; "
                 + ", ".join(f"{c} {v:.1%}" for c, v in s["shares"].items() if v))

    def epoch_end(self, epoch: int) -> None:
        for heartbeat in self.beats:
            heartbeat.epoch_end(epoch)

    # ------------------------------------------------------------ endings
    def finished(self) -> int:
        if self.main:
            self.rd.write_exit("finished", ExitCode.DONE, self.step)
        self.close()
        self.say(f"Finished: {self.step} steps; run directory {self.rd.root}")
        self.log_goodput()
        self.plot()
        return ExitCode.DONE

    def stopped(self) -> int:
        signal_name = self.runtime.stop_requested if self.runtime is not None else None
        self.end_of_training()
        if self.main:
            self.rd.write_exit("stopped", ExitCode.DONE, self.step, signal=signal_name or "peer")
        self.close()
        self.say(f"Stopped on {signal_name or 'a peer rank'} at step {self.step}; checkpoint "
                 f"{self.rd.last_checkpoint()} (continue with --resume)")
        self.log_goodput()
        self.plot()
        return ExitCode.DONE

    def stalled(self, phase: str, verdict: dict | None = None) -> None:
        """The watchdog's exit (from its thread, just before os._exit); the cause is the
        diagnosis when there is one."""
        if self.main:
            self.rd.write_exit("stalled", ExitCode.STALLED, self.step,
                               **self.watchdog.stall_exit(phase, verdict))
            self.write_goodput()

    def failed(self, error: BaseException) -> None:
        code = int(getattr(error, "exit_code", ExitCode.INTERNAL))
        lost = getattr(error, "lost", ())
        # rank 0 records the end; when rank 0 is the one lost, the first survivor does
        writer = self.main or (0 in lost and self.rank == min(set(range(self.world)) - set(lost)))
        if writer:
            # a lost node is a failure (code 3: the job can be restarted), not a stall
            state = "stalled" if code == ExitCode.STALLED and not lost else "failed"
            self.rd.write_exit(state, code,
                               self.step, cause=f"{type(error).__name__}: {error}",
                               error=f"{type(error).__name__}: {error}")
        self.close()
        self.log(f"FAILED: {type(error).__name__}: {error}")
        if self.watchdog is not None and self.main and self.rd.root.exists():
            self.write_goodput()

    def close(self) -> None:
        """End the bar and flush the event files (every way out but a stall's os._exit,
        before which the writer's own flush every few seconds has run)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

    def plot(self) -> None:
        """plots.png when matplotlib is installed (an optional extra); never fails a run."""
        if not self.main:
            return
        try:
            from lnsp.observe import plot

            plot.draw(self.rd)
        except ImportError:
            pass
        except Exception as e:
            self.log(f"plot not drawn: {e}")
