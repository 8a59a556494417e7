"""Stacks of another process, read from outside: py-spy's JSON dump (Python and native
frames) and pystack's GIL labels, as frames that samples can be compared by."""

from __future__ import annotations

import json
import re
import subprocess

from lnsp import system

PYSPY_TIMEOUT_S = 10.0
PYSTACK_TIMEOUT_S = 10.0


def pyspy(pid: int, native: bool = True, timeout: float = PYSPY_TIMEOUT_S,
          blocking: bool = True) -> list | None:
    """py-spy's JSON dump (innermost frame first per thread), or None when it fails.
    A stopped process cannot be suspended: then Python frames only, without stopping it."""
    exe = system.tool("py-spy")
    if not exe:
        return None
    modes = ([["--native"]] if native else []) + ([[]] if blocking else []) + [["--nonblocking"]]
    for mode in modes:
        try:
            out = subprocess.run([exe, "dump", "--json", *mode, "--pid", str(pid)],
                                 capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, OSError):
            continue
        if out.returncode == 0:
            try:
                return json.loads(out.stdout)
            except ValueError:
                continue
    return None


def pystack(pid: int, timeout: float = PYSTACK_TIMEOUT_S) -> dict[int, list[str]] | None:
    """pystack's per-thread labels (Has the GIL, Waiting for the GIL, Garbage
    collecting), which it reads from the interpreter and DWARF; None without it."""
    exe = system.tool("pystack")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "remote", "--native", str(pid)],
                             capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if out.returncode != 0:
        return None
    labels = {}
    for m in re.finditer(r"^Traceback for thread (\d+) \(.*?\) \[(.*?)\]", out.stdout, re.M):
        labels[int(m.group(1))] = [s.strip() for s in m.group(2).split(",") if s.strip()]
    return labels


def frames_of(thread: dict) -> list[dict]:
    """py-spy frames, innermost first: name, file, line, native."""
    return [{"name": f["name"], "file": f.get("short_filename") or f.get("filename") or "?",
             "path": f.get("filename") or "", "line": f.get("line", 0),
             "native": f.get("module") is not None} for f in thread.get("frames", [])]


def stack_key(frames: list[dict]) -> tuple:
    """What "the same stack" means across samples: Python functions and files, not line
    numbers (a spinning loop moves between the lines of one function), nor native
    frames (only the last sample has them)."""
    return tuple((f["name"], f["file"]) for f in frames if not f["native"])


def render(frame: dict) -> str:
    where = f"{frame['file']}:{frame['line']}" if frame["line"] else frame["file"]
    return f"{frame['name']} ({where})"
