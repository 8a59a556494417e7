"""The state of runs, read from their run directories and the live processes:
running (or slow: alive but crawling), stalled, finished, stopped or failed (and
starting, restarting; unknown while a container engine does not answer)."""

from __future__ import annotations

import json
import time
from typing import Callable, Protocol

from lnsp.config import TrainConfig
from lnsp.errors import LaunchError
from lnsp.progress import format_eta
from lnsp.rundir import ExitRecord, Heartbeat, RunDir, RunRecord, read_json, run_staleness

# A run whose records name no budgets is judged by the defaults it ran with.
STALL_TIMEOUT, STARTUP_TIMEOUT = TrainConfig.stall_timeout, TrainConfig.startup_timeout


class Processes(Protocol):
    """What status asks a run's backend (lnsp.launch.Backend has it all): whether the
    run's processes live, and the backend's own fields for the row (its containers)."""

    def alive(self, run: RunRecord) -> bool:
        """Any process of the run lives (a supervisor between two trainers counts)."""

    def trainer_alive(self, run: RunRecord) -> bool:
        """The recorded trainer itself lives (not a later process with its PID)."""

    def extra_status(self, run: RunRecord) -> dict:
        """Fields the backend adds to the status row ({} when it has none)."""


def classify(run: RunRecord, beat: Heartbeat | None, ended: ExitRecord | None, alive: bool,
             trainer_alive: bool, now: float, config: dict | None = None) -> str:
    """The state of a run from its records and whether its processes live: running,
    stalled, finished, stopped, failed, starting or restarting (a pure function)."""
    config = config or {}
    if ended:  # written just before the trainer exits, removed when one starts
        if ended.state != "finished" and alive and \
                run.restarts < run.max_restarts:
            return "restarting"
        return ended.state
    if trainer_alive:
        if run.guard is False:  # a command that is not Python: no heartbeat to age
            return "running"
        s = run_staleness(beat, run.pid, run.start_time or run.launch_time or now,
                          run.stall_timeout or config.get("stall_timeout", STALL_TIMEOUT),
                          run.startup_timeout or config.get("startup_timeout", STARTUP_TIMEOUT),
                          now)
        if s.stale:
            return "stalled"
        # s.stepping: the heartbeat is this trainer's own (not an earlier one's)
        return "slow" if s.stepping and beat.extra.get("slow") else "running"
    if alive or (not run.pid and now - (run.launch_time or 0) < 60):
        return "starting"
    return "failed"  # the process is gone and left no exit.json: killed or crashed


def state(rd: RunDir, backend: Callable[[str], Processes], now: float | None = None) -> dict:
    """One run's status row. `backend(kind)` answers whether the run's processes live
    (lnsp.launch.backend): the records are read here, the processes asked there."""
    now = now or time.time()
    run = rd.read_run_record() or RunRecord()
    beat = rd.read_heartbeat()
    ended = rd.read_exit()
    ops = backend(run.backend)
    try:
        label = classify(run, beat, ended, ops.alive(run),
                         not ended and ops.trainer_alive(run), now, read_json(rd.config))
        extra = ops.extra_status(run)
    except LaunchError as e:  # the engine did not answer: no verdict on the processes
        label, extra = (ended.state if ended else "unknown"), {"error": str(e)}
    age = now - beat.time if beat else None
    row = {"run": str(rd.root), "backend": run.backend, "state": label, "pid": run.pid,
           "epoch": beat and beat.epoch, "step": ended.step if ended else beat and beat.step,
           "loss": beat and beat.loss, "samples_per_s": beat and beat.samples_per_s,
           "heartbeat_age_s": None if age is None else round(age, 1),
           "exit_code": ended and ended.exit_code, "restarts": run.restarts,
           "phase": beat and beat.phase, "total_steps": beat and beat.extra.get("total_steps"),
           "eta_s": eta(label, beat, age)}
    cause = _cause(rd, ended, beat) if label in ("stalled", "failed", "restarting") \
        else ended and ended.cause
    if cause:
        row["cause"] = cause
    if beat and beat.extra.get("budgets"):
        row["budgets_s"] = beat.extra["budgets"]
    goodput = rd.read_goodput()
    if goodput:
        row["goodput"] = {k: goodput[k] for k in ("goodput", "wall_s", "shares", "attempts")
                          if k in goodput}
    row.update(extra)
    if run.world_size > 1:  # one line per rank
        beats = rd.rank_heartbeats()
        row["ranks"] = []
        for r in run.ranks:
            b = beats.get(r["rank"])
            row["ranks"].append({"rank": r["rank"], "pid": r["pid"], "host": r["host"],
                                 "step": b and b.step, "phase": b and b.phase,
                                 "heartbeat_age_s": round(now - b.time, 1) if b else None})
    return row


def eta(label: str, beat: Heartbeat | None, age: float | None) -> float | None:
    """Seconds left: the heartbeat's estimate less the time since it was written (only
    while the run is running; a finished run has none left)."""
    if label == "finished":
        return 0.0
    if label != "running" or beat is None or beat.extra.get("eta_s") is None or age is None:
        return None
    return round(max(0.0, beat.extra["eta_s"] - age), 1)


def _cause(rd: RunDir, ended: ExitRecord | None, beat: Heartbeat | None) -> str | None:
    """Why a run stalled or failed: exit.json's cause, or for a live stalled run the
    verdict of the newest hang bundle written since its last heartbeat."""
    if ended and ended.cause:
        return ended.cause
    for bundle in reversed(rd.bundles()):
        verdict = read_json(rd.verdict(bundle)) or {}
        if verdict.get("kind") and (beat is None or verdict.get("time", 0) >= beat.time):
            return f"{verdict['kind']}: {verdict.get('summary', '')}"
    return None


def find(runs: tuple[str, ...], root: str) -> list[RunDir]:
    return [RunDir(r) for r in runs] if runs else RunDir.runs_under(root)


def show(runs: tuple[str, ...], backend, root: str = "runs", as_json: bool = False) -> str:
    rows = [state(rd, backend) for rd in find(runs, root)]
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
        if r.get("cause"):
            lines.append(f"  cause: {r['cause']}")
        if r.get("budgets_s"):
            lines.append("  learned budgets: " + ", ".join(
                f"{p} {b:g}s" for p, b in r["budgets_s"].items()))
        if r.get("goodput"):
            g = r["goodput"]
            lines.append(f"  goodput {g.get('goodput', 0):.0%} of {g.get('wall_s', 0):.0f}s: "
                         + ", ".join(f"{c} {v:.0%}" for c, v in g.get("shares", {}).items()
                                     if v >= 0.005))
        for k in r.get("ranks", []):
            lines.append(f"  rank {k['rank']:<3} pid {k['pid']:<7} {k['host']:<12} step "
                         f"{fmt(k['step'], 'd'):>6} phase {k['phase'] or '-':<10} heartbeat "
                         f"{fmt(k['heartbeat_age_s'], '.1f')}s")
    return "\n".join(lines)
