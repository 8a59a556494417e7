"""The catalog of known hangs: each rule is a kind, an evidence predicate over the
folded samples of lnsp.diagnose.diagnosis, a one-line explanation and the fix. The first rule
whose evidence holds gives the verdict; none holding gives `unknown` with the top
frames, never a guess."""

from __future__ import annotations

import linecache
import re
from dataclasses import dataclass, field

LOCK_FRAME = re.compile(r"acquire_lock|rlock_acquire|PyThread_acquire_lock|sem_clockwait|"
                        r"sem_timedwait|sem_wait")
GIL_WAIT_FRAME = re.compile(r"take_gil|PyEval_RestoreThread|PyEval_AcquireThread|"
                            r"PyGILState_Ensure|PyCOND_TIMEDWAIT")
COLLECTIVE_FRAME = re.compile(r"gloo::|c10d::|ProcessGroupGloo|ProcessGroupNCCL|ncclGroup|"
                              r"nccl[A-Z]|ucc_")
COLLECTIVES = {"all_reduce", "barrier", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "reduce",
               "all_to_all", "monitored_barrier", "send", "recv", "wait"}
DATALOADER_FUNCS = {"_next_data", "_get_data", "_try_get_data", "__next__"}
MPS_FRAME = re.compile(r"waitUntilCompleted|MPSStream|at::mps::|commitAndWait|"
                       r"MTLCommandBuffer|mps_synchronize")
# Python's own waits that are not a lock taken by user code (a timed Event.wait loops).
LIBRARY_WAITS = {"threading.py", "queue.py", "connection.py", "selectors.py", "thread.py",
                 "_base.py", "synchronize.py"}


@dataclass
class Facts:
    pid: int
    samples: list
    threads: dict
    ctx: dict
    notes: list = field(default_factory=list)

    @property
    def main(self) -> dict | None:
        return self.threads.get(self.pid)

    @property
    def wall(self) -> float:
        return max(self.samples[-1]["time"] - self.samples[0]["time"], 1e-6)

    def python_threads(self) -> list[dict]:
        """Threads running Python code, the main thread first."""
        ts = [t for t in self.threads.values() if t["python"]]
        return sorted(ts, key=lambda t: (t["tid"] != self.pid, t["tid"]))

    def idle(self) -> bool:
        """Nothing moves: no Python thread changes frames while using the CPU, and an
        lnsp heartbeat (if any) did not advance."""
        return not self.progressing()

    def progressing(self) -> bool:
        run = self.ctx.get("run")
        if run and run.get("step_before") is not None:
            if (run["heartbeat"] or {}).get("step") != run["step_before"]:
                return True
        return any(t["motion"] == "changing" and t["cpu"] >= 0.05
                   for t in self.threads.values())

    def runtime_families(self) -> dict[str, list[str]]:
        families: dict[str, list[str]] = {}
        for r in self.ctx.get("runtimes", []):
            if r["api"] == "openmp":
                families.setdefault(r["family"], []).append(r["path"])
        return families


def where(t: dict) -> str:
    """The innermost Python frame of a thread with its source line, or its top frame."""
    if t["python"]:
        f = t["python"][0]
        source = linecache.getline(f["path"], f["line"]).strip() if f["line"] else ""
        return f"{f['name']} ({f['file']}:{f['line']})" + (f" `{source}`" if source else "")
    if t["frames"]:
        f = t["frames"][0]
        return f"{f['name']} ({f['file']})"
    return f"kernel {t['wchan'] or '?'}"


def label(t: dict, f: Facts) -> str:
    return "the main thread" if t["tid"] == f.pid else f"thread {t['name'] or t['tid']} ({t['tid']})"


def thread_line(t: dict) -> str:
    call = t["syscall"] or {}
    return (f"{t['name'] or t['tid']} [{t['tid']}] {t['motion']}, cpu {100 * t['cpu']:.0f}%"
            f" (+{100 * t['runqueue_wait']:.0f}% waiting for a core), "
            f"state {''.join(sorted(set(t['states']))) or '?'}, wchan {t['wchan'] or '-'}, "
            f"syscall {call.get('name', '-')}: {where(t)}")


