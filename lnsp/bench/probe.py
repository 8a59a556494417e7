"""The probe: one training step on the default configuration with the time of each
phase, inside a hard time budget (all-thread dump and exit code 3 past it)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

PHASES = ("load", "forward", "retrieve", "loss", "backward")


def probe(batch: int = 4, k: int = 100, dim: int = 768, ctx_len: int = 10,
          timeout: float = 60.0, data_dir: str | None = None, threads: str | None = None,
          as_json: bool = False, device: str = "cpu") -> int:
    started = time.perf_counter()
    from lnsp.guard.dumps import Dumper
    from lnsp.rundir import RunDir, RunLog
    from lnsp.guard.watchdog import Watchdog

    log = RunLog(None)
    dumper = Dumper(RunDir(Path("runs") / "probe").dumps, log)
    # The budget is for the whole probe: nothing here resets the watchdog's clock.
    watchdog = Watchdog(timeout, timeout, "exit", dumper, log, label="probe: ")
    watchdog.start()

    t = time.perf_counter()
    import numpy as np
    import torch

    from lnsp.data import dataset as data
    from lnsp.data import synth
    from lnsp.guard import threads as thread_policy
    from lnsp.train import loop as train
    from lnsp.config import TrainConfig

    import_s = time.perf_counter() - t
    n_threads = thread_policy.enforce()
    config = TrainConfig(batch_size=batch, k=k, ctx_len=ctx_len, threads=threads or "fast",
                         data=data_dir or "", run_dir="-", device=device)
    config.validate()
    t = time.perf_counter()
    if data_dir:
        ds = data.load(data_dir, ctx_len)
    else:
        ds = synth.dataset(10_000, dim)
    job = train.setup(config, ds, lambda m: None)
    setup_s = time.perf_counter() - t

    phases: dict[str, float] = {}
    starts = job.train_starts[:batch]
    t = time.perf_counter()
    loss = train.train_step(job, starts, phases=phases, watchdog=watchdog)
    train.optimizer_step(job, loss)
    step_s = time.perf_counter() - t
    watchdog.stop()

    result = {"batch": batch, "k": k, "dim": ds.dim, "ctx_len": ctx_len,
              "bank": int(ds.bank.shape[0]), "threads": config.threads,
              "omp_threads": n_threads, "import_s": import_s, "setup_s": setup_s,
              **{f"{p}_ms": phases.get(p, 0.0) * 1e3 for p in PHASES},
              "step_ms": step_s * 1e3, "total_s": time.perf_counter() - started,
              "loss": loss, "torch": torch.__version__, "numpy": np.__version__,
              "pid": os.getpid(), "platform": platform.platform(),
              "python": platform.python_version(),
              "pools": [f"{p['api']} x{p['threads']} {p['library']}"
                        for p in thread_policy.pools()],
              "thread_env": {k: os.environ.get(k) for k in thread_policy.THREAD_VARS}}
    lines = ["PROBE RESULT",
             f"  config    : bank {result['bank']} x {ds.dim}, batch {batch}, K {k}, "
             f"ctx_len {ctx_len}, threads {config.threads} ({n_threads} OpenMP)",
             f"  imports   : {import_s:8.3f} s",
             f"  setup     : {setup_s:8.3f} s  (data, index, model)"]
    lines += [f"  {p:<10}: {phases.get(p, 0.0) * 1e3:8.2f} ms" for p in PHASES]
    lines += [f"  step      : {step_s * 1e3:8.2f} ms  (phases + optimizer)",
              f"  total     : {result['total_s']:8.3f} s",
              f"  loss      : {loss:.4f}",
              "  status    : OK"]
    print("\n".join(lines), flush=True)
    if as_json:
        print(json.dumps(result), flush=True)
    sys.stdout.flush()
    return 0
