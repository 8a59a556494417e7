"""The run directory's contract: every file name in it, the exit codes, typed records
(heartbeat, run, exit, steps), atomic writes for what other processes read, the one
"is this run stale" check, and the flushed, timestamped run log.

Every other module asks this one; none spells a file name or an exit code itself."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from lnsp import progress


class ExitCode(IntEnum):
    """The process exit codes of docs/design.md."""
    DONE = 0  # finished, or stopped on request
    INTERNAL = 1  # a crash, a non-finite loss, a rank that left
    BAD_INPUT = 2  # bad input or usage: one line, no traceback
    STALLED = 3  # stalled or timed out (watchdog, frozen, collective timeout, probe)
    CRASH_LOOP = 4  # restarts that made no progress past the last checkpoint
    INTERRUPTED = 130  # a second SIGINT


# ---------------------------------------------------------------- atomic files
def atomic_write(path: str | Path, data: bytes | str, durable: bool = True) -> None:
    """Write to a temporary file beside `path`, then os.replace it into place, so a
    reader never sees half a file. `durable` also fsyncs the file and then its folder,
    which holds the rename (checkpoints, not heartbeats: a reader needs a whole file,
    not one that survives a power cut). The temporary
    name is unique per process and thread: a heartbeat is written after every step,
    so it takes four system calls, not a random name's search."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:  # the rename itself lives in the directory: a power cut could undo it
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse a directory's fsync: the file's was done
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: dict, durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", durable)


def read_json(path: str | Path) -> dict | None:
    """The object in a JSON file, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def update_json(path: str | Path, **fields) -> dict:
    obj = read_json(path) or {}
    obj.update(fields)
    write_json(path, obj)
    return obj


def append_jsonl(path: str | Path, obj: dict) -> None:
    """One record per line; a single write of a whole line, so a reader sees whole lines."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when missing); a torn last line is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


# ---------------------------------------------------------------- records
def _from(cls, obj: dict | None):
    """A record from a JSON object: known fields typed, the rest kept in `extra`."""
    if obj is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    try:
        return cls(**{k: v for k, v in obj.items() if k in names},
                   extra={k: v for k, v in obj.items() if k not in names})
    except TypeError:  # a required field is missing: not a record of this kind
        return None


def _to(record) -> dict:
    obj = {k: v for k, v in dataclasses.asdict(record).items() if k != "extra"}
    return {**{k: v for k, v in obj.items() if v is not None}, **record.extra}


@dataclass
class Heartbeat:
    """heartbeat.json (and heartbeat-rankN.json): replaced after every optimizer step."""
    pid: int
    time: float  # Unix seconds
    host: str = ""
    epoch: int = 0
    step: int = 0
    phase: str = ""
    loss: float | None = None
    samples_per_s: float = 0.0
    rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class ExitRecord:
    """exit.json: how the run ended; removed when a trainer starts."""
    state: str  # finished, stopped, stalled, failed
    exit_code: int
    step: int = 0
    time: float = 0.0
    cause: str | None = None  # the diagnosis, when it stalled or failed
    extra: dict = field(default_factory=dict)  # signal, frozen, error