def frames_block(t: dict, n: int = 8) -> list[str]:
    return [f"    {'C ' if fr['native'] else 'py'} {_short(fr['name'])} ({fr['file']}"
            f"{':' + str(fr['line']) if fr['line'] else ''})" for fr in t["frames"][:n]]


def _short(name: str, limit: int = 100) -> str:
    """A C++ symbol cut to a readable length (template arguments run for pages)."""
    return name if len(name) <= limit else name[:limit] + "..."


def native_names(t: dict, n: int = 40) -> list[str]:
    return [fr["name"] for fr in t["frames"][:n] if fr["native"]]


def openmp_frames(t: dict) -> list[str]:
    """Frames inside an OpenMP runtime (by library file, since its internal symbols are
    often stripped), named by symbol when there is one."""
    from lnsp.system import openmp_family

    out = []
    for fr in t["frames"]:
        if fr["native"] and (openmp_family(fr["file"]) or re.match(r"GOMP_|gomp_|__kmp", fr["name"])):
            out.append(f"{fr['name']} ({fr['file']})" if not fr["name"].startswith("0x")
                       else fr["file"])
    # The first frame with a symbol says more than the stripped ones above it.
    return sorted(out, key=lambda x: "(" not in x)


def first_call(t: dict) -> dict:
    """The thread's system call as seen before any py-spy suspension restarted it."""
    for call in t["syscalls"]:
        if call and call.get("name") not in (None, "running", "none", "restart_syscall"):
            return call
    return t["syscall"] or {}


# ---------------------------------------------------------------- the rules

def stopped(f: Facts):
    states = [s["state"] for s in f.samples]
    if not all(s in "Tt" for s in states):
        return None
    last = f.samples[-1]
    main = f.main or {}
    call = first_call(main) if main else {}
    fd = call.get("fd") or {}
    evidence = [f"process state {states[-1]} in {len(states)}/{len(states)} samples "
                f"(/proc/{f.pid}/stat)", f"wchan {main.get('wchan') or '-'}"]
    if last.get("tracer_pid") or states[-1] == "t":
        who = last.get("tracer_pid")
        return (f"the process is stopped by a tracer (pid {who}): a debugger holds it.",
                evidence + [f"TracerPid {who}"],
                "continue or detach the debugger (gdb: `continue` / `detach`).")
    background = last["tty_nr"] != 0 and last["tpgid"] != last["pgrp"]
    evidence.append(f"controlling terminal {'yes' if last['tty_nr'] else 'none'}; process group "
                    f"{last['pgrp']}, terminal's foreground group {last['tpgid']}"
                    + (" (a background job)" if background else ""))
    if call:
        evidence.append(f"stopped in {call.get('name')}"
                        + (f" on fd {fd.get('fd')} -> {fd.get('target')}" if fd else ""))
    if background and fd.get("type") == "terminal" and call.get("name") == "read":
        return ("the process is a background job stopped by SIGTTIN: it read from the "
                f"terminal {fd.get('target')}.", evidence,
                f"`kill -CONT {f.pid}` only lasts until its next read: start it detached from "
                "the terminal: `nohup CMD < /dev/null > log 2>&1 &` (or in tmux: "
                "lnsp launch nohup|tmux).")
    if background and fd.get("type") == "terminal" and call.get("name") in ("write", "ioctl"):
        return ("the process is a background job stopped by SIGTTOU: it wrote to (or set "
                f"up) the terminal {fd.get('target')} while `stty tostop` is on.", evidence,
                f"`kill -CONT {f.pid}` only lasts until its next write: redirect its output "
                "(`nohup CMD < /dev/null > log 2>&1 &`), or `stty -tostop`.")
    return (f"the process is stopped (state T) by SIGSTOP or SIGTSTP (Ctrl-Z, `kill -STOP`, a "
            "job scheduler), not by touching the terminal.", evidence,
            f"`kill -CONT {f.pid}` (or `fg` in the shell that stopped it); find who sends "
            "SIGSTOP if it recurs.")


