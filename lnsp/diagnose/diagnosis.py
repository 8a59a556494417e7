"""`lnsp diagnose`: why is a Python process stuck. Takes a few samples of every thread
(py-spy native stacks, /proc state, wchan, the blocking system call and its file, CPU),
folds them, and hands the facts to the catalog of known hangs (lnsp.diagnose.hangs).

Everything here reads the target from outside: it works on an lnsp run and on any
Python process the user may trace (py-spy needs ptrace: root, or the same user with
ptrace_scope 0). /proc is Linux only; elsewhere the stacks alone are judged.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lnsp import system
from lnsp.errors import LnspError
from lnsp.system import openmp_family  # noqa: F401  (lnsp.diagnose.hangs reads it here)
from lnsp.rundir import ExitCode

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PYSPY_TIMEOUT_S = 10.0
PYSTACK_TIMEOUT_S = 10.0

# System call numbers worth naming; the others are printed as numbers.
SYSCALLS = {
    "x86_64": {0: "read", 1: "write", 2: "open", 4: "stat", 5: "fstat", 6: "lstat",
               7: "poll", 17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev",
               23: "select", 34: "pause", 35: "nanosleep", 42: "connect", 43: "accept",
               44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4",
               74: "fsync", 75: "fdatasync", 202: "futex", 219: "restart_syscall",
               230: "clock_nanosleep", 232: "epoll_wait", 247: "waitid", 257: "openat",
               262: "newfstatat", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
               288: "accept4", 332: "statx", 16: "ioctl"},
    "aarch64": {63: "read", 64: "write", 56: "openat", 79: "newfstatat", 291: "statx",
                73: "ppoll", 72: "pselect6", 67: "pread64", 65: "readv", 66: "writev",
                203: "connect", 202: "accept", 242: "accept4", 206: "sendto",
                207: "recvfrom", 211: "sendmsg", 212: "recvmsg", 98: "futex",
                128: "restart_syscall", 101: "nanosleep", 115: "clock_nanosleep",
                22: "epoll_pwait", 260: "wait4", 95: "waitid", 82: "fsync", 29: "ioctl"},
}.get(platform.machine(), {})
# Calls that block on a file descriptor (its number is the first argument) ...
FD_CALLS = {"read", "write", "pread64", "pwrite64", "readv", "writev", "recvfrom",
            "recvmsg", "sendto", "sendmsg", "accept", "accept4", "connect", "fsync",
            "fdatasync", "ioctl"}
# ... and calls that block on a path (the argument that points at it).
PATH_CALLS = {"open": 0, "stat": 0, "lstat": 0, "openat": 1, "newfstatat": 1, "statx": 1}


class BadTarget(LnspError):
    """The target is not something to diagnose: one line, exit code 2."""

    exit_code = ExitCode.BAD_INPUT


@dataclass
class Target:
    pid: int
    run_dir: Path | None = None
    run: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the target

def resolve(target: str, root: str = "runs") -> Target:
    """A live Python process from a PID or a run directory (its run.json's trainer)."""
    from lnsp.rundir import RunDir, read_json

    if target.isdigit():
        pid = int(target)
        run_dir, run = None, {}
        base = Path(root)
        for path in (rd.run for rd in RunDir.runs_under(base)):
            info = read_json(path) or {}
            if info.get("pid") == pid and info.get("backend") != "docker":
                run_dir, run = path.parent, info
        if run_dir is None:
            args = _cmdline(pid)
            if "--run-dir" in args[:-1]:
                candidate = RunDir(args[args.index("--run-dir") + 1])
                if candidate.run.exists():
                    run_dir, run = candidate.root, read_json(candidate.run) or {}
    else:
        rd = RunDir(target)
        run = read_json(rd.run)
        if run is None:
            raise BadTarget(f"{target}: not a run directory (no run.json) and not a PID")
        if run.get("backend") == "docker":
            raise BadTarget(f"{target}: runs in a container; diagnose it inside: "
                            f"docker exec {str(run.get('container_id', ''))[:12]} lnsp diagnose 1")
        pid, run_dir = run.get("pid"), rd.root
        if not pid:
            raise BadTarget(f"{target}: run.json names no trainer PID yet")
    check_python(pid)
    return Target(pid, run_dir, run)


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def check_python(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise BadTarget(f"process {pid} has exited (a zombie waiting for its parent)")
        exe = proc.exe() or proc.name()
    except psutil.NoSuchProcess:
        raise BadTarget(f"no such process: {pid}") from None
    except psutil.AccessDenied:
        raise BadTarget(f"process {pid}: access denied (run as its user or as root)") from None
    name = os.path.basename(exe)
    # A macOS framework build runs as .../Python.app/Contents/MacOS/Python.
    if system.is_python(exe):
        return
    # An interpreter under another name that loads a shared libpython (an embedding
    # program, a renamed binary); only /proc tells, on Linux.
    if system.has_proc():
        try:
            if "libpython" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            pass
    raise BadTarget(f"process {pid} is not a Python process ({name})")


# ---------------------------------------------------------------- /proc

def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _stat_fields(text: str | None) -> list[str]:
    """/proc/.../stat after the command name (which may hold spaces): field 3 is [0]."""
    if not text:
        return []
    return text[text.rfind(")") + 2:].split()


def _read_string(pid: int, address: int, limit: int = 4096) -> str | None:
    """A NUL-terminated string from the target's memory (the path of an open())."""
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(address)
            raw = mem.read(limit)
    except (OSError, OverflowError, ValueError):
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def describe_fd(pid: int, fd: int) -> dict:
    """What a file descriptor of the target is: a path (and whether a FIFO), a pipe,
    a socket (with its TCP addresses when it is one)."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return {"fd": fd, "target": None}
    info = {"fd": fd, "target": target, "type": "file"}
    if target.startswith("pipe:"):
        info["type"] = "pipe"
    elif target.startswith("socket:"):
        info["type"] = "socket"
        inode = target[8:-1]
        info.update(_socket_peer(pid, inode))
    elif target.startswith("/dev/pts") or target.startswith("/dev/tty"):
        info["type"] = "terminal"
    else:
        info["type"] = _file_type(pid, target)
    return info


def _file_type(pid: int, path: str) -> str:
    try:  # stat() of a FIFO does not block; through the target's root for containers
        mode = os.stat(f"/proc/{pid}/root{path}" if path.startswith("/") else path).st_mode
    except OSError:
        return "file"
    return "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else \
        "directory" if stat.S_ISDIR(mode) else "file"


def _socket_peer(pid: int, inode: str) -> dict:
    for proto in ("tcp", "tcp6"):
        text = _read(f"/proc/{pid}/net/{proto}") or ""
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 9 and parts[9] == inode:
                return {"proto": proto, "local": _addr(parts[1]), "remote": _addr(parts[2])}
    text = _read(f"/proc/{pid}/net/unix") or ""
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 6 and parts[6] == inode:
            return {"proto": "unix", "local": parts[7] if len(parts) > 7 else ""}
    return {}


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    if len(host) == 8:
        ip = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
    else:
        ip = "[" + host + "]"
    return f"{ip}:{int(port, 16)}"


def decode_syscall(pid: int, text: str | None) -> dict | None:
    """/proc/PID/task/TID/syscall: the call a blocked thread is in and what it is on."""
    if not text:
        return None
    parts = text.split()
    if parts[0] == "running":
        return {"name": "running"}
    try:
        nr = int(parts[0])
    except ValueError:
        return None
    if nr < 0:
        return {"name": "none"}  # blocked, but not inside a system call (a page fault)
    args = [int(a, 16) for a in parts[1:7]]
    call = {"nr": nr, "name": SYSCALLS.get(nr, f"syscall {nr}")}
    name = call["name"]
    if name in FD_CALLS and args:
        call["fd"] = describe_fd(pid, args[0])
    elif name in PATH_CALLS and len(args) > PATH_CALLS[name]:
        path = _read_string(pid, args[PATH_CALLS[name]])
        if path is not None:
            call["path"] = path
            call["path_type"] = _file_type(pid, path)
    return call


def proc_snapshot(pid: int) -> dict:
    """Process and thread state from /proc, read before py-spy suspends anything (its
    ptrace stop restarts the system calls a thread is blocked in)."""
    if not system.has_proc():
        return _psutil_snapshot(pid)
    fields = _stat_fields(_read(f"/proc/{pid}/stat"))
    if not fields:
        return {"time": time.monotonic(), "gone": True}
    snap = {"time": time.monotonic(), "state": fields[0], "ppid": int(fields[1]),
            "pgrp": int(fields[2]), "tty_nr": int(fields[4]), "tpgid": int(fields[5]),
            "majflt": int(fields[9]), "threads": {}}
    for tid in sorted(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}/task") else []:
        base = f"/proc/{pid}/task/{tid}"
        tf = _stat_fields(_read(f"{base}/stat"))
        if not tf:
            continue
        comm = (_read(f"{base}/comm") or "").strip()
        schedstat = (_read(f"{base}/schedstat") or "0 0 0").split()
        snap["threads"][int(tid)] = {
            "comm": comm, "state": tf[0], "cpu_s": (int(tf[11]) + int(tf[12])) / TICK,
            "wait_s": int(schedstat[1]) / 1e9 if len(schedstat) > 1 else 0.0,
            "wchan": (_read(f"{base}/wchan") or "").strip() or None,
            "syscall": decode_syscall(pid, _read(f"{base}/syscall"))}
    status = _read(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmSwap"):
            snap[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
        elif key in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
            snap[key] = int(value.strip(), 16)
        elif key == "TracerPid":
            snap["tracer_pid"] = int(value)
    vmstat = _read("/proc/vmstat") or ""
    snap["pswpin"] = snap["pswpout"] = 0
    for line in vmstat.splitlines():
        key, _, value = line.partition(" ")
        if key in ("pswpin", "pswpout"):
            snap[key] = int(value)
    snap["throttle"] = cgroup_throttle(pid)
    return snap


STATUS_LETTER = {"running": "R", "sleeping": "S", "idle": "S", "disk-sleep": "D",
                 "stopped": "T", "tracing-stop": "t", "zombie": "Z"}


def _psutil_snapshot(pid: int) -> dict:
    """Where there is no /proc (macOS): the process state and its CPU time from psutil.
    Thread ids there do not match py-spy's, so the process's CPU stands in for each
    thread's (`proc_cpu_s`); there is no wchan, system call or cgroup."""
    try:
        proc = psutil.Process(pid)
        letter = STATUS_LETTER.get(proc.status(), "S")
        cpu = proc.cpu_times()
        rss = proc.memory_info().rss
        ppid = proc.ppid()
    except psutil.Error:
        return {"time": time.monotonic(), "gone": True}
    return {"time": time.monotonic(), "state": letter, "ppid": ppid, "pgrp": 0, "tty_nr": 0,
            "tpgid": -1, "majflt": 0, "pswpin": 0, "pswpout": 0, "threads": {},
            "proc_cpu_s": cpu.user + cpu.system, "vmrss_mb": round(rss / 2**20, 1),
            "throttle": None}


def thread_cpu(pid: int) -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each thread, and seconds spent waiting for a CPU."""
    cpu, wait = {}, {}
    tasks = f"/proc/{pid}/task"
    for tid in os.listdir(tasks) if system.has_proc() and os.path.isdir(tasks) else []:
        tf = _stat_fields(_read(f"/proc/{pid}/task/{tid}/stat"))
        if tf:
            cpu[int(tid)] = (int(tf[11]) + int(tf[12])) / TICK
        sched = (_read(f"/proc/{pid}/task/{tid}/schedstat") or "").split()
        if len(sched) > 1:
            wait[int(tid)] = int(sched[1]) / 1e9
    return {"cpu_s": cpu, "wait_s": wait}


def cpu_shares(samples: list[dict], key: str = "cpu_s") -> dict[int, float]:
    """Each thread's share of CPU time (`cpu_s`) or of waiting for a CPU (`wait_s`)
    over the windows in which the target ran freely."""
    used: dict[int, float] = {}
    wall = 0.0
    for a, b in zip(samples, samples[1:]):
        start = a.get("resumed") or {"time": a["time"], key: {}}
        wall += b["time"] - start["time"]
        for tid, t in b["threads"].items():
            before = start[key].get(tid, a["threads"].get(tid, {}).get(key))
            if before is not None:
                used[tid] = used.get(tid, 0.0) + max(0.0, t[key] - before)
    return {tid: u / wall for tid, u in used.items()} if wall > 0 else {}


def cgroup_throttle(pid: int) -> dict | None:
    """The CPU quota counters of the target's cgroup (v1 cpu controller or v2)."""
    text = _read(f"/proc/{pid}/cgroup") or ""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates = [f"/sys/fs/cgroup{path}", f"/sys/fs/cgroup/unified{path}"]
        elif "cpu" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/{controllers}{path}", f"/sys/fs/cgroup/cpu{path}",
                          f"/sys/fs/cgroup/cpu,cpuacct{path}"]
        else:
            continue
        for folder in candidates:
            counters = _read(f"{folder}/cpu.stat")
            if not counters:
                continue
            values = dict(line.split() for line in counters.splitlines() if " " in line)
            if "nr_throttled" not in values:
                continue
            quota = _read(f"{folder}/cpu.cfs_quota_us") or _read(f"{folder}/cpu.max")
            throttled = (int(values.get("throttled_time", 0)) / 1e9
                         if "throttled_time" in values else
                         int(values.get("throttled_usec", 0)) / 1e6)
            return {"cgroup": folder, "nr_throttled": int(values["nr_throttled"]),
                    "throttled_s": throttled, "quota": (quota or "").strip()}
    return None


def runtimes(pid: int) -> list[dict]:
    """OpenMP and BLAS libraries mapped into the target (/proc/PID/maps; lsof on
    macOS), one per path."""
    seen: dict[str, dict] = {}
    for path in system.mapped_files(pid):
        name = os.path.basename(path)
        family = openmp_family(name)
        kind = "openmp" if family else "blas" if re.match(
            r"lib(openblas|scipy_openblas|mkl_rt|mkl_core|blis|accelerate)", name) else None
        if kind and path not in seen:
            seen[path] = {"path": path, "api": kind, "family": family or name.split(".")[0]}
    return list(seen.values())


def environ(pid: int) -> dict:
    """The environment a process started with: /proc, else psutil (macOS)."""
    if not system.has_proc():
        try:
            return psutil.Process(pid).environ()
        except psutil.Error:
            return {}
    raw = _read(f"/proc/{pid}/environ") or ""
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


# ---------------------------------------------------------------- stacks

def _tool(name: str) -> str | None:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


def pyspy(pid: int, native: bool = True, timeout: float = PYSPY_TIMEOUT_S,
          blocking: bool = True) -> list | None:
    """py-spy's JSON dump (innermost frame first per thread), or None when it fails.
    A stopped process cannot be suspended: then Python frames only, without stopping it."""
    exe = _tool("py-spy")
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
    exe = _tool("pystack")
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


# ---------------------------------------------------------------- sampling

def sample(pid: int, samples: int = 5, interval: float = 1.0, ignore: set[int] = frozenset(),
           use_pystack: bool = True) -> list[dict]:
    """`samples` snapshots of /proc and py-spy, `interval` seconds apart."""
    out = []
    for i in range(samples):
        started = time.monotonic()
        snap = proc_snapshot(pid)
        if snap.get("gone"):
            break
        stopped = snap["state"] in "Tt"
        # Native unwinding costs ~0.5 s per dump on a torch process (symbols of
        # libtorch): Python frames, which say whether a thread moves, in every sample,
        # native frames, which say where it waits, in the last one.
        last = i == samples - 1
        stacks = pyspy(pid, native=last and not stopped, blocking=not stopped)
        snap["stacks"] = {}
        for t in stacks or []:
            tid = t.get("os_thread_id") or t.get("thread_id")
            if tid in ignore:
                continue
            snap["stacks"][tid] = {"name": t.get("thread_name") or "", "owns_gil": t.get("owns_gil"),
                                   "active": t.get("active"), "frames": frames_of(t)}
        snap["pyspy"] = stacks is not None
        for tid in ignore:
            snap["threads"].pop(tid, None)
        # pystack (~0.5 s more) only where it can confirm what py-spy suggests: a
        # thread that holds the GIL inside native code, others perhaps waiting for it.
        if last and use_pystack and not stopped and any(
                t.get("owns_gil") and t.get("frames") and t["frames"][0].get("module")
                for t in stacks or []):
            snap["pystack"] = pystack(pid)
        # py-spy suspends the target while it unwinds: CPU shares are measured only over
        # the free-running windows, from here to the next snapshot.
        snap["resumed"] = {"time": time.monotonic(), **thread_cpu(pid)}
        if "proc_cpu_s" in snap:
            snap["resumed"]["proc_cpu_s"] = _psutil_snapshot(pid).get("proc_cpu_s", 0.0)
        out.append(snap)
        if i < samples - 1:
            time.sleep(interval)
    return out


def context(target: Target, first: dict, last: dict) -> dict:
    """Facts beyond the samples: parent, children, peers of a collective, the run's
    heartbeats, the mapped runtimes."""
    pid = target.pid
    ctx = {"pid": pid, "runtimes": runtimes(pid), "environ": {}, "children": [], "parent": None,
           "peers": [], "run": None, "cmdline": " ".join(_cmdline(pid))[:200]}
    env = environ(pid)
    ctx["environ"] = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                          "MASTER_PORT", "KMP_DUPLICATE_LIB_OK",
                                          "OMP_NUM_THREADS") if k in env}
    try:
        proc = psutil.Process(pid)
        parent = proc.parent()
        if parent:
            ctx["parent"] = {"pid": parent.pid, "cmdline": " ".join(parent.cmdline())[:200],
                             "exe": parent.exe(), "runtimes": runtimes(parent.pid),
                             "threads": parent.num_threads()}
        ctx["exe"] = proc.exe()
        ctx["create_time"] = proc.create_time()
        for child in proc.children():
            ctx["children"].append(_peek(child.pid))
    except psutil.Error:
        pass
    if "MASTER_PORT" in env and "RANK" in env:
        ctx["peers"] = collective_peers(pid, env)
    if target.run_dir is not None:
        ctx["run"] = run_facts(target, first, last)
    return ctx


