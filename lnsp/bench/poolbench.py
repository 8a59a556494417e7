"""Per-phase times of one training step under every combination of the process's
thread pools: torch's OpenMP, faiss's OpenMP, the OpenBLAS bundled with faiss and
numpy's OpenBLAS. The wait policy of the OpenMP runtimes is read when they load, so
one process measures one wait policy; `table` runs one process per policy.

    python -m lnsp.bench.poolbench --hidden 768 --wait passive --json out.json
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

PHASES = ("forward", "search_flat", "search_exact", "loss", "backward")
POOLS = ("torch_omp", "faiss_omp", "faiss_blas", "numpy_blas")


def _controllers() -> dict:
    """The four pools by name, as threadpoolctl sees them."""
    import threadpoolctl

    found = {}
    for c in threadpoolctl.ThreadpoolController().lib_controllers:
        owner = "faiss" if "faiss" in c.filepath else "numpy" if "numpy" in c.filepath \
            else "torch" if "torch" in c.filepath else None
        kind = "omp" if c.internal_api == "openmp" else "blas"
        if owner:
            found[f"{owner}_{kind}"] = c
    return found


def set_pools(sizes: dict) -> None:
    """Size each pool; faiss's BLAS before faiss's OpenMP (an OpenMP-built OpenBLAS
    resets its runtime's count when limited)."""
    import faiss
    import torch

    ctl = _controllers()
    for name in ("numpy_blas", "faiss_blas"):
        if name in ctl:
            ctl[name].set_num_threads(sizes[name])
    faiss.omp_set_num_threads(sizes["faiss_omp"])
    torch.set_num_threads(sizes["torch_omp"])


def measure(hidden: int = 768, bank_rows: int = 10_000, dim: int = 768, ctx: int = 10,
            k: int = 100, batches=(8, 64), blocks: int = 7, steps: int = 3,
            cores: int | None = None) -> dict:
    """Median per-phase milliseconds for every pool combination and batch size. The
    combinations alternate block by block, so a burst of load spoils one block of
    each rather than one combination."""
    import faiss
    import numpy as np
    import torch

    from lnsp.model.loss import info_nce
    from lnsp.model.miner import ExactIndex
    from lnsp.model.tower import QueryTower

    cores = cores or os.cpu_count() or 1
    levels = sorted({1, cores})
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((bank_rows, dim), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(dim)
    flat.add(bank)
    exact = ExactIndex(bank)
    bank_t = torch.from_numpy(bank)
    torch.manual_seed(0)
    model = QueryTower(dim, hidden)
    combos = [dict(zip(POOLS, c)) for c in itertools.product(levels, repeat=len(POOLS))]
    times = {(b, i): {p: [] for p in PHASES} for b in batches for i in range(len(combos))}

    def step(batch: int, out: dict) -> None:
        ids = rng.integers(0, bank_rows, size=(batch, ctx + 1))
        context, positive = bank_t[ids[:, :ctx]], bank_t[ids[:, ctx]]
        t = time.perf_counter()
        query = model(context)
        t1 = time.perf_counter()
        q = query.detach().numpy()
        flat.search(q, k + 1)
        t2 = time.perf_counter()
        _, found = exact.search(q, k + 1)
        t3 = time.perf_counter()
        ok = found != ids[:, ctx:]
        loss = info_nce(query, positive, bank_t[np.where(ok, found, 0)], torch.from_numpy(ok),
                        torch.from_numpy(ids[:, ctx]), 0.05)
        t4 = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        for name, a, b in zip(PHASES, (t, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            out[name].append((b - a) * 1e3)

    for batch in batches:  # warm-up: allocator, pools, faiss
        for combo in combos[:: len(combos) - 1]:
            set_pools(combo)
            for _ in range(2):
                step(batch, {p: [] for p in PHASES})
    for _ in range(blocks):
        for batch in batches:
            for i, combo in enumerate(combos):
                set_pools(combo)
                block = {p: [] for p in PHASES}
                for _ in range(steps):
                    step(batch, block)
                for p in PHASES:
                    times[(batch, i)][p].append(float(np.median(block[p])))
    rows = []
    for (batch, i), phases in times.items():
        rows.append({"batch": batch, **combos[i],
                     **{p: float(np.median(v)) for p, v in phases.items()}})
    return {"hidden": hidden, "bank": bank_rows, "dim": dim, "ctx": ctx, "k": k,
            "cores": cores, "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "load": os.getloadavg()[0], "rows": rows}


def table(hidden: int = 768, waits=("passive",), blocks: int = 7) -> list[dict]:
    """One process per OpenMP wait policy (read when the runtimes load)."""
    results = []
    for wait in waits:
        env = {**os.environ, "OMP_WAIT_POLICY": wait.upper(), "KMP_BLOCKTIME": "0"
               if wait == "passive" else "200"}
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LNSP_THREAD_DEFAULTS"):
            env.pop(name, None)
        r = subprocess.run([sys.executable, "-m", "lnsp.bench.poolbench", "--hidden", str(hidden),
                            "--blocks", str(blocks), "--one"], env=env, capture_output=True,
                           text=True, timeout=1800, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"pool measurement failed:\n{r.stderr[-2000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return results


def lines(results: list[dict]) -> list[str]:
    """One row per (wait policy, batch, combination): pool sizes, then phase ms."""
    out = [f"{'wait':<8}{'batch':>5} {'torch':>5} {'f.omp':>5} {'f.blas':>6} {'np.blas':>7} "
           + " ".join(f"{p:>12}" for p in PHASES) + f" {'step':>8}"]
    for r in results:
        for row in sorted(r["rows"], key=lambda x: (x["batch"], *[x[p] for p in POOLS])):
            step = row["forward"] + row["search_exact"] + row["loss"] + row["backward"]
            out.append(f"{r['wait_policy'].lower():<8}{row['batch']:>5} "
                       + " ".join(f"{row[p]:>{w}}" for p, w in zip(POOLS, (5, 5, 6, 7)))
                       + " " + " ".join(f"{row[p]:>12.2f}" for p in PHASES)
                       + f" {step:>8.2f}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--one", action="store_true", help="measure in this process only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.hidden, blocks=args.blocks)))
    else:
        res = table(args.hidden, blocks=args.blocks)
        print("\n".join(lines(res)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f)