def throttled(f: Facts):
    a, b = f.samples[0].get("throttle"), f.samples[-1].get("throttle")
    if not a or not b:
        return None
    periods = b["nr_throttled"] - a["nr_throttled"]
    share = (b["throttled_s"] - a["throttled_s"]) / f.wall
    runnable = [t for t in f.threads.values() if "R" in t["states"]]
    if periods <= 0 or share < 0.2 or not runnable:
        return None
    busiest = max(runnable, key=lambda t: t["cpu"])
    return (f"the process is runnable but its cgroup's CPU quota ({b['quota']}) throttles it: "
            f"throttled {periods} times in {f.wall:.1f}s, {100 * share:.0f}% of the time.",
            [f"cgroup {b['cgroup']}: nr_throttled +{periods}, throttled_time "
             f"+{b['throttled_s'] - a['throttled_s']:.2f}s",
             f"busiest thread: {thread_line(busiest)}"],
            "raise the CPU quota (docker --cpus, cpu.max / cpu.cfs_quota_us) or use fewer "
            "threads than the quota allows (--threads safe, OMP_NUM_THREADS).")


def swapping(f: Facts):
    a, b = f.samples[0], f.samples[-1]
    majflt = (b["majflt"] - a["majflt"]) / f.wall
    swapin = (b["pswpin"] - a["pswpin"]) / f.wall
    if majflt < 20 or (swapin <= 0 and not b.get("vmswap_mb")):
        return None
    return (f"the process is swapping: {majflt:.0f} major page faults per second with "
            f"{b.get('vmswap_mb', 0):.0f} MB of it in swap.",
            [f"VmRSS {b.get('vmrss_mb')} MB, VmSwap {b.get('vmswap_mb')} MB",
             f"system swap-in {swapin:.0f} pages/s, swap-out "
             f"{(b['pswpout'] - a['pswpout']) / f.wall:.0f} pages/s"]
            + [thread_line(t) for t in f.python_threads()[:2]],
            "use less memory (smaller --batch-size, fewer workers, an IVF index), stop other "
            "jobs, or run where the working set fits in RAM.")


def running(f: Facts):
    if not f.progressing():
        return None
    run = f.ctx.get("run") or {}
    beat = run.get("heartbeat") or {}
    busy = sorted(f.threads.values(), key=lambda t: -t["cpu"])[:3]
    evidence = [thread_line(t) for t in busy]
    if run.get("step_before") is not None:
        evidence.insert(0, f"heartbeat step {run['step_before']} -> {beat.get('step')} while "
                           f"sampling (phase {beat.get('phase')})")
        if beat.get("step") == run["step_before"] and run.get("stall_timeout") and \
                (run.get("heartbeat_age_s") or 0) > run["stall_timeout"]:
            return None  # moving but no step for longer than the budget: slow
    cpu = sum(t["cpu"] for t in f.threads.values())
    return (f"the process is working, not hung: its frames change and it uses "
            f"{100 * cpu:.0f}% CPU.", evidence,
            "nothing to fix; if it is slower than expected, `lnsp probe` and `lnsp bench` "
            "time each phase.")


def slow(f: Facts):
    run = f.ctx.get("run") or {}
    if not run or not any(t["motion"] == "changing" for t in f.threads.values()):
        return None
    age = run.get("heartbeat_age_s")
    return (f"the run works (frames change) but its heartbeat has not advanced for {age}s: "
            "one step takes longer than the stall budget.",
            [f"heartbeat {run.get('heartbeat')}"] + [thread_line(t) for t in f.python_threads()[:3]],
            "a bigger --stall-timeout, or a smaller step (--batch-size, --k); "
            "`lnsp probe` shows which phase is slow.")