def _peek(pid: int) -> dict:
    """One quick look at another process: state, CPU and its Python frames."""
    state = _state(pid)
    info = {"pid": pid, "state": state, "cmdline": " ".join(_cmdline(pid))[:120]}
    if state not in ("Z", "X", "gone"):
        stacks = pyspy(pid, native=False, timeout=5, blocking=False)
        if stacks:
            main = next((t for t in stacks if t.get("thread_name") == "MainThread"), stacks[0])
            info["frames"] = [render(f) for f in frames_of(main)][:6]
            info["all_frames"] = [f["name"] + " " + f["file"] for t in stacks
                                  for f in frames_of(t)]
    return info


def _state(pid: int) -> str:
    """A process's state letter (R, S, D, T, Z), or "gone": /proc, else psutil (macOS,
    where a live worker would otherwise read as gone)."""
    if system.has_proc():
        fields = _stat_fields(_read(f"/proc/{pid}/stat"))
        return fields[0] if fields else "gone"
    try:
        return STATUS_LETTER.get(psutil.Process(pid).status(), "S")
    except psutil.Error:
        return "gone"


def collective_peers(pid: int, env: dict) -> list[dict]:
    """The other ranks of the same torch.distributed job on this machine: the processes
    whose environment has the same MASTER_ADDR:MASTER_PORT (torchrun sets them)."""
    peers = []
    key = (env.get("MASTER_ADDR"), env.get("MASTER_PORT"))
    for other in psutil.pids():
        if other == pid:
            continue
        e = environ(other)
        if (e.get("MASTER_ADDR"), e.get("MASTER_PORT")) == key and "RANK" in e:
            info = _peek(other)
            info["rank"] = int(e["RANK"])
            peers.append(info)
    return sorted(peers, key=lambda p: p["rank"])


