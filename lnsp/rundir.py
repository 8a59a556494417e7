"""The run directory: its file names, atomic writes for what other processes read,
and the flushed, timestamped run log."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str, durable: bool = True) -> None:
    """Write to a temporary file beside `path`, then os.replace it into place, so a
    reader never sees half a file. `durable` also fsyncs (checkpoints, not heartbeats:
    a reader needs a whole file, not one that survives a power cut). The temporary
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


class RunDir:
    """Paths of one run: everything about a run lives under it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    run = property(lambda self: self.root / "run.json")
    log = property(lambda self: self.root / "training.log")
    console = property(lambda self: self.root / "console.log")
    heartbeat = property(lambda self: self.root / "heartbeat.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    dumps = property(lambda self: self.root / "dumps")
    exit = property(lambda self: self.root / "exit.json")
    plots = property(lambda self: self.root / "plots.png")

    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    def exists(self) -> bool:
        return self.run.exists() or self.config.exists()


class RunLog:
    """Timestamped lines into training.log (flushed at once) and to stdout."""

    def __init__(self, path: str | Path | None, echo: bool = True, prefix: str = ""):
        self.file = open(path, "a", buffering=1) if path else None
        self.echo, self.prefix = echo, prefix

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {self.prefix}{message}"
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        if self.echo:
            print(line, flush=True)

    def raw(self, text: str) -> None:
        """Untimestamped text (a stack dump) into the log only."""
        if self.file:
            self.file.write(text if text.endswith("\n") else text + "\n")
            self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno() if self.file else sys.stderr.fileno()
