"""`lnsp bench`: ratios measured in one process tree on one machine, because absolute
times on shared machines are noise. Each thread policy runs in its own process (the
policy is fixed before the heavy imports); bare and hardened loops alternate there.

Measures, at the seed's model size (GRU 768 -> 768): hardened / bare throughput, each
policy against `safe`, lnsp's default against a plain loop written the way a user
would (lnsp/bench/plainloop.py), the fraction of measured GEMM FLOP/s that training reaches,
the probe's wall time, the miner (auto's choice and recall) and memory at the seed's
scale (771,115 x 768), and the decider's latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lnsp.guard.threads import user_environment

WORKLOAD = {"bank": 10_000, "dim": 768, "ctx_len": 10, "k": 100, "hidden": 768}
SEED_BANK = 771_115
WARM_STEPS = 8  # seed scale: steps before the timed ones, the mined recall checked at each
SEED_INDEXES = ("auto", "ivf", "ivf-sq8")  # the default; IVF and 8-bit codes at nprobe 8
TARGETS = {"hardened_ratio": 0.98, "fast_vs_safe_b64": 1.6, "flop_fraction_b64": 0.5,
           "vs_plain_b64": 1.0, "vs_plain_b8": 1.0, "probe_wall_s": 5.0, "ivf_p95_ms": 2.5,
           "rss_over_baseline_gb": 1.0, "decider_p99_ms": 1.0, "seed_train_samples_per_s": 300,
           "seed_mined_recall": 0.9, "guard_overhead_b8": 0.01}


# ---------------------------------------------------------------- one policy, one process
def _job(batch: int, threads: str, index: str = "auto"):
    from lnsp.config import TrainConfig
    from lnsp.data import synth
    from lnsp.train.trainer import Trainer

    ds = synth.dataset(WORKLOAD["bank"], WORKLOAD["dim"])
    config = TrainConfig(batch_size=batch, k=WORKLOAD["k"], ctx_len=WORKLOAD["ctx_len"],
                         hidden=WORKLOAD["hidden"], threads=threads, run_dir="-", index=index)
    return Trainer.build(config, ds, lambda m: None)


def worker(batch: int, threads: str, seconds: float, index: str = "auto") -> dict:
    """Bare and hardened steps, alternating in blocks, in this process: the same
    Trainer.step, alone and as `fit` runs it (under the guard, recorded)."""
    from lnsp.guard import threads as policy
    from lnsp.guard.runtime import Runtime
    from lnsp.guard.watchdog import Heartbeat
    from lnsp.model.tower import flops_per_sample
    from lnsp.rundir import RunDir, RunLog
    from lnsp.train.loop import RunState
    from lnsp.train.recorder import Recorder

    n_threads = policy.enforce()
    job = _job(batch, threads, index)
    batches = job.epoch_batches(0)
    with tempfile.TemporaryDirectory(prefix="lnsp-bench-") as tmp:
        rd = RunDir(tmp)
        log = RunLog(rd.log, echo=False)
        # What the training loop adds around the same step: the guard's phases and
        # optimizer hook, the heartbeat after every step, the log line and steps.jsonl
        # record per interval.
        rt = Runtime(job.config.replace(run_dir=tmp, startup_timeout=600,
                                        stall_timeout=120).guard_settings(),
                     log=log, records=False).install()
        rec = Recorder(rd, log, job.config)
        rec.guard(rt)
        rec.beats.append(Heartbeat(rd.heartbeat, log, 512))
        state = RunState()

        def bare(i):  # the same step, nothing else
            with rt.standing_down():
                job.step([batches[i % len(batches)]])

        def hardened(i):
            phases = {}
            loss = job.step([batches[i % len(batches)]], phases)
            state.advance()
            rec.step_done(state, loss, phases)

        for i in range(3):  # warm-up: allocator, OpenMP pools, FAISS
            bare(i)
        # Blocks of the same batches alternate, and the medians of the block times are
        # compared: a burst of load from elsewhere spoils one block, not the ratio. The
        # order flips every pair (ABBA), so neither always runs first.
        blocks = {"bare": [], "hardened": []}
        block, i = 1, 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(blocks["hardened"]) < 20:
            pair = (("bare", bare), ("hardened", hardened))
            for name, fn in pair if len(blocks["bare"]) % 2 == 0 else pair[::-1]:
                t = time.perf_counter()
                for j in range(block):
                    fn(i + j)
                blocks[name].append(time.perf_counter() - t)
            i += block
        rt.close()
        rt.watchdog.join(5)
    rate = {k: batch * block / float(np.median(v)) for k, v in blocks.items()}
    from lnsp.bench.versus import gemm_flops

    # Against the peak GEMM of the precision the GRU runs in (bf16 under autocast).
    dtype = "bfloat16" if getattr(job.module, "bf16", False) else "float32"
    gemm = float(np.median([gemm_flops(dtype=dtype) for _ in range(5)]))
    cfg = job.config
    model_flops = 3 * flops_per_sample(WORKLOAD["dim"], cfg.hidden, cfg.ctx_len)
    return {"batch": batch, "threads": threads, "index": index, "omp_threads": n_threads,
            "bare_samples_per_s": rate["bare"], "hardened_samples_per_s": rate["hardened"],
            "hardened_ratio": rate["hardened"] / rate["bare"], "gemm_flops": gemm,
            "flop_fraction": model_flops * rate["bare"] / gemm, "gemm_dtype": dtype,
            "model_flops_per_sample": model_flops}


# ---------------------------------------------------------------- the seed's scale
def seed_write(path: str, n: int = SEED_BANK, dim: int = 768) -> dict:
    """The seed-scale bank, written in chunks into a .npy file: rows around topics, as
    sentence embeddings of many documents are (synth.write_topic_bank; isotropic random
    rows have no neighbourhoods for any approximate index to find)."""
    from lnsp.data import synth

    return synth.write_topic_bank(path, n, dim, topics=max(1, n // 400),
                                  labels=_labels_path(path))


def _labels_path(path: str) -> str:
    return str(Path(path).with_suffix(".topics.npy"))


def topic_chains(labels: np.ndarray, length: int = 24, chains: int = 2000,
                 seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of `chains` chains of `length` rows, each walking the rows of one
    topic in a random order: a document whose sentences stay near its subject, which a
    model can learn (and whose queries land near the data, as a trained model's do)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
    ids = []
    for topic in rng.permutation(len(bounds) - 1):
        rows = rng.permutation(order[bounds[topic]:bounds[topic + 1]])
        ids += [rows[i:i + length] for i in range(0, len(rows) - length + 1, length)]
        if len(ids) >= chains:
            break
    ids = np.concatenate(ids[:chains]).astype(np.int64)
    return ids, np.arange(0, len(ids) + 1, length, dtype=np.int64)


def seed_index(path: str, kind: str, queries: int | None = None) -> dict:
    """In a process of its own: memory-map the bank, build one index (auto: as `lnsp
    train` would, calibrated), time batches of 8 queries, train a few steps, measure the
    recall of the mined top-K for the trained model's queries against exact search, and
    compare peak RSS with runtime + bank + index."""
    import psutil

    from lnsp.model import miner
    from lnsp.guard import threads as policy

    policy.enforce()
    queries = queries or 200
    runtime = psutil.Process().memory_info().rss  # interpreter, torch, faiss
    bank = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(1)
    q = np.ascontiguousarray(bank[np.sort(rng.choice(len(bank), 8 * queries, replace=False))])
    said = []
    t = time.perf_counter()
    fixed = {} if kind == "auto" else {"nlist": 1024, "nprobe": 8}
    index = miner.build(bank, kind, log=said.append, **fixed)
    build_s = time.perf_counter() - t
    lat = []
    for i in range(queries):
        t = time.perf_counter()
        miner.search(index, q[8 * i:8 * i + 8], WORKLOAD["k"])
        lat.append((time.perf_counter() - t) * 1e3)
    index_bytes = _index_bytes(index)
    calibrated = ivf.nprobe if (ivf := miner_ivf(index)) is not None else None
    rate, job, check = _train_rate(bank, index, kind, np.load(_labels_path(path)),
                                   log=said.append)
    recall = _mined_recall(job, bank)
    # Peak resident memory of the process; the memory map's touched pages count.
    # (ru_maxrss is kilobytes on Linux, bytes on macOS: the platform module converts.)
    from lnsp.system import peak_rss_bytes

    peak = peak_rss_bytes()
    baseline = runtime + bank.nbytes + index_bytes
    return {"index": kind, "built": type(index).__name__, "build_s": build_s,
            "nprobe": ivf.nprobe if ivf is not None else None, "calibrated_nprobe": calibrated,
            "nlist": ivf.nlist if ivf is not None else None,
            "calibration": miner.calibration(index), "log": said,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "train_samples_per_s": rate,
            "mined_recall": recall, "recall_check": check,
            "bank_gb": bank.nbytes / 2**30, "index_gb": index_bytes / 2**30,
            "runtime_gb": runtime / 2**30, "peak_rss_gb": peak / 2**30,
            "over_baseline_gb": (peak - baseline) / 2**30}


def _mined_recall(job, bank, batches: int = 8) -> float:
    """Recall@K of the miner's candidates for the trained model's queries (training
    windows), against exact search over the whole bank."""
    import torch

    from lnsp.data import dataset as data
    from lnsp.model import miner
    from lnsp.train.trainer import vectors

    exact = miner.ExactIndex(bank)
    k = job.config.k + 1
    found = []
    for starts in job.epoch_batches(1)[:batches]:
        context_ids, _ = data.window_ids(job.ds, starts, job.config.ctx_len)
        with torch.no_grad():
            query = job.model(vectors(job.ds, context_ids, job.device)).float().numpy()
        _, got = miner.search(job.index, query, k)
        _, want = exact.search(query, k)
        found.append(miner.overlap(got, want))  # batches of one size: the mean of means
    return float(np.mean(found))


def _index_bytes(index) -> int:
    """What an index holds in memory, counted from its lists (serializing it to measure
    would itself take that much memory again)."""
    import faiss

    if not isinstance(index, faiss.Index):
        return index.ntotal * index.d * 4
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:  # flat: the vectors
        return index.ntotal * index.d * 4
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    entries = sum(lists.list_size(i) for i in range(ivf.nlist))
    return entries * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4  # codes, ids, centroids


def _train_rate(bank, index, kind: str, labels: np.ndarray, batch: int = 8, steps: int = 30,
                log=print):
    """Training samples/s at this scale (chains within topics, this miner, the default
    configuration but for the batch), and the job. The first steps check the mined
    recall at every search (training checks every --recall-every searches), so that
    nprobe is where the model's queries need it before the timed steps."""
    from lnsp.config import TrainConfig
    from lnsp.data import dataset as data
    from lnsp.model import miner
    from lnsp.train.trainer import Trainer

    ids, offsets = topic_chains(labels)
    ds = data.Dataset(None, bank, ids, offsets, index=index)
    ivf = miner_ivf(index)
    job = Trainer.build(TrainConfig(batch_size=batch, k=WORKLOAD["k"], index=kind, run_dir="-",
                                    nprobe=ivf.nprobe if ivf is not None else 0), ds,
                        lambda m: None)
    # auto moves nprobe as training would; the fixed rows keep theirs (and are measured)
    check = job.recall = miner.RecallCheck(index, bank, every=1, adjust=kind == "auto", log=log)
    batches = job.epoch_batches(0)
    for i in range(WARM_STEPS):
        job.step([batches[i]])
    job.recall = None
    t = time.perf_counter()
    for i in range(steps):
        job.step([batches[WARM_STEPS + i]])
    return batch * steps / (time.perf_counter() - t), job, check.last