def run_facts(target: Target, first: dict, last: dict) -> dict:
    from lnsp.rundir import RunDir, read_json

    rd = RunDir(target.run_dir)
    now = time.time()
    beat = read_json(rd.heartbeat) or {}
    config = read_json(rd.config) or {}
    facts = {"run_dir": str(rd.root), "heartbeat": beat,
             "heartbeat_age_s": round(now - beat["time"], 1) if beat.get("time") else None,
             "stall_timeout": config.get("stall_timeout"), "ranks": []}
    for r in target.run.get("ranks", []):
        b = read_json(rd.rank_heartbeat(r["rank"])) or {}
        facts["ranks"].append({"rank": r["rank"], "pid": r.get("pid"), "step": b.get("step"),
                               "phase": b.get("phase"),
                               "age_s": round(now - b["time"], 1) if b.get("time") else None})
    return facts


# ---------------------------------------------------------------- folding

def _synthesize_threads(samples: list[dict]) -> None:
    """Thread records from the stacks, for snapshots that have none (no /proc)."""
    for s in samples:
        for tid, st in s.get("stacks", {}).items():
            s["threads"].setdefault(tid, {"comm": st["name"], "state": s["state"],
                                          "cpu_s": 0.0, "wait_s": 0.0, "wchan": None,
                                          "syscall": None})