@dataclass(frozen=True)
class RunRecord:
    """run.json: the launch facts, written in parts, each writer its own fields (the
    launcher: backend, launch time and its plan; the supervisor or torchrun's agent: its
    PID; the trainer: its PID, budgets and ranks) through RunDir.update_run; read whole
    here. What only a backend's own notes need (a tmux session, an image) stays in
    `extra`, as does any key of an older or newer lnsp."""
    backend: str = "foreground"  # nohup, tmux, docker, ddp, ddp-docker or foreground
    launch_time: float | None = None  # when a launcher wrote it (None: not launched)
    pid: int | None = None  # the trainer (under lnsp run: the guarded command)
    start_time: float | None = None  # its start: the PID is believed only with it
    supervisor_pid: int | None = None  # lnsp supervise, lnsp run or torchrun's agent
    supervisor_start: float | None = None
    restarts: int = 0
    max_restarts: int = 0
    attempts: int = 0  # lnsp run's attempts so far (a resume counts on)
    attempts_from: list[int] = field(default_factory=list)  # each trainer's first step
    stall_timeout: float | None = None  # the trainer's budgets, for status from outside
    startup_timeout: float | None = None
    guard: bool | None = None  # False: lnsp run's command is not Python (no heartbeat)
    world_size: int = 1
    ranks: list[dict] = field(default_factory=list)  # rank, pid, host, start of each
    container_id: str | None = None  # docker
    containers: list[str] = field(default_factory=list)  # ddp-docker: one per node
    network: str | None = None  # ddp-docker
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, obj: dict | None) -> RunRecord:
        """The record of run.json's object ({} or None: a run with no facts yet)."""
        return _from(cls, obj or {})


@dataclass
class StepRecord:
    """One line of steps.jsonl per log interval: what plots and bench read."""
    step: int
    epoch: int
    loss: float
    samples_per_s: float
    phases: dict  # seconds per phase over the interval
    rss_mb: float
    time: float
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- staleness
@dataclass(frozen=True)
class Staleness:
    idle: float  # seconds since the last sign of progress
    budget: float  # seconds allowed
    stepping: bool  # past the first step (the stall budget) or still starting

    @property
    def stale(self) -> bool:
        return self.idle > self.budget

    @property
    def kind(self) -> str:
        return "step" if self.stepping else "start-up and first step"


def staleness(last: float, stepping: bool, stall_timeout: float, startup_timeout: float,
              now: float, grace: float = 0.0) -> Staleness:
    """The one check of whether a run is stale: idle past its budget, which is the stall
    timeout once steps have started and the start-up timeout before. The watchdog asks
    from inside (monotonic clock, no grace); the supervisor and status ask from outside
    (heartbeat times), the supervisor with a grace so the trainer's own watchdog goes
    first (at most doubling the budget)."""
    budget = stall_timeout if stepping else startup_timeout
    return Staleness(now - last, budget + min(grace, budget), stepping)


def run_staleness(beat: Heartbeat | None, pid: int | None, started: float,
                  stall_timeout: float, startup_timeout: float, now: float,
                  grace: float = 0.0) -> Staleness:
    """Staleness of the trainer `pid` seen from outside: its heartbeat's age once it has
    written one (a heartbeat of an earlier trainer does not count), else the time since
    it started."""
    fresh = beat is not None and beat.pid == pid
    return staleness(beat.time if fresh else started, fresh, stall_timeout, startup_timeout,
                     now, grace)


# ---------------------------------------------------------------- the directory
def dump_name(reason: str, count: int, prefix: str = "") -> str:
    """A stack dump's file name: `[rankN-]dump-NNN-REASON-STAMP.txt`."""
    return f"{prefix}dump-{count:03d}-{reason}-{time.strftime('%Y%m%d-%H%M%S')}.txt"