def collective_wait(f: Facts):
    waiting = []
    for t in f.python_threads():
        names = [fr["name"] for fr in t["frames"]]
        py = [(fr["name"].split(".")[-1], fr["file"]) for fr in t["python"]]
        if t["motion"] in ("stuck", "spinning") and (
                any(COLLECTIVE_FRAME.search(n) for n in names) or
                any(file.endswith("distributed_c10d.py") and name in COLLECTIVES for name, file in py)):
            waiting.append(t)
    if not waiting or f.progressing():
        return None
    env = f.ctx.get("environ", {})
    rank, world = env.get("RANK", "?"), env.get("WORLD_SIZE", "?")
    op = next((fr["name"].split(".")[-1] for t in waiting for fr in t["python"]
               if fr["file"].endswith("distributed_c10d.py")), "a collective")
    every = [n.lower() for t in f.threads.values() for n in native_names(t)]
    backend = "NCCL" if any("nccl" in n for n in every) else \
        "gloo" if any("gloo" in n for n in every) else "c10d"
    peers = f.ctx.get("peers", [])
    evidence = [thread_line(t) for t in waiting[:2]] + frames_block(waiting[0], 10)
    missing, arrived = [], [str(rank)]
    for p in peers:
        inside = any("distributed_c10d.py" in fr or COLLECTIVE_FRAME.search(fr)
                     for fr in p.get("all_frames", []))
        if inside:
            arrived.append(str(p["rank"]))
        else:
            missing.append(p)
            evidence.append(f"rank {p['rank']} (pid {p['pid']}, state {p['state']}) has not "
                            f"arrived: {'; '.join(p.get('frames', [])[:3]) or 'no stack'}")
    seen = {str(rank)} | {str(p["rank"]) for p in peers}
    absent = [str(r) for r in range(int(world))] if str(world).isdigit() else []
    absent = [r for r in absent if r not in seen]
    for r in (f.ctx.get("run") or {}).get("ranks", []):
        evidence.append(f"rank {r['rank']} heartbeat: step {r['step']}, phase {r['phase']}, "
                        f"{r['age_s']}s old")
    names = [str(p["rank"]) for p in missing] + [f"{r} (no process on this machine)" for r in absent]
    who = ("ranks not arrived: " + ", ".join(names)) if names else \
        "the ranks that have not arrived are not visible from here"
    return (f"rank {rank} of {world} waits in {op} ({backend}) for the other ranks; {who}.",
            evidence,
            "find why the missing rank stopped (`lnsp diagnose` on its PID); give the "
            "process group a timeout (init_process_group(timeout=...), lnsp --stall-timeout) "
            "so the wait ends with the rank named instead of hanging.")


def dataloader_worker(f: Facts):
    main = f.main
    if not main or main["motion"] not in ("stuck", "spinning", "busy") and not f.idle():
        return None
    funcs = {(fr["name"].split(".")[-1], fr["file"]) for fr in main["python"]}
    if not any(file.endswith("dataloader.py") and name in DATALOADER_FUNCS for name, file in funcs):
        return None
    if f.progressing():
        return None
    children = f.ctx.get("children", [])
    alive = [c for c in children if c["state"] not in ("Z", "X", "gone")]
    evidence = [thread_line(main)] + frames_block(main, 8)
    for c in children:
        evidence.append(f"worker pid {c['pid']} state {c['state']}: "
                        f"{'; '.join(c.get('frames', [])[:3]) or 'no stack'}")
    if not alive:
        summary = ("the main thread waits on the DataLoader's worker queue and no worker "
                   "process is alive: a worker died without the loader noticing.")
    else:
        w = alive[0]
        frames = w.get("frames") or ["?"]
        # The worker's own code under the library's waits (Event.wait, queue.get).
        top = next((fr for fr in frames if not re.search(
            r"\((threading|queue|selectors|connection|synchronize|thread)\.py|\(torch/", fr)),
            frames[0])
        summary = (f"the main thread waits on the DataLoader's worker queue; worker pid "
                   f"{w['pid']} is alive but stuck in {top}.")
    return (summary, evidence,
            "fix the worker's frame named above; give DataLoader a timeout= so a stuck "
            "worker raises instead of hanging; num_workers=0 runs the same code in the main "
            "process where a dump shows it; use the spawn start method after OpenMP work.")