def _process_share(samples: list[dict]) -> float:
    used = wall = 0.0
    for a, b in zip(samples, samples[1:]):
        start = a.get("resumed") or {}
        t0, c0 = start.get("time", a["time"]), start.get("proc_cpu_s", a["proc_cpu_s"])
        used += max(0.0, b["proc_cpu_s"] - c0)
        wall += b["time"] - t0
    return used / wall if wall > 0 else 0.0


def fold(samples: list[dict]) -> dict:
    """Per thread: its stacks counted across samples, its CPU share and its motion:
    stuck (same frames, no CPU), spinning (same frames, CPU), changing, stopped."""
    if not samples:
        return {}
    first, last = samples[0], samples[-1]
    wall = max(last["time"] - first["time"], 1e-6)
    threads = {}
    shares, waits = cpu_shares(samples), cpu_shares(samples, "wait_s")
    if "proc_cpu_s" in last:  # no per-thread figures: every thread gets the process's share
        _synthesize_threads(samples)
        share = _process_share(samples)
        shares = {tid: share for tid in last["threads"]}
    for tid, t_last in last["threads"].items():
        cpu, wait = shares.get(tid, 0.0), waits.get(tid, 0.0)
        # What the thread asks for: on a crowded machine a spinning thread gets less
        # than a core but waits in the run queue for the rest.
        demand = cpu + wait
        keys, folded, stacks = [], {}, []
        for s in samples:
            st = s["stacks"].get(tid)
            if st is None:
                continue
            key = stack_key(st["frames"])
            keys.append(key)
            stacks.append(st)
            line = ";".join(render(f) for f in reversed(st["frames"]) if not f["native"])
            folded[line] = folded.get(line, 0) + 1
        states = [s["threads"][tid]["state"] for s in samples if tid in s["threads"]]
        same = len(keys) == len(samples) and len(set(keys)) == 1
        if states and all(x in "Tt" for x in states):
            motion = "stopped"
        elif len(samples) < 2:
            motion = "unknown"
        elif same and demand < 0.2:
            motion = "stuck"
        elif same:
            motion = "spinning"
        elif len(set(keys)) > 1:
            motion = "changing"
        else:
            motion = "stuck" if demand < 0.2 else "busy"
        latest = stacks[-1] if stacks else {"name": t_last["comm"], "frames": [],
                                             "owns_gil": None}
        python = [f for f in latest["frames"] if not f["native"]]
        threads[tid] = {
            "tid": tid, "name": latest["name"] or t_last["comm"], "motion": motion,
            "cpu": round(cpu, 3), "runqueue_wait": round(wait, 3), "demand": round(demand, 3), "states": states,
            "wchan": t_last["wchan"], "syscall": t_last["syscall"],
            "syscalls": [s["threads"][tid]["syscall"] for s in samples if tid in s["threads"]],
            "frames": latest["frames"], "python": python,
            "owns_gil": [st.get("owns_gil") for st in stacks],
            "folded": folded, "is_main": tid == first.get("pid_main")}
    return threads


