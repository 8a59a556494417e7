"""`lnsp compare`: the probe natively and in the container with the same options,
side by side with the differences marked, so a user sees at once whether a problem
follows the platform or the code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lnsp.errors import LaunchError
from lnsp.rundir import ExitCode
from lnsp.launch.command import environment
from lnsp.launch.docker import IMAGE, client

ROWS = ("platform", "python", "torch", "numpy", "threads", "omp_threads", "import_s",
        "setup_s", "load_ms", "forward_ms", "retrieve_ms", "loss_ms", "backward_ms",
        "step_ms", "total_s", "loss")


def _result(text: str, where: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise LaunchError(f"the {where} probe printed no result:\n{text[-2000:]}", ExitCode.INTERNAL)


def native(args: list[str], timeout: float) -> dict:
    r = subprocess.run([sys.executable, "-m", "lnsp", "probe", "--json", *args],
                       capture_output=True, text=True, timeout=timeout + 30,
                       stdin=subprocess.DEVNULL)
    return _result(r.stdout + r.stderr, "native")


def container(args: list[str], image: str, threads: str | None) -> dict:
    from lnsp.config import TrainConfig

    env = environment(TrainConfig(threads=threads or "fast"), "docker")
    out = client().containers.run(image, ["probe", "--json", *args], remove=True,
                                  environment={**env, "HOME": "/tmp"},
                                  user=f"{os.getuid()}:{os.getgid()}", stderr=True)
    return _result(out.decode(), "container")


def _items(value) -> list[str]:
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    return [str(v) for v in value or []]


def table(a: dict, b: dict) -> str:
    def show(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"  {'':<13} {'native':<40} {'container':<40}"]
    for key in ROWS:
        left, right = show(a.get(key)), show(b.get(key))
        differs = left != right and not key.endswith(("_ms", "_s")) and key != "loss"
        lines.append(f"{'*' if differs else ' '} {key:<13} {left[:40]:<40} {right[:40]:<40}")
    for key in ("pools", "thread_env"):
        left, right = _items(a.get(key)), _items(b.get(key))
        for item in sorted(set(left) | set(right)):
            mark = " " if item in left and item in right else "*"
            lines.append(f"{mark} {key:<13} {item[:40] if item in left else '-':<40} "
                         f"{item[:40] if item in right else '-':<40}")
    lines.append("(* marks a difference; timings are shown, not marked)")
    return "\n".join(lines)


def compare(args: list[str], image: str = IMAGE, threads: str | None = None,
            timeout: float = 120) -> str:
    extra = args + (["--threads", threads] if threads else [])
    return table(native(extra, timeout), container(extra, image, threads))
