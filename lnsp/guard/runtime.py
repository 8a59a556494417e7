"""The guard inside a guarded process: stack dumps on SIGUSR1 (faulthandler through a
pipe), the watchdog thread, the heartbeat, graceful stop, and a global optimizer hook
that counts every optimizer step of the process, with no change to the script.

Standard library only (psutil, numpy and torch are not imported here): it runs in the
user's own interpreter. The hook is registered the moment the script's import of
`torch.optim.optimizer` completes (a meta-path finder), never by importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from lnsp.guard.phases import Phase

ENV_SETTINGS = "LNSP_GUARD"  # JSON: run_dir, timeouts, on_stall, slow_window, log_every
ENV_ATTEMPT = "LNSP_ATTEMPT"  # 0 on the first start, n after n restarts
ENV_PYTHON = "LNSP_PYTHON"  # lnsp's own interpreter: the diagnosis runs there, not here
OPTIMIZER_MODULE = "torch.optim.optimizer"
# heartbeat.json is written by the watchdog's thread, at its tick (0.25 s), when a step
# or the phase changed, and always at the end: a step costs the script a counter, not a
# file (a phase the script names is written at once when none was for BEAT_S).
BEAT_S = 0.25
BUSY_CPU = 0.1  # cores used over the last BUSY_WINDOW_S that make a process busy, not stuck
BUSY_WINDOW_S = 2.0
LINE_S = 60.0  # a [GUARD] progress line at most this often (the script prints its own)

current: "Runtime | None" = None  # the installed runtime; lnsp.guard's calls go to it


class Log:
    """Guard lines on the process's stderr (fd 2, whatever sys.stderr has become):
    `lnsp run` reads them with the script's own output, timestamps them and writes
    them to training.log. Never called from a signal handler."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            try:
                os.write(2, f"{self.prefix}{message}\n".encode(errors="replace"))
            except OSError:
                pass

    def raw(self, text: str) -> None:
        """A dump's body: it is in its own file under dumps/; the log names the file."""