def miner_ivf(index):
    """The IVF part of a faiss index, None for flat and exact ones."""
    import faiss

    return faiss.try_extract_index_ivf(index) if isinstance(index, faiss.Index) else None


def ddp_scaling(steps: int = 60, batch: int = 64) -> dict:
    """Training samples/s of one process against two torchrun ranks at the same global
    batch, on this machine (each rank gets its share of the cores), from the runs'
    steps.jsonl records."""
    from lnsp.data import synth
    from lnsp.config import TrainConfig
    from lnsp.launch.command import environment
    from lnsp.launch.ddp import torchrun_argv
    from lnsp.rundir import RunDir

    rates = {}
    with tempfile.TemporaryDirectory(prefix="lnsp-bench-ddp-") as tmp:
        folder = Path(tmp)
        data = synth.write(folder / "data", chains=WORKLOAD["bank"] // 24 + 1, length=24,
                           dim=WORKLOAD["dim"])
        for ranks in (1, 2):
            config = TrainConfig(data=str(data), run_dir=str(folder / f"run{ranks}"),
                                 epochs=100, max_steps=steps, batch_size=batch,
                                 k=WORKLOAD["k"], log_every=10, eval_windows=100,
                                 threads="fast")
            argv = (torchrun_argv(config, ranks) if ranks > 1 else
                    [sys.executable, "-m", "lnsp", "train", *config.to_argv()])
            env = {**user_environment(), **environment(config, "foreground", ranks)}
            subprocess.run(argv, env=env, capture_output=True, timeout=600, check=True,
                           stdin=subprocess.DEVNULL)
            records = RunDir(config.run_dir).read_steps()[1:]  # after the warm-up interval
            if not records:
                raise RuntimeError(f"bench: the {ranks}-rank run wrote no steps.jsonl records")
            rates[ranks] = float(np.median([r.samples_per_s for r in records]))
    return {"one_rank_samples_per_s": rates[1], "two_ranks_samples_per_s": rates[2],
            "scaling": rates[2] / rates[1]}


