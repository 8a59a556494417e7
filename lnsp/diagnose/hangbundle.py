"""A stall explained where it is seen: the diagnosis of a trainer (its own watchdog's,
or the supervisor's of a frozen one), taken in a thread of its own with a time bound,
and the hang bundle written into the run's dumps/ folder: samples, folded stacks,
verdict, doctor snapshot, heartbeat, the log's last lines and the config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from lnsp.guard.watchdog import VERDICT_WAIT_S, own_threads
from lnsp.rundir import RunDir, atomic_write, write_json

# Fast enough that the verdict follows the stall line within seconds: ~1 s of sleep,
# two cheap Python dumps and one native dump (~0.5 s on a torch process), pystack once.
SAMPLES, INTERVAL_S = 3, 0.5
DOCTOR_TIMEOUT_S = 30.0
LOG_LINES = 200


class Explanation:
    """One diagnosis and bundle, run in a daemon thread: `verdict` is set as soon as it
    is known, `done` once the bundle is complete (or failed)."""

    def __init__(self, rd: RunDir, pid: int, prefix: str = "", log=None,
                 samples: int = SAMPLES, interval: float = INTERVAL_S,
                 ignore: set[int] | None = None):
        self.rd, self.pid, self.prefix, self.log = rd, pid, prefix, log
        self.ignore = ignore  # threads not to judge (default: our own, in this process)
        self.samples, self.interval = samples, interval
        self.verdict: dict | None = None
        self.bundle: Path | None = None
        self.known, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="lnsp-diagnose", daemon=True)

    def start(self) -> "Explanation":
        self.thread.start()
        return self

    def _run(self) -> None:
        from lnsp.diagnose import diagnosis as diagnose
        from lnsp.diagnose.target import Target

        try:
            ignore = self.ignore if self.ignore is not None else \
                own_threads() if self.pid == os.getpid() else set()
            target = Target(self.pid, self.rd.root, self.rd.read_run())
            verdict = diagnose.diagnose(target, self.samples, self.interval, ignore=ignore)
            self.bundle = self.rd.bundle_path(verdict["kind"], self.prefix)
            verdict["bundle"] = str(self.bundle)
            self.verdict = verdict
            self.known.set()
            write(self.rd, verdict, self.bundle)
        except Exception as e:  # a failed diagnosis must never take the stall report down
            self.verdict = self.verdict or {"kind": "error", "summary": f"diagnosis failed: "
                                            f"{type(e).__name__}: {e}"}
            if self.log:
                self.log(f"[WATCHDOG] diagnosis failed: {type(e).__name__}: {e}")
        finally:
            self.known.set()
            self.done.set()

    def wait(self, verdict_s: float = VERDICT_WAIT_S, bundle_s: float = 0.0) -> dict | None:
        """The verdict within `verdict_s` (None past it), and with `bundle_s` > 0 also
        wait that long for the bundle to be written."""
        self.known.wait(verdict_s)
        if bundle_s:
            self.done.wait(bundle_s)
        return self.verdict


def write(rd: RunDir, verdict: dict, folder: Path) -> Path:
    """The bundle, written into a hidden folder and renamed into place whole."""
    from lnsp.diagnose import diagnosis as diagnose

    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    summary = {k: verdict.get(k) for k in ("kind", "summary", "evidence", "fix", "pid",
                                           "run_dir", "bundle")}
    summary["time"] = time.time()
    write_json(rd.verdict(tmp), summary)
    atomic_write(tmp / "verdict.txt", diagnose.text(verdict) + "\n")
    write_json(tmp / "samples.json", {"samples": verdict.get("samples", [])}, durable=False)
    atomic_write(tmp / "folded.txt", verdict.get("folded", ""))
    for source in (rd.heartbeat, rd.config, rd.run):  # under their own names
        if source.exists():
            shutil.copyfile(source, tmp / source.name)
    for beat in rd.rank_heartbeat_files():
        shutil.copyfile(beat, tmp / beat.name)
    atomic_write(tmp / "log-tail.txt", _tail(rd.log, LOG_LINES))
    write_json(tmp / "doctor.json", _doctor(verdict.get("pid")))
    os.replace(tmp, folder)
    return folder


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))  # 200 lines fit; a dump can be long
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) + "\n"


def _doctor(pid: int | None) -> dict:
    """The doctor's facts and hazards: read in this process when it is the stuck one
    (its libraries are loaded; pools are read, not resized), else `lnsp doctor --json`
    in a fresh process with the same environment and libraries."""
    if pid == os.getpid():
        try:
            from lnsp.diagnose import doctor

            f = doctor.facts(snapshot=True)
            f["hazards"] = doctor.hazards(f)
            return f
        except Exception as e:  # a snapshot is evidence, never a new failure
            return {"error": f"{type(e).__name__}: {e}"}
    try:
        out = subprocess.run([sys.executable, "-m", "lnsp", "doctor", "--json"],
                             capture_output=True, text=True, timeout=DOCTOR_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
        return json.loads(out.stdout) if out.returncode == 0 else \
            {"error": out.stderr.strip()[-500:]}
    except (subprocess.TimeoutExpired, OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
