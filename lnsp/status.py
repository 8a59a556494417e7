"""The state of runs, read from their run directories and the live processes:
running, stalled, finished, stopped or failed (and starting, restarting)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lnsp.progress import format_eta
from lnsp.rundir import RunDir, read_json


def state(rd: RunDir, now: float | None = None) -> dict:
    from lnsp.launch import backend

    now = now or time.time()
    run = read_json(rd.run) or {}
    beat = read_json(rd.heartbeat) or {}
    ended = read_json(rd.exit)
    config = read_json(rd.config) or {}
    kind = run.get("backend", "foreground")
    ops = backend(kind)
    alive = ops.alive(run)
    age = now - beat["time"] if beat.get("time") else None
    if ended:  # written just before the trainer exits, removed when one starts
        label = ended["state"]
        if label != "finished" and alive and run.get("restarts", 0) < run.get("max_restarts", 0):
            label = "restarting"
    elif ops.trainer_alive(run):
        stall = run.get("stall_timeout") or config.get("stall_timeout", 120)
        startup = run.get("startup_timeout") or config.get("startup_timeout", 600)
        fresh = beat.get("pid") == run.get("pid") and age is not None
        since = age if fresh else now - run.get("start_time", run.get("launch_time", now))
        label = "stalled" if since > (stall if fresh else startup) else "running"
    elif alive or (not run.get("pid") and now - run.get("launch_time", 0) < 60):
        label = "starting"
    else:
        label = "failed"  # the process is gone and left no exit.json: killed or crashed
    row = {"run": str(rd.root), "backend": kind, "state": label, "pid": run.get("pid"),
           "epoch": beat.get("epoch"), "step": (ended or {}).get("step", beat.get("step")),
           "loss": beat.get("loss"), "samples_per_s": beat.get("samples_per_s"),
           "heartbeat_age_s": None if age is None else round(age, 1),
           "exit_code": (ended or {}).get("exit_code"), "restarts": run.get("restarts", 0),
           "phase": beat.get("phase"), "total_steps": beat.get("total_steps"),
           "eta_s": eta(label, beat, age), "cause": (ended or {}).get("cause")}
    if hasattr(ops, "extra_status"):
        row.update(ops.extra_status(run))
    if run.get("world_size", 1) > 1:  # one line per rank
        row["ranks"] = []
        for r in run.get("ranks", []):
            b = read_json(rd.root / f"heartbeat-rank{r['rank']}.json") or {}
            row["ranks"].append({"rank": r["rank"], "pid": r["pid"], "host": r["host"],
                                 "step": b.get("step"), "phase": b.get("phase"),
                                 "heartbeat_age_s": round(now - b["time"], 1)
                                 if b.get("time") else None})
    return row


def eta(label: str, beat: dict, age: float | None) -> float | None:
    """Seconds left: the heartbeat's estimate less the time since it was written (only
    while the run is running; a finished run has none left)."""
    if label == "finished":
        return 0.0
    if label != "running" or beat.get("eta_s") is None or age is None:
        return None
    return round(max(0.0, beat["eta_s"] - age), 1)


def find(runs: tuple[str, ...], root: str) -> list[RunDir]:
    if runs:
        return [RunDir(r) for r in runs]
    base = Path(root)
    found = [RunDir(p) for p in sorted(base.iterdir()) if (p / "run.json").exists()] \
        if base.is_dir() else []
    return found


def show(runs: tuple[str, ...], root: str = "runs", as_json: bool = False) -> str:
    rows = [state(rd) for rd in find(runs, root)]
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return f"no runs under {root}/"
    head = f"{'RUN':<28} {'BACKEND':<10} {'STATE':<10} {'PID':>7} {'EPOCH':>5} {'STEP':>7} " \
           f"{'LOSS':>8} {'SAMPLES/S':>9} {'HEARTBEAT':>9} {'ETA':>8}"
    lines = [head]
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"{r['run'][-28:]:<28} {r['backend']:<10} {r['state']:<10} "
                     f"{fmt(r['pid'], 'd'):>7} {fmt(r['epoch'], 'd'):>5} {fmt(r['step'], 'd'):>7} "
                     f"{fmt(r['loss'], '.4f'):>8} {fmt(r['samples_per_s'], '.1f'):>9} "
                     f"{fmt(r['heartbeat_age_s'], '.1f') + 's' if r['heartbeat_age_s'] is not None else '-':>9} "
                     f"{format_eta(r['eta_s']):>8}")
        for k in r.get("ranks", []):
            lines.append(f"  rank {k['rank']:<3} pid {k['pid']:<7} {k['host']:<12} step "
                         f"{fmt(k['step'], 'd'):>6} phase {k['phase'] or '-':<10} heartbeat "
                         f"{fmt(k['heartbeat_age_s'], '.1f')}s")
    return "\n".join(lines)