def decider_latency(k: int = 500, dim: int = 768, steps: int = 2000) -> dict:
    from lnsp.generate.decider import LANES, decide

    rng = np.random.default_rng(0)
    neighbors = rng.standard_normal((k, dim)).astype(np.float32)
    neighbors /= np.linalg.norm(neighbors, axis=1, keepdims=True)
    ids = np.arange(k)
    lat = []
    for i in range(steps):
        v = neighbors[i % k] + 0.3 * rng.standard_normal(dim).astype(np.float32)
        t = time.perf_counter()
        decide(v, neighbors, ids, LANES["neutral"], recent_ids=list(range(8)))
        lat.append((time.perf_counter() - t) * 1e3)
    return {"k": k, "dim": dim, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


# ---------------------------------------------------------------- orchestration
def _child(args: list[str], threads: str, timeout: float) -> dict:
    from lnsp.guard.threads import policy_env

    env = {**user_environment(), **policy_env(threads)}
    r = subprocess.run([sys.executable, "-m", "lnsp.bench.suite", *args, "--threads", threads],
                       capture_output=True, text=True, env=env,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"bench part {args} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe_wall() -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lnsp", "probe", "--json"],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    wall, result = None, None
    for line in proc.stdout:
        if line.startswith("PROBE RESULT") and wall is None:
            wall = time.perf_counter() - t
        if line.startswith("{"):
            result = json.loads(line)
    proc.wait(120)
    if wall is None or result is None:
        raise RuntimeError(f"bench: the probe printed no result (exit code {proc.returncode})")
    return {"wall_s": wall, "import_s": result["import_s"], "setup_s": result["setup_s"]}


def run(seconds: float = 8.0, seed: bool = True, echo=print) -> dict:
    out = {"workload": WORKLOAD, "targets": TARGETS, "policies": []}
    for batch in (8, 64):
        for threads in ("safe", "fast"):
            echo(f"bench: batch {batch}, threads {threads} ...")
            out["policies"].append(_child(["worker", "--batch", str(batch), "--seconds",
                                           str(seconds)], threads, 600))
    echo("bench: probe wall time ...")
    out["probe"] = probe_wall()
    echo("bench: decider latency ...")
    out["decider"] = decider_latency()
    echo("bench: torch.distributed, 1 process against 2 ranks ...")
    out["ddp"] = ddp_scaling()
    echo("bench: batch 64, threads fast, index flat (faiss) ...")
    out["flat"] = _child(["worker", "--batch", "64", "--seconds", str(seconds), "--index",
                          "flat"], "fast", 600)
    from lnsp.bench import versus

    out["versus"] = []
    for batch in (64, 8):
        echo(f"bench: lnsp's default against a plain user loop, batch {batch} ...")
        out["versus"].append(versus.compare(batch, WORKLOAD["hidden"], WORKLOAD["ctx_len"],
                                            WORKLOAD["k"], WORKLOAD["bank"], WORKLOAD["dim"],
                                            blocks=max(7, int(seconds * 2))))
    echo("bench: the guard's overhead on the plain loop (lnsp run), batch 8 ...")
    out["guard"] = versus.guard_overhead(8, WORKLOAD["hidden"], WORKLOAD["ctx_len"],
                                         WORKLOAD["k"], WORKLOAD["bank"], WORKLOAD["dim"],
                                         blocks=max(7, int(seconds * 2)))
    if seed:
        with tempfile.TemporaryDirectory(prefix="lnsp-bench-bank-") as folder:
            bank = Path(folder) / "bank.npy"
            echo(f"bench: seed scale, writing a {SEED_BANK:,} x 768 bank ...")
            out["seed_scale"] = _child(["seed-write", "--path", str(bank)], "fast", 900)
            for kind in SEED_INDEXES:
                echo(f"bench: seed scale, {kind} index ...")
                out["seed_scale"][kind] = _child(["seed-index", "--path", str(bank), "--index",
                                                  kind], "fast", 900)
    return out


def summary(b: dict) -> tuple[list[str], dict]:
    """The table, and the ratios checked against their targets."""
    by = {(p["batch"], p["threads"]): p for p in b["policies"]}
    vs = {v["batch"]: v for v in b["versus"]}
    ratios = {
        "hardened_ratio": by[(64, "fast")]["hardened_ratio"],
        "vs_plain_b64": vs[64]["ratio"],
        "vs_plain_b8": vs[8]["ratio"],
        "fast_vs_safe_b64": by[(64, "fast")]["bare_samples_per_s"]
        / by[(64, "safe")]["bare_samples_per_s"],
        "flop_fraction_b64": by[(64, "fast")]["flop_fraction"],
        "probe_wall_s": b["probe"]["wall_s"],
        "decider_p99_ms": b["decider"]["p99_ms"],
    }
    if "guard" in b:  # the guard's own CPU per step, timed directly (see versus.guard_work)
        ratios["guard_overhead_b8"] = b["guard"]["overhead_direct"]
    if "seed_scale" in b:
        ratios["ivf_p95_ms"] = min(b["seed_scale"][k]["p95_ms"] for k in SEED_INDEXES
                                   if b["seed_scale"][k]["nprobe"])
        ratios["rss_over_baseline_gb"] = max(b["seed_scale"][k]["over_baseline_gb"]
                                             for k in SEED_INDEXES)
        ratios["seed_train_samples_per_s"] = b["seed_scale"]["auto"]["train_samples_per_s"]
        ratios["seed_mined_recall"] = b["seed_scale"]["auto"]["mined_recall"]
    lines = [f"{'batch':>5} {'threads':<7} {'bare s/s':>9} {'hardened':>9} {'ratio':>6} "
             f"{'vs safe':>7} {'FLOP frac':>9}"]
    for p in b["policies"]:
        safe = by[(p["batch"], "safe")]["bare_samples_per_s"]
        lines.append(f"{p['batch']:>5} {p['threads']:<7} {p['bare_samples_per_s']:>9.1f} "
                     f"{p['hardened_samples_per_s']:>9.1f} {p['hardened_ratio']:>6.3f} "
                     f"{p['bare_samples_per_s'] / safe:>7.2f} {p['flop_fraction']:>9.3f}")
    lines.append(f"probe: {b['probe']['wall_s']:.2f}s to PROBE RESULT "
                 f"(imports {b['probe']['import_s']:.2f}s)")
    lines.append(f"decider (K 500, D 768): p50 {b['decider']['p50_ms']:.3f} ms, "
                 f"p99 {b['decider']['p99_ms']:.3f} ms")
    d = b["ddp"]
    lines.append(f"torchrun, batch 64: 1 process {d['one_rank_samples_per_s']:.1f} samples/s, "
                 f"2 ranks {d['two_ranks_samples_per_s']:.1f} ({d['scaling']:.2f}x)")
    e = b["flat"]
    lines.append(f"   64 fast, flat (faiss) miner: {e['bare_samples_per_s']:.1f} samples/s "
                 f"({e['bare_samples_per_s'] / by[(64, 'fast')]['bare_samples_per_s']:.2f}x "
                 f"auto), FLOP fraction {e['flop_fraction']:.3f}")
    for v in b["versus"]:
        lines.append(f"{v['batch']:>5} plain user loop {v['plain_samples_per_s']:8.1f} samples/s, "
                     f"lnsp default ({v['lnsp_index']}) {v['lnsp_samples_per_s']:8.1f}: "
                     f"{v['ratio']:.2f}x; FLOP fraction {v['flop_fraction']:.3f} (plain "
                     f"{v['plain_flop_fraction']:.3f}); load {v['load_median']:.1f}")
    if "seed_scale" in b:
        s = b["seed_scale"]
        lines.append(f"seed scale {s['bank_rows']:,} x {s['dim']}, {s['topics']} topics "
                     "(batches of 8 queries, K 100):")
        for kind in SEED_INDEXES:
            k = s[kind]
            moved = k.get("calibrated_nprobe") not in (None, k["nprobe"])
            choice = (f"{k['built']} nprobe {k['nprobe']}/{k['nlist']}"
                      + (f" (calibrated {k['calibrated_nprobe']}, moved by the recall check)"
                         if moved else "") if k["nprobe"] else k["built"])
            cal = k.get("calibration") or {}
            check = k.get("recall_check") or {}
            lines.append(f"  {kind:<7} {choice}"
                         + (f", calibrated recall@{cal['k']} {cal['recall']:.3f}" if cal else "")
                         + f", mined recall (model queries) {k['mined_recall']:.3f}"
                         + (f"; a recall check {check['ms']:.0f} ms" if check else ""))
            lines.append(f"  {'':<7} build {k['build_s']:6.1f}s  p50 {k['p50_ms']:8.2f} ms  "
                         f"p95 {k['p95_ms']:8.2f} ms  train {k['train_samples_per_s']:6.1f} "
                         f"samples/s  peak RSS {k['peak_rss_gb']:.2f} GB = runtime "
                         f"{k['runtime_gb']:.2f} + bank {k['bank_gb']:.2f} + index "
                         f"{k['index_gb']:.2f} {k['over_baseline_gb']:+.2f} GB")
    lines.append("")
    lines.append(f"{'measure':<22} {'value':>9} {'target':>9}  met")
    for key, value in ratios.items():
        target = TARGETS[key]
        lower_is_better = key in ("probe_wall_s", "ivf_p95_ms", "rss_over_baseline_gb",
                                  "decider_p99_ms", "guard_overhead_b8")
        met = value <= target if lower_is_better else value >= target
        lines.append(f"{key:<22} {value:>9.3f} {('<=' if lower_is_better else '>=')}"
                     f"{target:>7}  {'yes' if met else 'NO'}")
    if "guard" in b:
        g = b["guard"]
        lines.append(f"guard: {g['guard_step_us']:.1f} us a step on the script's thread, "
                     f"{g['guard_tick_us']:.0f} us a tick ({g['bare_step_ms']:.1f} ms steps); "
                     f"whole steps A/B under lnsp run: median {g['overhead']:+.1%}, "
                     f"quartiles {g['overhead_spread'][0]:+.1%} .. "
                     f"{g['overhead_spread'][1]:+.1%} (the blocks' noise)")
    return lines, ratios


def chart(b: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"b{p['batch']} {p['threads']}" for p in b["policies"]]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [p["bare_samples_per_s"] for p in b["policies"]], 0.4, label="bare")
    ax.bar(x + 0.2, [p["hardened_samples_per_s"] for p in b["policies"]], 0.4,
           label="hardened")
    ax.set_xticks(x, labels)
    ax.set(ylabel="samples/s", title="lnsp training throughput (same machine, one run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def part(name: str, batch: int = 8, threads: str = "fast", seconds: float = 8.0,
         index: str = "auto", path: str | None = None) -> str:
    """One measurement, as the JSON line its orchestrator reads."""
    parts = {"worker": lambda: worker(batch, threads, seconds, index),
             "seed-write": lambda: seed_write(path),
             "seed-index": lambda: seed_index(path, index)}
    return json.dumps(parts[name]())