class Runtime:
    """The guard of one process. For a user's script (`lnsp run`) it also writes the
    run's records (heartbeat, steps.jsonl, goodput, exit.json). lnsp's own trainer
    installs it with `records=False`: its Recorder writes richer ones (epochs, phases,
    evaluations), and it names its own diagnosis, stall exit and stragglers."""

    def __init__(self, settings: dict, log=None, records: bool = True, diagnose=None,
                 describe=None, on_exit=None, label: str = ""):
        from lnsp.rundir import RunDir

        self.settings = settings
        self.rd = RunDir(settings["run_dir"])
        # A rank of a torchrun job: its own heartbeat and exit record, lines prefixed;
        # rank 0 also writes the run's heartbeat and records.
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = self.rank == 0
        self.log = log or Log(f"[rank {self.rank}] " if self.world > 1 else "")
        self.records = records
        self._diagnose_with, self._describe, self._on_exit = diagnose, describe, on_exit
        self.label = label
        self._shown = Phase.STARTUP  # the phase the last heartbeat showed
        self.step = 0  # optimizer steps (or guard.step() calls) of this process
        self.hooked = False  # an optimizer hook counted a step: guard.step() only adds figures
        self.loss: float | None = None
        self.scalars: dict = {}
        self.stop = None  # lnsp.guard.watchdog.GracefulStop, installed with the rest
        self.log_every = int(settings.get("log_every", 20))
        self._last_beat = 0.0
        self._window: tuple[float, int] | None = None  # the step rate's: start, steps
        self._last_line = 0.0  # the last [GUARD] line: one a minute at most
        self.steps_per_s = 0.0
        self._cpu = [(time.monotonic(), time.process_time())]  # samples for busy()
        self.watchdog = None
        self.dumper = None
        self._beat_lock = threading.Lock()
        self._beaten = 0  # the step of the last heartbeat written
        self._step_time = 0.0  # when the last step was done (Unix seconds)

    # ------------------------------------------------------------ install
    def install(self) -> "Runtime":
        """Everything before the script's first line."""
        import faulthandler

        from lnsp.guard.dumps import Dumper
        from lnsp.guard.watchdog import GracefulStop, Heartbeat, Watchdog

        global current
        s = self.settings
        self.dumper = Dumper(self.rd.dumps, self.log,
                             prefix=f"rank{self.rank}-" if self.world > 1 else "")
        self.beats = []
        if self.records:  # the run directory exists: `lnsp run` made it
            self.rd.dumps.mkdir(parents=True, exist_ok=True)
            # Native crashes (segfault, abort) leave every thread's stack in the log.
            faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=True)
            margin = float(s.get("mem_margin_mb", 512))
            if self.world > 1:
                self.beats.append(Heartbeat(self.rd.rank_heartbeat(self.rank), self.log,
                                            margin))
            if self.main:
                self.beats.append(Heartbeat(self.rd.heartbeat, self.log, margin))
            self.heartbeat = self.beats[-1]
        describe = self._describe or (self._ranks if self.world > 1 else None)
        self.watchdog = Watchdog(
            float(s["startup_timeout"]), float(s["stall_timeout"]), s.get("on_stall", "exit"),
            self.dumper, self.log, on_exit=self._on_exit or self._stalled,
            on_tick=[self._tick], slow_window=float(s.get("slow_window", 0)),
            diagnose=self._diagnose_with or self._diagnose,
            busy=self.busy if self.records else None, describe=describe, label=self.label)
        # A script that has not asked should_stop() (yet): a stop signal ends it as plain
        # Python would; once it asks, the signal only sets the flag it reads. lnsp's
        # trainer asks at every step boundary from the start.
        self.stop = GracefulStop(self.log, asks=not self.records).install()
        current = self
        if self.world > 1 and self.records:  # the rank is known (its PID) before its first step
            self.beats[0].beat(0, 0, Phase.STARTUP, None, 0.0, {"guard": True})
        self.watchdog.start()
        _hook_optimizers()
        return self

    @contextlib.contextmanager
    def standing_down(self):
        """Run a block unguarded (the bench's bare steps beside guarded ones): the
        optimizer hook and lnsp.guard's calls see no runtime inside it."""
        global current
        current = None
        try:
            yield
        finally:
            current = self

    def close(self) -> None:
        """The guarded work is over (what follows, a plot, say, is not guarded)."""
        global current
        self.watchdog.stop()
        if current is self:
            current = None

    # ------------------------------------------------------------ progress
    def optimizer_stepped(self, optimizer=None, args=None, kwargs=None) -> None:
        """torch's global post hook: called after every Optimizer.step() in the process."""
        self.hooked = True
        self._count()

    def user_step(self, loss, scalars: dict) -> None:
        if loss is not None:
            self.loss = float(loss)
        self.scalars.update({k: float(v) for k, v in scalars.items()})
        if not self.hooked:  # no optimizer in this process: the call is the step
            self._count()

    def _count(self) -> None:
        self.step += 1
        self.watchdog.step_done()
        if not self.records:
            return
        now = time.monotonic()
        if self._window is None:  # the first step: the rate counts from here
            self._window = (now, 0)
            self._first_window = True
            self._last_line = now
            self.log(f"[GUARD] first optimizer step; every step counted, heartbeat in "
                     f"{self.rd.heartbeat}")
        start, steps = self._window
        steps += 1
        if now - start >= 1.0:
            self.steps_per_s = steps / (now - start)
            self._window, self._first_window = (now, 0), False
        else:
            self._window = (start, steps)
            if self._first_window and now > start:  # no full second yet: so far
                self.steps_per_s = steps / (now - start)
        self._step_time = time.time()
        if self.step % self.log_every == 0:
            self.record()

    def enter_phase(self, name: str) -> str:
        """A phase begins (a sign of progress); returns the phase it interrupts."""
        outer = self.watchdog.phase
        self.watchdog.progress(name)
        if self.records and time.monotonic() - self._last_beat >= BEAT_S:
            self.beat(name)
        return outer

    def leave_phase(self, outer: str) -> None:
        """The phase ended: back to the one it interrupted (a sign of progress too)."""
        self.watchdog.progress(outer)

    def beat(self, phase: str, at: float | None = None) -> None:
        """heartbeat.json; the main thread and the watchdog's (which writes the last
        steps' beat when the main thread went quiet) take turns."""
        with self._beat_lock:
            self._last_beat = time.monotonic()
            self._beaten, self._shown = self.step, phase
            extra = {"steps_per_s": round(self.steps_per_s, 3), "guard": True,
                     **self.watchdog.vitals()}
            for heartbeat in self.beats:
                heartbeat.beat(0, self.step, phase, self.loss, self.steps_per_s, extra, at=at)

    def record(self, final: bool = False) -> None:
        """steps.jsonl (per log interval) and goodput.json: records, never log text
        (rank 0's)."""
        from lnsp.rundir import StepRecord

        if not self.main:
            return
        self.rd.append_step(StepRecord(
            step=self.step, epoch=0, loss=self.loss, samples_per_s=round(self.steps_per_s, 3),
            phases={}, rss_mb=round(self.heartbeat.rss_mb(), 1), time=time.time(),
            extra={"steps_per_s": round(self.steps_per_s, 3), **self.scalars}))
        self.write_goodput()
        now = time.monotonic()
        if now - self._last_line >= LINE_S or final:
            self._last_line = now
            self.log(f"[GUARD] step {self.step} | {self.steps_per_s:.2f} steps/s"
                     + (f" | loss {self.loss:.4f}" if self.loss is not None else ""))

    def write_goodput(self) -> None:
        from lnsp.guard.watchdog import process_started

        if not self.main:
            return
        self.watchdog.account()
        self.rd.write_goodput({**self.watchdog.goodput.summary(), "pid": os.getpid(),
                               "step": self.step, "attempts": attempt() + 1,
                               "time": time.time(), "since": process_started()})

    # ------------------------------------------------------------ the watchdog's side
    def busy(self) -> bool:
        """Whether the process used at least BUSY_CPU cores over the last BUSY_WINDOW_S:
        busy work past a learned budget (an evaluation the script did not name) is not
        a stall until the stall timeout; a process blocked at no CPU is."""
        now, cpu = self._cpu[-1]
        for t, c in self._cpu:
            if now - t <= BUSY_WINDOW_S + 0.5:
                return (cpu - c) >= BUSY_CPU * max(now - t, 0.5)
        return False

    def _tick(self) -> None:
        """From the watchdog's thread every tick: CPU samples; before the first step, a
        process at work is making progress (start-up is judged by CPU, not by steps)."""
        if not self.records:  # lnsp's trainer: it names its phases and writes its records
            self.stop.announce()
            return
        now = time.monotonic()
        self._cpu.append((now, time.process_time()))
        while len(self._cpu) > 2 and now - self._cpu[1][0] > BUSY_WINDOW_S:
            self._cpu.pop(0)
        if not self.watchdog.started_steps and self.busy():
            self.watchdog.progress()
        phase = self.watchdog.phase
        shown = "train" if phase in (Phase.STEP_END, Phase.STARTUP) and self.step else phase
        if self._beaten != self.step or self._shown != shown:  # what the throttle left unwritten
            self.beat(shown, at=self._step_time if self._beaten != self.step else None)
        self.stop.announce("stopping at the script's next should_stop()" if self.stop.asks
                           else "stopping")

    def _diagnose(self):
        return OutsideDiagnosis(self.rd, os.getpid(), self.settings.get("python"),
                                self.log).start()

    def _stalled(self, phase: str, verdict: dict | None) -> None:
        """Before the watchdog's stall exit: exit.json with the diagnosis as its cause."""
        from lnsp.rundir import ExitCode

        self._exit("stalled", ExitCode.STALLED, self.step,
                   **self.watchdog.stall_exit(phase, verdict))
        self.write_goodput()

    def _exit(self, state: str, code: int, step: int, cause: str | None = None,
              **extra) -> None:
        """exit.json; a rank of a torchrun job writes its own, and `lnsp run` names
        the run's ending from them."""
        path = self.rd.rank_exit(self.rank) if self.world > 1 else self.rd.exit
        self.rd.write_exit_at(path, state, code, step, cause, **extra)

    def _ranks(self) -> str:
        """The other ranks' progress, for the stall line: which rank is behind."""
        rows = []
        for rank, beat in sorted(self.rd.rank_heartbeats().items()):
            if rank != self.rank:
                rows.append(f"rank {rank} step {beat.step} ({time.time() - beat.time:.1f}s ago)")
        return ("others: " + ", ".join(rows)) if rows else ""

    # ------------------------------------------------------------ stopping
    def should_stop(self) -> bool:
        self.stop.asks = True
        return self.stop.requested is not None

    @property
    def stop_requested(self) -> str | None:
        return self.stop.requested if self.stop is not None else None

    def finish(self, code: int, error: BaseException | None = None) -> int:
        """The script has ended: the last heartbeat, the records, exit.json; returns the
        process's exit code (0 for a requested stop)."""
        from lnsp.rundir import ExitCode

        self.watchdog.stop()
        self.beat(Phase.END)
        if self.step:
            self.record(final=True)
        if self.stop_requested:  # however the script ended, a stop was asked for
            self._exit("stopped", ExitCode.DONE, self.step, signal=self.stop_requested)
            return ExitCode.DONE
        if error is not None:
            self._exit("failed", code, self.step, cause=f"{type(error).__name__}: {error}",
                       error=f"{type(error).__name__}: {error}")
            return code
        if code == 0:
            self._exit("finished", ExitCode.DONE, self.step)
        else:
            self._exit("failed", code, self.step, cause=f"exit code {code}")
        return code


