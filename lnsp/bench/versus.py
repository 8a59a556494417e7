"""lnsp's default training step against a plain loop (lnsp/bench/plainloop.py) at the same
model size, on the same bank, on this machine: both processes stay warm and run
blocks of steps in turn, and the medians of the block times are compared, so a burst
of load from elsewhere spoils one block of each rather than one side.

    python -m lnsp.bench.versus --batch 64 --hidden 768 --blocks 15
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lnsp.guard.threads import policy_env, user_environment
from lnsp.rundir import RunDir

PLAIN = Path(__file__).with_name("plainloop.py")


def lnsp_side(path: str, batch: int, hidden: int, ctx: int, k: int) -> None:
    """lnsp's default step (Trainer.step at the default configuration but for the
    workload), answering the plain loop's stdin protocol."""
    from lnsp.config import TrainConfig
    from lnsp.data import dataset as data
    from lnsp.guard import threads
    from lnsp.model.tower import flops_per_sample
    from lnsp.train.trainer import Trainer

    threads.enforce()
    bank = np.load(path)
    ids = np.random.default_rng(1).permutation(len(bank))
    ds = data.Dataset(None, bank, ids, np.arange(0, len(ids) + 1, 24))
    # The defaults, or what LNSP_INDEX / LNSP_PRECISION say (variants of the comparison).
    job = Trainer.build(TrainConfig(batch_size=batch, k=k, ctx_len=ctx, hidden=hidden,
                                    run_dir="-", index=os.environ.get("LNSP_INDEX", "auto"),
                                    precision=os.environ.get("LNSP_PRECISION", "auto")),
                        ds, lambda m: None)
    batches = job.epoch_batches(0)
    state = {"i": 0}

    def step():
        starts = batches[state["i"] % len(batches)]
        state["i"] += 1
        job.step([starts])

    for _ in range(3):
        step()
    print(json.dumps({"ready": True, "index": type(job.index).__name__}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "gemm":  # the peak of the precision the GRU runs in
            dtype = "bfloat16" if getattr(job.module, "bf16", False) else "float32"
            print(json.dumps({"gemm_flops": gemm_flops(dtype=dtype), "gemm_dtype": dtype,
                              "fp32_gemm_flops": gemm_flops(),
                              "model_flops_per_sample": 3 * flops_per_sample(
                                  bank.shape[1], hidden, ctx)}), flush=True)
            continue
        t = time.perf_counter()
        for _ in range(int(words[1])):
            step()
        print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)


def gemm_flops(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a square GEMM in torch: the peak a training step is measured against."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


class _Side:
    def __init__(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.ready = None  # its first line, read once every side has started

    def ask(self, command: str | None) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        while True:  # a guarded side's stdout carries the guard's own lines too
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.proc.args[:3]} ended (exit {self.proc.wait(30)})")
            if line.startswith("{"):
                return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def alternate(sides: dict, blocks: int, block_s: float, between=None) -> tuple[int, dict]:
    """Blocks of steps on each side in turn (steps per block from one probe step of
    each, so a block lasts ~block_s); the steps per block and each side's block times.
    The order flips every round (ABBA): neither side always runs first."""
    probe = max(sides[n].ask("run 2")["seconds"] / 2 for n in sides)
    steps = max(1, int(block_s / probe))
    times = {n: [] for n in sides}
    for i in range(blocks):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            times[name].append(sides[name].ask(f"run {steps}")["seconds"])
        if between:
            between()
    return steps, times


def guard_overhead(batch: int = 8, hidden: int = 768, ctx: int = 10, k: int = 100,
                   bank_rows: int = 10_000, dim: int = 768, blocks: int = 30,
                   block_s: float = 2.0) -> dict:
    """The plain loop bare and the same loop under `lnsp run` (the guard in its process:
    a heartbeat per optimizer step from the global hook, the watchdog thread), with the
    same thread environment, alternating blocks: the guard's cost in step time, as the
    median of the paired blocks' ratios (a burst of load from elsewhere spoils a pair,
    not the figure; the median of each side's times is given too)."""
    from lnsp.data import synth

    env = {**user_environment(), **policy_env("fast", load=0.0)}
    folder = Path(tempfile.mkdtemp(prefix="lnsp-guard-bench-"))
    path = str(folder / "bank.npy")
    np.save(path, synth.dataset(bank_rows, dim).bank)
    loop = [sys.executable, "-P", str(PLAIN), path, str(batch), str(hidden), str(ctx), str(k)]
    sides = {}
    try:
        sides["bare"] = _Side(loop, env)
        sides["guarded"] = _Side([sys.executable, "-m", "lnsp", "run", "--run-dir",
                                  str(folder / "run"), "--on-stall", "dump", "--", *loop], env)
        for side in sides.values():
            side.ready = side.ask(None)
        steps, times = alternate(sides, blocks, block_s)
        step_ms = {n: 1000 * float(np.median(v)) / steps for n, v in times.items()}
        ratios = [g / b for g, b in zip(times["guarded"], times["bare"])]
        beat = json.loads(RunDir(folder / "run").heartbeat.read_text())
        work = guard_work()
        # The guard's CPU per step: its hook on the script's thread, and its thread's
        # ticks (which take a core from the script's pool while they run).
        direct = (work["step_us"] + work["tick_us"] * work["ticks_per_s"]
                  * step_ms["bare"] / 1000) / (1000 * step_ms["bare"])
        return {"batch": batch, "hidden": hidden, "steps_per_block": steps, "blocks": blocks,
                "guard_step_us": round(work["step_us"], 2),
                "guard_tick_us": round(work["tick_us"], 2), "overhead_direct": direct,
                "bare_step_ms": step_ms["bare"], "guarded_step_ms": step_ms["guarded"],
                "overhead": float(np.median(ratios)) - 1,
                "overhead_spread": [round(float(np.percentile(ratios, q)) - 1, 4)
                                    for q in (25, 75)],
                "guarded_heartbeat_step": beat.get("step")}
    finally:
        for side in sides.values():
            side.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def guard_work(steps: int = 20_000, ticks: int = 2_000) -> dict:
    """The guard's own work, timed directly (CPU seconds of this process, which a
    paired A/B of whole steps cannot resolve below its noise): what one optimizer step
    costs the script's thread (the hook: counters, the watchdog's step event, a
    steps.jsonl record per --log-every steps) and what one tick of the watchdog's thread
    costs (its checks, the heartbeat written when the count moved). A real runtime on
    a temporary run directory; no torch."""
    import shutil

    from lnsp.config import TrainConfig
    from lnsp.guard import runtime

    import signal

    folder = Path(tempfile.mkdtemp(prefix="lnsp-guard-work-"))
    # The runtime installs signal handlers (stop, dump, continue): this process gets its
    # own back afterwards.
    kept = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                              signal.SIGUSR1, signal.SIGCONT)}
    rt = runtime.Runtime(TrainConfig(run_dir=str(folder)).guard_settings("exit"),
                         log=lambda line: None)
    try:
        rt.install()
        rt.watchdog.stop()  # its thread's ticks are timed here, one by one
        t = time.process_time()
        for _ in range(steps):
            rt.optimizer_stepped()
        step_us = 1e6 * (time.process_time() - t) / steps
        t = time.process_time()
        for _ in range(ticks):
            rt.optimizer_stepped()  # the count moved: each tick writes the heartbeat
            rt.watchdog._tick()
        tick_us = 1e6 * (time.process_time() - t) / ticks - step_us
    finally:
        rt.close()
        for n, handler in kept.items():
            signal.signal(n, handler)
        shutil.rmtree(folder, ignore_errors=True)
    from lnsp.guard.watchdog import TICK_S

    return {"step_us": step_us, "tick_us": tick_us, "ticks_per_s": 1 / TICK_S}