# ---------------------------------------------------------------- the whole diagnosis

def diagnose(target: str | Target, samples: int = 5, interval: float = 1.0, root: str = "runs",
             ignore: set[int] = frozenset()) -> dict:
    """The verdict for a PID or run directory: kind, summary, evidence, fix, samples."""
    from lnsp.diagnose import hangs

    from lnsp.rundir import RunDir, read_json

    t = target if isinstance(target, Target) else resolve(target, root)
    before = (read_json(RunDir(t.run_dir).heartbeat) or {}) if t.run_dir else {}
    taken = sample(t.pid, max(1, samples), interval, ignore)
    if not taken:
        raise BadTarget(f"process {t.pid} ended before it could be sampled")
    for s in taken:
        s["pid_main"] = t.pid
    ctx = context(t, taken[0], taken[-1])
    if ctx["run"] is not None:
        ctx["run"]["step_before"] = before.get("step")
    threads = fold(taken)
    facts = hangs.Facts(pid=t.pid, samples=taken, threads=threads, ctx=ctx)
    verdict = hangs.judge(facts)
    verdict["samples"] = compact(taken, threads)
    verdict["pid"] = t.pid
    verdict["folded"] = folded_text(threads)
    if t.run_dir is not None:
        verdict["run_dir"] = str(t.run_dir)
    return verdict