def gil_held(f: Facts):
    if f.progressing():
        return None
    pystack = f.samples[-1].get("pystack") or {}
    holder = None
    for t in f.threads.values():
        gil = [g for g in t["owns_gil"] if g is not None]
        holds = (gil and all(gil) and len(gil) == len(f.samples)) or \
            "Has the GIL" in pystack.get(t["tid"], [])
        if holds and t["frames"] and t["frames"][0]["native"] and t["python"] and \
                t["motion"] in ("stuck", "spinning"):
            holder = t
    if holder is None:
        return None
    waiters = [t for t in f.python_threads() if t is not holder and (
        "Waiting for the GIL" in pystack.get(t["tid"], []) or
        any(GIL_WAIT_FRAME.search(n) for n in native_names(t)) or
        (native_names(t, 3) and "pthread_cond_timedwait" in native_names(t, 3)))]
    if not waiters:
        return None
    native_top = next(fr for fr in holder["frames"] if fr["native"])
    call = holder["python"][0]
    evidence = [f"GIL holder: {thread_line(holder)}"] + frames_block(holder, 10)
    evidence += [f"waits for the GIL: {thread_line(t)}" for t in waiters[:4]]
    if pystack:
        evidence.append("pystack: " + "; ".join(f"{tid} [{', '.join(v) or '-'}]"
                                                for tid, v in pystack.items()))
    return (f"{label(holder, f)} holds the GIL inside native code ({native_top['name']} in "
            f"{native_top['file']}, called from {where(holder)}) and {len(waiters)} other "
            f"thread(s), {label(waiters[0], f)} among them, wait for it.", evidence,
            "the native call must release the GIL while it waits (Py_BEGIN_ALLOW_THREADS, "
            "Cython `with nogil`, ctypes.CDLL rather than ctypes.PyDLL), or run it in a "
            "subprocess; report the frames above to the extension's authors.")


def deadlock(f: Facts):
    if f.progressing():
        return None
    blocked = []
    for t in f.python_threads():
        if t["motion"] != "stuck":
            continue
        top = t["python"][0]
        if top["file"].rsplit("/", 1)[-1] in LIBRARY_WAITS and not (top["file"] == "threading.py" and
                                                 top["name"].endswith("join")):
            continue
        if any(LOCK_FRAME.search(n) for n in native_names(t, 8)) or \
                (first_call(t).get("name") == "futex" and not t["frames"][0]["native"]):
            blocked.append(t)
    if not blocked:
        return None
    joins = [t for t in blocked if t["python"][0]["name"].endswith("join")]
    takers = [t for t in blocked if t not in joins]
    if not takers:
        return None
    evidence = [f"waits on a lock: {thread_line(t)}" for t in takers]
    evidence += [f"waits for a thread: {thread_line(t)}" for t in joins]
    if len(takers) >= 2:
        summary = ("threads wait on locks held by each other: " +
                   "; ".join(f"{label(t, f)} at {where(t)}" for t in takers[:3]) + ".")
    else:
        summary = (f"{label(takers[0], f)} waits forever on a lock at {where(takers[0])}, "
                   "which no running thread will release (taken twice, or held by a thread "
                   "that is stuck or gone).")
    return (summary, evidence,
            "take locks in one global order, hold them for short sections, use an RLock "
            "where a thread re-enters, and acquire(timeout=...) so a deadlock raises.")


def blocked_io(f: Facts):
    if f.progressing():
        return None
    for t in f.python_threads() or list(f.threads.values()):
        if t["motion"] not in ("stuck",) and "D" not in t["states"]:
            continue
        call = first_call(t)
        name = call.get("name")
        fd = call.get("fd") or {}
        if name in ("read", "pread64", "readv", "recvfrom", "recvmsg", "accept", "accept4",
                    "connect", "write", "writev", "sendto", "sendmsg", "fsync", "fdatasync") \
                and fd.get("target"):
            what = _describe(fd)
            kind = fd.get("type")
        elif call.get("path"):
            what = f"{call['path']} ({call.get('path_type', 'file')})"
            kind = call.get("path_type", "file")
        elif "D" in t["states"]:
            what, kind = "the disk or a network file system", "disk"
        else:
            continue
        verb = {"openat": "opening", "open": "opening", "stat": "stat() of",
                "newfstatat": "stat() of", "statx": "stat() of", "lstat": "stat() of",
                "connect": "connecting", "accept": "accepting on", "accept4": "accepting on",
                "write": "writing to", "writev": "writing to", "sendto": "sending on",
                "sendmsg": "sending on", "fsync": "syncing", "fdatasync": "syncing"}.get(
                    name, "reading from" if name else "waiting on")
        state = "uninterruptible (D)" if "D" in t["states"] else "sleeping (S)"
        extra = ""
        if kind == "FIFO" and name in ("openat", "open"):
            extra = ": a FIFO that no process has opened for the other end"
        elif kind in ("FIFO", "pipe") and name in ("read", "readv"):
            extra = ": nothing writes into it"
        evidence = [thread_line(t), f"system call {name} ({state}), wchan {t['wchan']}"
                    + (f", fd {fd.get('fd')} -> {fd.get('target')}" if fd else "")]
        evidence += frames_block(t, 6)
        fix = {"FIFO": "open the other end of the FIFO (a writer for a reader), or open it "
                       "with O_NONBLOCK / a timeout; check which process should feed it.",
               "pipe": "the process that writes the pipe is stuck or gone: diagnose it; read "
                       "with a timeout (select/poll).",
               "socket": "the peer does not answer: check it is up and reachable; give every "
                         "network call a timeout (socket.settimeout, requests timeout=).",
               "terminal": "it waits for keyboard input: answer it, or run detached with "
                           "`< /dev/null` (nohup, tmux)."}.get(
            kind, "the storage is slow or gone (an NFS server, a failing disk): check `mount`, "
                  "`dmesg`; copy the data to a local disk.")
        return (f"{label(t, f)} is blocked {verb} {what}{extra}.", evidence, fix)
    return None


