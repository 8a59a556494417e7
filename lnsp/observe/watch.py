"""`lnsp status --watch`: every run's state, phase, step/total, rate, ETA, heartbeat age
and the cause of a stall or failure, redrawn every few seconds until Ctrl-C."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lnsp.progress import format_eta
from lnsp.observe.status import find, state

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _name(run: str, root: str) -> str:
    """A run under the root by its name; any other by its path."""
    path = Path(run)
    return path.name if path.parent == Path(root) else run


def screen(rows: list[dict], root: str, interval: float, now: float | None = None,
           width: int = 120) -> str:
    """One frame of the view (plain text; each cause on its own line under its run)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now or time.time()))
    lines = [f"lnsp status --watch  {stamp}  every {interval:g}s  (Ctrl-C to leave)", ""]
    if not rows:
        return "\n".join(lines + [f"no runs under {root}/"])
    lines.append(f"{'RUN':<24} {'STATE':<10} {'PHASE':<10} {'STEP/TOTAL':>13} {'LOSS':>8} "
                 f"{'SAMPLES/S':>9} {'ETA':>8} {'HEARTBEAT':>9}")
    for r in rows:
        step = _fmt(r["step"], "d")
        if r.get("total_steps"):
            step += f"/{r['total_steps']}"
        phase = r.get("phase") if r["state"] in ("running", "stalled") else None  # else stale
        lines.append(f"{_name(r['run'], root)[-24:]:<24} {r['state']:<10} {(phase or '-')[:10]:<10} "
                     f"{step:>13} {_fmt(r['loss'], '.4f'):>8} {_fmt(r['samples_per_s'], '.1f'):>9} "
                     f"{format_eta(r.get('eta_s')):>8} "
                     f"{_fmt(r['heartbeat_age_s'], '.1f', 's'):>9}")
        if r.get("cause") and r["state"] != "finished":
            lines.append(f"  cause: {r['cause']}"[:width])
        for k in r.get("ranks", []):
            lines.append(f"  rank {k['rank']:<3} step {_fmt(k['step'], 'd'):>7} phase "
                         f"{k['phase'] or '-':<10} heartbeat "
                         f"{_fmt(k['heartbeat_age_s'], '.1f', 's')}")
    return "\n".join(lines)


def watch(runs: tuple[str, ...], backend, root: str = "runs", interval: float = 2.0,
          stream=None) -> int:
    """Redraw until Ctrl-C (then exit 0). On a terminal the screen is cleared for each
    frame; elsewhere frames follow one another, separated by a blank line."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    try:
        while True:
            frame = screen([state(rd, backend) for rd in find(runs, root)], root, interval)
            stream.write((CLEAR if tty else "") + frame + ("\n" if tty else "\n\n"))
            stream.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        stream.write("\n")
        stream.flush()
        return 0
