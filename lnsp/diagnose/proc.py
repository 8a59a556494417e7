"""A process's state read from /proc (psutil where there is no /proc: macOS): its
threads, what each is blocked in and on which file, CPU, cgroup throttling, the
runtimes it maps, its environment; read from outside, without stopping it."""

from __future__ import annotations

import os
import platform
import re
import stat
import time

import psutil

from lnsp import procs, system
from lnsp.diagnose.stacks import frames_of, pyspy, render
from lnsp.system import openmp_family, read_file

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

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
        text = read_file(f"/proc/{pid}/net/{proto}") or ""
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 9 and parts[9] == inode:
                return {"proto": proto, "local": _addr(parts[1]), "remote": _addr(parts[2])}
    text = read_file(f"/proc/{pid}/net/unix") or ""
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
        return psutil_snapshot(pid)
    fields = _stat_fields(read_file(f"/proc/{pid}/stat"))
    if not fields:
        return {"time": time.monotonic(), "gone": True}
    snap = {"time": time.monotonic(), "state": fields[0], "ppid": int(fields[1]),
            "pgrp": int(fields[2]), "tty_nr": int(fields[4]), "tpgid": int(fields[5]),
            "majflt": int(fields[9]), "threads": {}}
    for tid in sorted(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}/task") else []:
        base = f"/proc/{pid}/task/{tid}"
        tf = _stat_fields(read_file(f"{base}/stat"))
        if not tf:
            continue
        comm = (read_file(f"{base}/comm") or "").strip()
        schedstat = (read_file(f"{base}/schedstat") or "0 0 0").split()
        snap["threads"][int(tid)] = {
            "comm": comm, "state": tf[0], "cpu_s": (int(tf[11]) + int(tf[12])) / TICK,
            "wait_s": int(schedstat[1]) / 1e9 if len(schedstat) > 1 else 0.0,
            "wchan": (read_file(f"{base}/wchan") or "").strip() or None,
            "syscall": decode_syscall(pid, read_file(f"{base}/syscall"))}
    status = read_file(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmSwap"):
            snap[key.lower() + "_mb"] = round(int(value.split()[0]) / 1024, 1)
        elif key in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
            snap[key] = int(value.strip(), 16)
        elif key == "TracerPid":
            snap["tracer_pid"] = int(value)
    vmstat = read_file("/proc/vmstat") or ""
    snap["pswpin"] = snap["pswpout"] = 0
    for line in vmstat.splitlines():
        key, _, value = line.partition(" ")
        if key in ("pswpin", "pswpout"):
            snap[key] = int(value)
    snap["throttle"] = system.cgroup_cpu(pid)
    return snap


STATUS_LETTER = {"running": "R", "sleeping": "S", "idle": "S", "disk-sleep": "D",
                 "stopped": "T", "tracing-stop": "t", "zombie": "Z"}


def psutil_snapshot(pid: int) -> dict:
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
        tf = _stat_fields(read_file(f"/proc/{pid}/task/{tid}/stat"))
        if tf:
            cpu[int(tid)] = (int(tf[11]) + int(tf[12])) / TICK
        sched = (read_file(f"/proc/{pid}/task/{tid}/schedstat") or "").split()
        if len(sched) > 1:
            wait[int(tid)] = int(sched[1]) / 1e9
    return {"cpu_s": cpu, "wait_s": wait}


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
    raw = read_file(f"/proc/{pid}/environ") or ""
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def peek(pid: int) -> dict:
    """One quick look at another process: state, CPU and its Python frames."""
    state = _state(pid)
    info = {"pid": pid, "state": state, "cmdline": " ".join(procs.cmdline(pid))[:120]}
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
        fields = _stat_fields(read_file(f"/proc/{pid}/stat"))
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
            info = peek(other)
            info["rank"] = int(e["RANK"])
            peers.append(info)
    return sorted(peers, key=lambda p: p["rank"])
