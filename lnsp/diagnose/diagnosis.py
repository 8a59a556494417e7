"""`lnsp diagnose`: why is a Python process stuck. Takes a few samples of every thread
(py-spy native stacks, /proc state, wchan, the blocking system call and its file, CPU),
folds them, and hands the facts to the catalog of known hangs (lnsp.diagnose.hangs).

Everything here reads the target from outside: it works on an lnsp run and on any
Python process the user may trace (py-spy needs ptrace: root, or the same user with
ptrace_scope 0). /proc is Linux only; elsewhere the stacks alone are judged.
"""

from __future__ import annotations

import json
import re
import time

import psutil

from lnsp import procs
from lnsp.diagnose import hangs
from lnsp.diagnose.proc import (collective_peers, environ, peek, proc_snapshot,
                                psutil_snapshot, runtimes, thread_cpu)
from lnsp.diagnose.stacks import frames_of, pystack, pyspy, render, stack_key
from lnsp.diagnose.target import BadTarget, Target, resolve
from lnsp.rundir import RunDir, read_json


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
            snap["resumed"]["proc_cpu_s"] = psutil_snapshot(pid).get("proc_cpu_s", 0.0)
        out.append(snap)
        if i < samples - 1:
            time.sleep(interval)
    return out


def context(target: Target, first: dict, last: dict) -> dict:
    """Facts beyond the samples: parent, children, peers of a collective, the run's
    heartbeats, the mapped runtimes."""
    pid = target.pid
    ctx = {"pid": pid, "runtimes": runtimes(pid), "environ": {}, "children": [], "parent": None,
           "peers": [], "run": None, "cmdline": " ".join(procs.cmdline(pid))[:200]}
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
            ctx["children"].append(peek(child.pid))
    except psutil.Error:
        pass
    if "MASTER_PORT" in env and "RANK" in env:
        ctx["peers"] = collective_peers(pid, env)
    if target.run_dir is not None:
        ctx["run"] = run_facts(target, first, last)
    return ctx


def run_facts(target: Target, first: dict, last: dict) -> dict:
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