def attempt() -> int:
    try:
        return int(os.environ.get(ENV_ATTEMPT, "0"))
    except ValueError:
        return 0


# ---------------------------------------------------------------- the optimizer hook
def _stepped(optimizer, args, kwargs) -> None:
    """torch's global post hook, registered once per process: the runtime installed now
    counts the step (none: nothing, as in a bench's unguarded blocks)."""
    rt = current
    if rt is not None:
        rt.optimizer_stepped()


def _register(module) -> None:
    if getattr(module, "_lnsp_guard_hook", None) is None:
        module._lnsp_guard_hook = module.register_optimizer_step_post_hook(_stepped)


class _OptimizerFinder:
    """A meta-path finder that registers the hook right after `torch.optim.optimizer`
    has executed, so not one optimizer step is missed and torch is never imported
    by lnsp. It only wraps the loader that the rest of sys.meta_path finds."""

    def find_spec(self, name, path, target=None):
        if name != OPTIMIZER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        loader = spec.loader
        original = loader.exec_module

        class Loader:
            def create_module(self, s):
                return loader.create_module(s)

            def exec_module(self, module):
                original(module)
                _register(module)

        spec.loader = Loader()
        return spec


def _hook_optimizers() -> None:
    if OPTIMIZER_MODULE in sys.modules:  # already imported (lnsp's trainer, a sitecustomize)
        _register(sys.modules[OPTIMIZER_MODULE])
    elif not any(isinstance(f, _OptimizerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OptimizerFinder())


# ---------------------------------------------------------------- the diagnosis
class OutsideDiagnosis:
    """The stall's diagnosis taken by lnsp's own interpreter (py-spy, pystack and
    psutil live there, not in the user's): `python -m lnsp explain` prints the verdict
    as one JSON line, then writes the hang bundle and exits. The interface of
    lnsp.diagnose.hangbundle.Explanation: start(), wait(verdict_s, bundle_s)."""

    def __init__(self, rd, pid: int, python: str | None, log):
        self.rd, self.pid, self.python, self.log = rd, pid, python, log
        self.verdict: dict | None = None
        self.known, self.done = threading.Event(), threading.Event()

    def start(self) -> "OutsideDiagnosis":
        threading.Thread(target=self._run, name="lnsp-diagnose", daemon=True).start()
        return self

    def _run(self) -> None:
        import subprocess

        from lnsp.guard.watchdog import own_threads

        try:
            if not self.python:
                raise RuntimeError("no lnsp interpreter recorded (LNSP_GUARD python)")
            ignore = ",".join(str(t) for t in sorted(own_threads()))
            proc = subprocess.Popen(
                [self.python, "-m", "lnsp", "explain", str(self.rd.root), str(self.pid),
                 "--ignore", ignore], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
                env={k: v for k, v in os.environ.items() if k not in (ENV_SETTINGS,)})
            line = proc.stdout.readline()
            self.verdict = json.loads(line) if line.strip() else {
                "kind": "error", "summary": "diagnosis failed: "
                + (proc.stderr.read().strip()[-300:] or "no output")}
            self.known.set()
            proc.wait()
        except Exception as e:  # a failed diagnosis must never take the stall report down
            self.verdict = {"kind": "error", "summary": f"diagnosis failed: "
                            f"{type(e).__name__}: {e}"}
            self.log(f"[WATCHDOG] diagnosis failed: {type(e).__name__}: {e}")
        finally:
            self.known.set()
            self.done.set()

    def wait(self, verdict_s: float = 15.0, bundle_s: float = 0.0) -> dict | None:
        self.known.wait(verdict_s)
        if bundle_s:
            self.done.wait(bundle_s)
        return self.verdict