def compact(samples: list[dict], threads: dict) -> list[dict]:
    """The samples in --json: per thread its state, CPU, call and top frames."""
    out = []
    for s in samples:
        out.append({"state": s["state"], "vmrss_mb": s.get("vmrss_mb"),
                    "vmswap_mb": s.get("vmswap_mb"), "majflt": s["majflt"],
                    "throttle": s.get("throttle"), "pystack": s.get("pystack"),
                    "threads": [{"tid": tid, "name": (s["stacks"].get(tid) or {}).get("name")
                                 or th["comm"], "state": th["state"], "cpu_s": th["cpu_s"],
                                 "wchan": th["wchan"], "syscall": th["syscall"],
                                 "owns_gil": (s["stacks"].get(tid) or {}).get("owns_gil"),
                                 "frames": [render(f) for f in
                                            (s["stacks"].get(tid) or {}).get("frames", [])][:12]}
                                for tid, th in s["threads"].items()]})
    return out


def text(verdict: dict) -> str:
    lines = [f"VERDICT {verdict['kind']}: {verdict['summary']}"]
    lines += [f"  {e}" for e in verdict["evidence"]]
    lines.append(f"fix: {verdict['fix']}")
    return "\n".join(lines)


def folded_text(threads: dict) -> str:
    """Folded stacks (flame-graph format: frames outermost first, then the count)."""
    rows = []
    for tid, th in threads.items():
        for line, n in th["folded"].items():
            rows.append(f"{th['name'] or tid} [{tid}] {th['motion']} cpu={th['cpu']:.2f};"
                        f"{line} {n}")
    return "\n".join(rows) + "\n"