class RunDir:
    """Paths and records of one run: everything about a run lives under it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def runs_under(cls, root: str | Path) -> list[RunDir]:
        """The run directories right under `root` (those with a run.json), by name."""
        base = Path(root)
        return [cls(p) for p in sorted(base.iterdir()) if cls(p).run.exists()] \
            if base.is_dir() else []

    config = property(lambda self: self.root / "config.json")
    run = property(lambda self: self.root / "run.json")
    log = property(lambda self: self.root / "training.log")
    console = property(lambda self: self.root / "console.log")
    heartbeat = property(lambda self: self.root / "heartbeat.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    steps = property(lambda self: self.root / "steps.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    dumps = property(lambda self: self.root / "dumps")
    exit = property(lambda self: self.root / "exit.json")
    plots = property(lambda self: self.root / "plots.png")
    tb = property(lambda self: self.root / "tb")  # TensorBoard event files
    calibration = property(lambda self: self.root / "calibration.json")  # decider thresholds
    goodput = property(lambda self: self.root / "goodput.json")
    last_checkpoint_record = property(lambda self: self.checkpoints / "last.json")
    # `lnsp stop` writes it before any signal; a supervisor (or a torchrun restart) that
    # finds it never starts another trainer. A launch removes it.
    stop_request = property(lambda self: self.root / "stop.json")
    # Held (flock) by the run's one trainer for its whole life: a second is refused.
    trainer_lock = property(lambda self: self.root / "trainer.lock")
    reaper_log = property(lambda self: self.root / "reaper.log")  # ddp-docker's reaper

    def node_console(self, node: str) -> Path:
        """A ddp-docker node's console output, saved when the node has ended."""
        return self.root / f"console-{node}.log"

    def rank_heartbeat(self, rank: int) -> Path:
        return self.root / f"heartbeat-rank{rank}.json"

    def rank_heartbeat_files(self) -> list[Path]:
        return sorted(self.root.glob("heartbeat-rank*.json"))

    def rank_heartbeats(self) -> dict[int, Heartbeat]:
        """Every rank's last heartbeat, by rank."""
        beats = {}
        for path in self.rank_heartbeat_files():
            beat = _from(Heartbeat, read_json(path))
            if beat is not None:
                beats[int(path.stem.removeprefix("heartbeat-rank"))] = beat
        return beats

    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    def dump_path(self, reason: str, count: int, prefix: str = "") -> Path:
        return self.dumps / dump_name(reason, count, prefix)

    def bundle_path(self, kind: str, prefix: str = "") -> Path:
        """A hang bundle's folder: `[rankN-]hang-STAMP-KIND/` (lnsp.diagnose.hangbundle)."""
        return self.dumps / f"{prefix}hang-{time.strftime('%Y%m%d-%H%M%S')}-{kind}"

    @staticmethod
    def verdict(bundle: Path) -> Path:
        """A hang bundle's verdict (kind, summary, time), written last: a bundle with
        one is complete."""
        return bundle / "verdict.json"

    def bundles(self) -> list[Path]:
        """The hang bundles written so far, oldest first (complete ones only)."""
        return sorted((p for p in self.dumps.glob("*hang-*") if self.verdict(p).exists()),
                      key=lambda p: p.stat().st_mtime)

    def frozen_dump_path(self, pid: int) -> Path:
        """The supervisor's native dump of a frozen trainer."""
        return self.dumps / f"dump-frozen-{pid}-{time.strftime('%Y%m%d-%H%M%S')}.txt"

    def exists(self) -> bool:
        return self.run.exists() or self.config.exists()

    # typed records
    def read_heartbeat(self, path: Path | None = None) -> Heartbeat | None:
        return _from(Heartbeat, read_json(path or self.heartbeat))

    def write_heartbeat(self, beat: Heartbeat, path: Path | None = None) -> None:
        write_json(path or self.heartbeat, _to(beat), durable=False)

    def survivor_mark(self, rank: int) -> Path:
        """A rank's word that it outlived a failed collective (lnsp.train.distributed
        names the ranks without one as gone)."""
        return self.root / f"alive-after-error-rank{rank}.json"

    def survivor_marks(self) -> list[Path]:
        return sorted(self.root.glob("alive-after-error-rank*.json"))

    def rank_exit(self, rank: int) -> Path:
        """How one rank of a guarded torchrun command ended; `lnsp run` turns the ranks'
        records into exit.json."""
        return self.root / f"exit-rank{rank}.json"

    def read_exit(self, path: Path | None = None) -> ExitRecord | None:
        return _from(ExitRecord, read_json(path or self.exit))

    def write_exit(self, state: str, code: int, step: int, cause: str | None = None,
                   **extra) -> ExitRecord:
        """exit.json, the one place it is written (trainer, watchdog, supervisor)."""
        return self.write_exit_at(self.exit, state, code, step, cause, **extra)

    def write_exit_at(self, path: Path, state: str, code: int, step: int,
                      cause: str | None = None, **extra) -> ExitRecord:
        record = ExitRecord(state, int(code), step, time.time(), cause, extra)
        write_json(path, _to(record))
        return record

    def clear_exit(self) -> None:
        self.exit.unlink(missing_ok=True)

    def read_run(self) -> dict:
        """run.json as it is stored, for a writer that adds to what it holds; readers ask
        read_run_record."""
        return read_json(self.run) or {}

    def read_run_record(self) -> RunRecord | None:
        """run.json: the launch facts (backend, PIDs, start time, budgets, ranks); None
        when there is none (or it cannot be read)."""
        obj = read_json(self.run)
        return None if obj is None else RunRecord.of(obj)

    def update_run(self, **fields) -> dict:
        """Merge `fields` into run.json; a field given as None is removed (it does not
        apply to this launch: a container's supervisor PID after a native resume)."""
        obj = read_json(self.run) or {}
        obj.update(fields)
        obj = {k: v for k, v in obj.items() if v is not None}
        write_json(self.run, obj)
        return obj

    def checkpoint_step(self) -> int:
        """The step of last.pt (from its small record beside it: no torch needed)."""
        return int((read_json(self.last_checkpoint_record) or {}).get("step", 0))

    def write_checkpoint_record(self, step: int, epoch: int) -> None:
        write_json(self.last_checkpoint_record, {"step": step, "epoch": epoch,
                                                 "time": time.time()})

    def request_stop(self, grace: float) -> None:
        write_json(self.stop_request, {"time": time.time(), "grace_s": grace})

    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def clear_stop(self) -> None:
        self.stop_request.unlink(missing_ok=True)

    def lock_trainer(self):
        """Take the run's trainer lock (flock: released when the process ends, however it
        ends) and write our PID into it. Returns the open file, to keep for the trainer's
        life, or None when another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        held = self._flock()
        if held is not None:
            held.truncate(0)
            held.write(f"{os.getpid()}\n")
            held.flush()
        return held

    def trainer_lock_holder(self) -> int | None:
        """None when no trainer holds the lock, else the PID it wrote (0 if not yet)."""
        if not self.trainer_lock.exists():
            return None
        probe = self._flock()
        if probe is not None:
            probe.close()
            return None
        try:
            return int(self.trainer_lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def _flock(self):
        import fcntl

        f = open(self.trainer_lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def read_goodput(self) -> dict:
        """goodput.json: where the run's wall time went, over every attempt."""
        return read_json(self.goodput) or {}

    def write_goodput(self, record: dict) -> None:
        write_json(self.goodput, record, durable=False)

    def append_step(self, record: StepRecord) -> None:
        append_jsonl(self.steps, _to(record))

    def read_steps(self) -> list[StepRecord]:
        return [r for r in (_from(StepRecord, o) for o in read_jsonl(self.steps)) if r]

    def append_metrics(self, metrics: dict) -> None:
        append_jsonl(self.metrics, metrics)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)


class RunLog:
    """Timestamped lines into training.log (flushed at once) and to stdout. Never called
    from a signal handler: the lock would deadlock a write that the signal interrupted."""

    def __init__(self, path: str | Path | None, echo: bool = True, prefix: str = ""):
        self.file = open(path, "a", buffering=1) if path else None
        self.echo, self.prefix = echo, prefix
        self._lock = threading.Lock()  # the loop, the watchdog and the dump thread all log

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {self.prefix}{message}"
        with self._lock:
            if self.file:
                self.file.write(line + "\n")
                self.file.flush()
            if self.echo:
                progress.echo(line)  # above a progress bar, if one is on the terminal

    def raw(self, text: str) -> None:
        """Untimestamped text (a stack dump) into the log only."""
        with self._lock:
            if self.file:
                self.file.write(text if text.endswith("\n") else text + "\n")
                self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno() if self.file else sys.stderr.fileno()