def fork_after_openmp(f: Facts):
    parent = f.ctx.get("parent") or {}
    parent_omp = [r for r in parent.get("runtimes", []) if r["api"] == "openmp"]
    if not parent_omp or f.progressing():
        return None
    if parent.get("exe") != f.ctx.get("exe") or parent.get("cmdline") != f.ctx.get("cmdline"):
        return None  # exec'd a program (or the same interpreter on another script): not a
        # forked copy of the parent, whose OpenMP state it did not inherit
    for t in f.python_threads() or list(f.threads.values()):
        omp = openmp_frames(t)
        if t["motion"] in ("stuck", "spinning") and (omp or (
                not t["frames"] and (t["wchan"] or "").startswith("futex"))):
            where_ = omp[0] if omp else f"kernel {t['wchan']}"
            return (f"this process was forked from pid {parent['pid']} after the parent had run "
                    f"OpenMP; {label(t, f)} waits forever in {where_} for pool threads that "
                    "fork did not copy.",
                    [thread_line(t), f"{len(f.threads)} thread(s) here; parent "
                     f"{parent['pid']} has {parent.get('threads')} and maps "
                     + ", ".join(sorted({r['family'] for r in parent_omp}))]
                    + frames_block(t, 8),
                    "never fork after OpenMP work: multiprocessing/DataLoader with the spawn "
                    "start method, or one OpenMP thread before the fork (--threads safe, "
                    "OMP_NUM_THREADS=1).")
    return None


def duplicate_openmp(f: Facts):
    from lnsp.system import kmp_duplicate_ok, openmp_conflict

    conflict = openmp_conflict([r["path"] for r in f.ctx.get("runtimes", [])
                                if r["api"] == "openmp"])
    # Two copies of GNU libgomp are two pools of one runtime (named in hazards()); two
    # runtimes of different families, or two copies of libomp (macOS: torch's and
    # faiss's wheels), are the hazard.
    if not conflict or conflict[0] == "copies" or f.progressing():
        return None
    families = f.runtime_families()
    for t in f.python_threads() or list(f.threads.values()):
        omp = openmp_frames(t)
        if omp and t["motion"] in ("stuck", "spinning", "busy"):
            libs = "; ".join(f"{fam}: {', '.join(paths)}" for fam, paths in families.items())
            env = f.ctx.get("environ", {})
            evidence = [thread_line(t), f"OpenMP runtimes mapped: {libs}"] + frames_block(t, 8)
            if kmp_duplicate_ok(env.get("KMP_DUPLICATE_LIB_OK")):
                evidence.append(f"KMP_DUPLICATE_LIB_OK={env['KMP_DUPLICATE_LIB_OK']} hides the "
                                "duplicate instead of failing at start-up")
            if conflict[0] == "mixed":
                what = (f"{len(families)} different OpenMP runtimes are loaded "
                        f"({' and '.join(families)}), which do not share threads or locks")
            else:
                (fam, paths), = families.items()
                what = (f"{len(paths)} copies of {fam} are loaded, each with its own threads "
                        "and locks, which the runtime itself refuses (OMP: Error #15) unless "
                        "KMP_DUPLICATE_LIB_OK hides it")
            return (f"{label(t, f)} is stuck in an OpenMP runtime ({omp[0]}) while {what}.",
                    evidence,
                    "load one OpenMP runtime: install builds that use the same one (pip torch "
                    "and faiss-cpu use GNU libgomp on Linux; on macOS their wheels each bundle "
                    "libomp: conda-forge's torch and faiss share one; drop intel-openmp/"
                    "llvm-openmp, or use MKL's GNU threading layer MKL_THREADING_LAYER=GNU); "
                    "never set KMP_DUPLICATE_LIB_OK=TRUE.")
    return None