def report(target: str, samples: int = 5, interval: float = 1.0, as_json: bool = False,
           root: str = "runs") -> str:
    """What `lnsp diagnose` prints."""
    verdict = diagnose(target, samples, interval, root)
    if as_json:
        return json.dumps({k: verdict[k] for k in ("kind", "summary", "evidence", "fix",
                                                   "samples", "pid", "folded")}, indent=2)
    return text(verdict)


LLDB_FRAME = re.compile(r"frame #\d+: 0x[0-9a-f]+ (?P<module>[^`\s]+)`(?P<name>.+?)(?: \+ \d+)?$")


def judge_stack_text(text: str, state: str = "S") -> dict:
    """The verdict for one thread's backtrace captured elsewhere (lldb `bt` on macOS,
    where /proc and py-spy's native mode do not exist): two identical samples of a
    thread that used no CPU, judged by the same catalog."""
    from lnsp.diagnose import hangs

    frames = []
    for line in text.splitlines():
        m = LLDB_FRAME.search(line.strip())
        if m:
            frames.append({"name": m["name"].strip(), "file": m["module"], "path": m["module"],
                           "line": 0, "native": True})
    if not frames:
        raise BadTarget("no lldb frames (`frame #N: 0x... module`symbol`) in the text")
    tid = 1
    taken = []
    for i in range(2):
        thread = {"comm": "main", "state": state, "cpu_s": 0.0, "wait_s": 0.0, "wchan": None,
                  "syscall": None}
        taken.append({"time": float(i), "state": state, "ppid": 0, "pgrp": tid, "tty_nr": 0,
                      "tpgid": -1, "majflt": 0, "pswpin": 0, "pswpout": 0,
                      "threads": {tid: thread}, "throttle": None, "pyspy": True,
                      "stacks": {tid: {"name": "main", "owns_gil": None, "frames": frames}}})
    threads = fold(taken)
    return hangs.judge(hangs.Facts(pid=tid, samples=taken, threads=threads,
                                   ctx={"runtimes": [], "environ": {}}))
