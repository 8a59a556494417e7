"""All-thread stack dumps of a live run: on SIGUSR1 (even while the main thread is
stuck in native code), from the watchdog, with native frames from py-spy when it is
installed and permitted. Each dump is one text file in the run's dumps/ folder."""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from lnsp import system

QUIET_S = 0.2  # a signal dump is complete once faulthandler has been quiet this long


def python_stacks() -> str:
    """Every thread's Python stack, most recent call last, named by thread."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {ident:#x} ({names.get(ident, '?')}):\n"
                     + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


def native_stacks(pid: int, timeout: float = 20.0) -> str | None:
    """`py-spy dump --native` of a process, or None when py-spy cannot do it here. A
    stopped process cannot be suspended for native frames: then its Python frames,
    read without stopping it (--nonblocking)."""
    exe = system.tool("py-spy")
    if exe is None:
        return None
    for mode, label in (("--native", ""), ("--nonblocking", "(Python frames only: the "
                                                            "process could not be suspended)\n")):
        try:
            out = subprocess.run([exe, "dump", mode, "--pid", str(pid)], capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, OSError):
            continue
        if out.returncode == 0:
            return label + out.stdout
    return None


class Dumper:
    """Owns faulthandler for the process and writes dump files into `folder`."""

    def __init__(self, folder: Path, log, native: bool = True, prefix: str = ""):
        self.folder, self.log, self.native, self.prefix = Path(folder), log, native, prefix
        self.count = 0
        self._lock = threading.Lock()
        # faulthandler's C handler writes the stacks into this pipe from inside the
        # signal handler, so SIGUSR1 works while the main thread is in native code.
        self._read, self._write = os.pipe()
        faulthandler.register(signal.SIGUSR1, file=self._write, all_threads=True, chain=False)
        self._thread = threading.Thread(target=self._collect, name="lnsp-dumps", daemon=True)
        self._thread.start()

    def enable_crash_dumps(self, file) -> None:
        """A fatal signal (segfault, abort) leaves every thread's stack in `file`."""
        faulthandler.enable(file=file, all_threads=True)

    def _collect(self) -> None:
        while True:
            select.select([self._read], [], [])
            chunks = [os.read(self._read, 65536)]
            while select.select([self._read], [], [], QUIET_S)[0]:
                chunks.append(os.read(self._read, 65536))
            text = b"".join(chunks).decode(errors="replace")
            self.write("signal", "SIGUSR1 (faulthandler, most recent call first):\n" + text)

    def dump(self, reason: str) -> Path:
        """Dump every thread now, from Python (this thread must hold the GIL)."""
        return self.write(reason, "Python stacks (most recent call last):\n" + python_stacks())

    def write(self, reason: str, text: str) -> Path:
        """The dump file with the Python stacks at once, then the same file again with
        the native frames added: py-spy can take seconds on a large process (longer on
        a busy machine), and whoever waits for the dump should not wait for it."""
        from lnsp.rundir import atomic_write, dump_name

        with self._lock:
            self.count += 1
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / dump_name(reason, self.count, self.prefix)
        head = (f"# lnsp stack dump: {reason}, pid {os.getpid()}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}")
        native = None
        if self.native:
            atomic_write(path, head + "\n\n(native frames: being added by py-spy)\n")
            native = native_stacks(os.getpid())
        body = text + ("\n\nNative stacks (py-spy dump --native):\n" + native if native
                       else "\n\n(native frames: py-spy not installed or not permitted)\n")
        atomic_write(path, head + body[len(text):])
        self.log(f"[DUMP] {reason}: all-thread stack dump written to {path}")
        self.log.raw(body)
        return path