def mps_sync(f: Facts):
    for t in f.python_threads() or list(f.threads.values()):
        hits = [n for n in (fr["name"] for fr in t["frames"]) if MPS_FRAME.search(n)]
        if hits and t["motion"] in ("stuck", "spinning", "unknown"):
            return (f"{label(t, f)} waits for the Metal GPU to finish a command buffer "
                    f"({hits[0]}) that never completes.",
                    [thread_line(t)] + frames_block(t, 10),
                    "update macOS and torch; call torch.mps.synchronize() after each phase to "
                    "find the op that hangs and run it on the CPU (or "
                    "PYTORCH_ENABLE_MPS_FALLBACK=1); keep the run in the foreground or under "
                    "caffeinate so App Nap does not park it.")
    return None


def busy_loop(f: Facts):
    if f.progressing():
        return None
    for t in f.python_threads():
        if t["motion"] == "spinning" and t["demand"] >= 0.5:
            return (f"{label(t, f)} spins at {100 * t['cpu']:.0f}% CPU in the same frames "
                    f"without progress: {where(t)}.",
                    [thread_line(t)] + frames_block(t, 8),
                    "a loop whose exit condition never holds: read the line above; bound the "
                    "loop (a counter or a deadline) and log inside it.")
    return None


RULES = [
    ("stopped", stopped), ("throttled", throttled), ("swapping", swapping),
    ("running", running), ("mps-sync", mps_sync), ("collective-wait", collective_wait),
    ("dataloader-worker", dataloader_worker), ("gil-held", gil_held),
    ("fork-after-openmp", fork_after_openmp), ("duplicate-openmp", duplicate_openmp),
    ("deadlock", deadlock), ("blocked-io", blocked_io), ("busy-loop", busy_loop),
    ("slow", slow),
]
KINDS = [k for k, _ in RULES] + ["unknown"]


def hazards(f: Facts) -> list[str]:
    """Things worth knowing whatever the verdict."""
    found = []
    from lnsp.system import kmp_duplicate_ok, openmp_conflict

    conflict = openmp_conflict([r["path"] for r in f.ctx.get("runtimes", [])
                                if r["api"] == "openmp"])
    if conflict:
        found.append(f"hazard: {conflict[1]}")
    if kmp_duplicate_ok(f.ctx.get("environ", {}).get("KMP_DUPLICATE_LIB_OK")):
        found.append("hazard: KMP_DUPLICATE_LIB_OK=TRUE hides a duplicate OpenMP runtime")
    if not any(s.get("pyspy") for s in f.samples):
        from lnsp.system import ptrace_problem

        found.append(f"py-spy could not read the stacks (not installed, or {ptrace_problem()})")
    return found


def judge(f: Facts) -> dict:
    for kind, rule in RULES:
        found = rule(f)
        if found:
            summary, evidence, fix = found
            break
    else:
        kind = "unknown"
        t = (f.python_threads() or list(f.threads.values()) or [None])[0]
        if t is None:
            summary, evidence = "no thread could be read.", []
        else:
            summary = (f"no known hang matches; {label(t, f)} is {t['motion']} in {where(t)}.")
            evidence = [thread_line(x) for x in f.python_threads()[:4]] + frames_block(t, 10)
        fix = ("none known: read the frames; `lnsp dump --native` for every thread, and "
               "report them with this output.")
    evidence = evidence + hazards(f)
    return {"kind": kind, "summary": summary[0].upper() + summary[1:], "evidence": evidence,
            "fix": fix}


def _describe(fd: dict) -> str:
    """A file descriptor in words: its target, its kind, and a socket's peer."""
    what = f"{fd.get('target')} ({fd.get('type', 'file')}, fd {fd.get('fd')})"
    if fd.get("remote"):
        what += f", peer {fd['remote']}"
    return what