def _part_main(argv: list[str] | None = None) -> None:
    """`python -m lnsp.bench.suite PART [...]`: one measurement in this process, started by
    the orchestrator (not a user-facing command)."""
    import argparse

    import lnsp  # noqa: F401  (the thread variables before the heavy imports)

    p = argparse.ArgumentParser(prog="python -m lnsp.bench.suite")
    p.add_argument("part", choices=["worker", "seed-write", "seed-index"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", default="fast")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--index", default="auto")
    p.add_argument("--path", default=None)
    a = p.parse_args(argv)
    print(part(a.part, a.batch, a.threads, a.seconds, a.index, a.path))


def main(seconds: float, seed: bool, out: str, echo=print, tb_dir: str | None = None) -> dict:
    """Run everything, print the table, write bench.json and bench.png (and the table
    as TensorBoard scalars and text under `tb_dir` when TensorBoard is installed)."""
    from lnsp.progress import Progress
    from lnsp.rundir import write_json

    # the "bench: ..." lines of run(): 4 policies, probe, decider, ddp, flat, 2 versus
    stages = 10 + (1 + len(SEED_INDEXES) if seed else 0)
    with Progress(stages, "bench", unit="part", interval=0) as bar:
        result = run(seconds, seed, echo=lambda m: (bar.write(m, echo),
                                                    bar.stage(m.removeprefix("bench: "))))
    lines, result["ratios"] = summary(result)
    write_json(out, result)
    drawn = chart(result, Path(out).with_suffix(".png"))
    echo("\n".join(lines))
    echo(f"wrote {out}" + (f" and {drawn}" if drawn else ""))
    if tb_dir:
        _tensorboard(result, lines, tb_dir, echo)
    return result


def _tensorboard(result: dict, lines: list[str], tb_dir: str, echo) -> None:
    """The bench as one TensorBoard run: its ratios beside their targets, each policy's
    throughput, and the printed table as text."""
    from lnsp.observe import tensorboard

    writer = tensorboard.open_writer(tb_dir)
    if isinstance(writer, tensorboard.NullWriter):
        return
    writer.scalars({f"ratio/{k}": v for k, v in result["ratios"].items()}, 0)
    writer.scalars({f"target/{k}": float(TARGETS[k]) for k in result["ratios"]}, 0)
    for p in result["policies"]:
        name = f"b{p['batch']}_{p['threads']}"
        writer.scalars({f"samples_per_s/{name}_{kind}": p[f"{kind}_samples_per_s"]
                        for kind in ("bare", "hardened")}, 0)
    writer.text("bench", "```\n" + "\n".join(lines) + "\n```")
    writer.close()
    echo(f"wrote TensorBoard events to {tb_dir}")


if __name__ == "__main__":
    _part_main()