def compare(batch: int, hidden: int = 768, ctx: int = 10, k: int = 100, bank_rows: int = 10_000,
            dim: int = 768, blocks: int = 15, block_s: float = 0.6, threads: str = "fast",
            bank_path: str | None = None, variants: dict | None = None, plain: bool = True) -> dict:
    """samples/s of lnsp's default and of the plain loop, alternating blocks."""
    from lnsp.data import synth

    # lnsp's environment as a run started now gets it: chosen before either side starts
    # (the `fast` policy looks at what else wants the cores at that moment).
    lnsp_env = {**user_environment(), **policy_env(threads)}
    folder = Path(tempfile.mkdtemp(prefix="lnsp-versus-"))
    path = bank_path or str(folder / "bank.npy")
    sides = {}
    try:
        if not bank_path:
            np.save(path, synth.dataset(bank_rows, dim).bank)
        plain_env = user_environment()  # a user's shell: none of lnsp's thread variables
        if plain:
            # -P: the script's folder, lnsp/, stays off sys.path, where lnsp's modules
            # (tensorboard.py, say) would stand in for packages of the same name.
            sides["plain"] = _Side([sys.executable, "-P", str(PLAIN), path, str(batch),
                                    str(hidden), str(ctx), str(k)], plain_env)
        for name, extra in {"lnsp": {}, **(variants or {})}.items():
            sides[name] = _Side([sys.executable, "-m", "lnsp.bench.versus", "--side", "--path", path,
                                 "--batch", str(batch), "--hidden", str(hidden), "--ctx",
                                 str(ctx), "--k", str(k)],
                                {**lnsp_env, **extra})
        for side in sides.values():  # they start (imports, warm-up) side by side
            side.ready = side.ask(None)
        loads, gemm = [], []

        def between():
            gemm.append(sides["lnsp"].ask("gemm"))
            loads.append(os.getloadavg()[0])

        steps, times = alternate(sides, blocks, block_s, between)
        rate = {n: batch * steps / float(np.median(v)) for n, v in times.items()}
        rate.setdefault("plain", float("nan"))
        peak = float(np.median([g["gemm_flops"] for g in gemm]))
        fp32_peak = float(np.median([g["fp32_gemm_flops"] for g in gemm]))
        model_flops = gemm[0]["model_flops_per_sample"]
        gemm_dtype = gemm[0]["gemm_dtype"]
        return {"batch": batch, "hidden": hidden, "ctx": ctx, "k": k, "bank": bank_rows,
                "threads": threads, "steps_per_block": steps, "blocks": blocks,
                "lnsp_index": sides["lnsp"].ready.get("index"),
                "lnsp_spin": lnsp_env.get("GOMP_SPINCOUNT"),
                "plain_ready": sides["plain"].ready if "plain" in sides else None,
                "plain_samples_per_s": rate["plain"], "lnsp_samples_per_s": rate["lnsp"],
                "ratio": rate["lnsp"] / rate["plain"], "gemm_flops": peak,
                "gemm_dtype": gemm_dtype,
                "flop_fraction": model_flops * rate["lnsp"] / peak,
                "plain_flop_fraction": model_flops * rate["plain"] / fp32_peak,
                "fp32_gemm_flops": fp32_peak,
                "variants": {n: {"samples_per_s": rate[n], "ratio": rate[n] / rate["plain"]}
                             for n in variants or {}},
                "load_median": float(np.median(loads))}
    finally:
        for side in sides.values():
            side.close()
        if not bank_path:
            Path(path).unlink(missing_ok=True)
        folder.rmdir()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", action="store_true", help="run lnsp's side of the protocol")
    ap.add_argument("--path")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ctx", type=int, default=10)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--threads", default="fast")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--guard", action="store_true",
                    help="the guard's overhead on the plain loop instead")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VALUE,VAR=VALUE another lnsp side with these variables")
    args = ap.parse_args()
    if args.side:
        lnsp_side(args.path, args.batch, args.hidden, args.ctx, args.k)
    elif args.guard:
        print(json.dumps(guard_overhead(args.batch, args.hidden, args.ctx, args.k,
                                        blocks=args.blocks)))
    else:
        variants = {v.split(":", 1)[0]: dict(kv.split("=", 1) for kv in
                                             v.split(":", 1)[1].split(",") if kv)
                    for v in args.variant}
        print(json.dumps(compare(args.batch, args.hidden, args.ctx, args.k, blocks=args.blocks,
                                 threads=args.threads, variants=variants,
                                 plain=not args.no_plain)))
