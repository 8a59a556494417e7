"""The hard-negative miner: an index over the bank, searched synchronously in the
training process. `auto` (the default): exact inner product while the bank is small
enough for it to win, IVF beyond, with nprobe calibrated at build time to a measured
recall. Or a fixed choice: `exact` (a torch GEMM + top-k; faiss's bundled OpenBLAS
measured 3.5x slower here), `flat` (faiss IndexFlatIP), `ivf`, `ivf-sq8` (8-bit
codes), or a prebuilt index.faiss checked against the bank."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

ADD_CHUNK = 65536
EXACT_CHUNK = 262144  # bank rows per GEMM in ExactIndex: bounds the score matrix
# `auto` searches exactly up to this many bank rows: below it the torch GEMM over the
# whole bank is faster than an IVF index calibrated to RECALL_TARGET (measured
# crossover, docs/performance.md), and needs no build.
AUTO_EXACT_MAX = 50_000
RECALL_TARGET = 0.95  # recall@K against exact search that auto's nprobe must reach
CALIBRATION_QUERIES = 256
# In training: the recall@K of the mined list for the model's own queries against exact
# search, measured every `--recall-every` searches, that an unfixed nprobe is raised to hold.
MINED_RECALL_TARGET = 0.9
LOWER_MARGIN = 0.05  # nprobe is halved only when the halved setting keeps target + this
# A flat IVF index holds a second float32 copy of the bank: above this share of the
# available memory auto stores 8-bit codes instead (a quarter of the bytes).
IVF_MEMORY_SHARE = 0.5


class ExactIndex:
    """Exact inner-product search with torch: a GEMM over the bank in chunks and a
    top-k merge. The same answers as faiss.IndexFlatIP (up to ties), with torch's
    BLAS. The bank stays where it is (a memory map is not copied)."""

    def __init__(self, bank: np.ndarray):
        import warnings

        import torch

        with warnings.catch_warnings():  # a read-only memory map: torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            self.bank = torch.from_numpy(np.asarray(bank, dtype=np.float32))
        self.ntotal, self.d = bank.shape

    def search(self, queries: np.ndarray, k: int):
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        scores = torch.full((len(q), 0), float("-inf"))
        ids = torch.zeros((len(q), 0), dtype=torch.int64)
        with torch.no_grad():
            for start in range(0, self.ntotal, EXACT_CHUNK):
                block = q @ self.bank[start:start + EXACT_CHUNK].T
                top = torch.topk(block, min(k, block.shape[1]), dim=1)
                scores = torch.cat([scores, top.values], dim=1)
                ids = torch.cat([ids, top.indices + start], dim=1)
                if scores.shape[1] > k:
                    keep = torch.topk(scores, k, dim=1).indices
                    scores, ids = scores.gather(1, keep), ids.gather(1, keep)
        if scores.shape[1] < k:  # fewer rows than k: pad as faiss does
            pad = k - scores.shape[1]
            scores = torch.cat([scores, torch.full((len(q), pad), float("-inf"))], dim=1)
            ids = torch.cat([ids, torch.full((len(q), pad), -1, dtype=torch.int64)], dim=1)
        return scores.numpy(), ids.numpy()


def _add(index, bank: np.ndarray, bar=None) -> None:
    for start in range(0, bank.shape[0], ADD_CHUNK):
        index.add(np.ascontiguousarray(bank[start:start + ADD_CHUNK], dtype=np.float32))
        if bar:
            bar.update(min(ADD_CHUNK, bank.shape[0] - start), "add")


def auto_nlist(n: int) -> int:
    """IVF lists for n rows: a power of two near sqrt(n) (faiss's rule of thumb), so
    that the lists scanned and the centroids compared cost about the same."""
    return int(2 ** round(np.log2(max(1.0, np.sqrt(n)))))


def auto_kind(bank: np.ndarray, exact_max: int | None = None) -> str:
    """What `auto` builds for this bank: exact, ivf or ivf-sq8."""
    n, d = bank.shape
    if n <= (AUTO_EXACT_MAX if exact_max is None else exact_max):
        return "exact"
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        available = float("inf")
    return "ivf-sq8" if n * d * 4 > IVF_MEMORY_SHARE * available else "ivf"


def build(bank: np.ndarray, kind: str = "auto", nlist: int = 0, nprobe: int = 0,
          data_dir: Path | None = None, log=print, seed: int = 0, prebuilt=None,
          k: int = 100, exact_max: int | None = None):
    """An index over `bank`: the data's checked index.faiss when given, else a cached
    IVF index, else one built now (IVF is then saved beside the data for the next run).
    nlist 0: about sqrt(rows); nprobe 0: the fewest lists reaching RECALL_TARGET
    recall@k against exact search on a sample (measured and logged here). `auto` keeps
    exact search when the calibrated IVF index turns out the slower, unless
    `exact_max` (the size threshold) is given, which then decides alone."""
    n, d = bank.shape
    if prebuilt is not None:
        if nprobe:
            _set_nprobe(prebuilt, nprobe)
        elif isinstance(prebuilt, faiss.Index) and faiss.try_extract_index_ivf(prebuilt):
            calibrate(prebuilt, bank, k, log=log, seed=seed)
        return prebuilt
    requested = kind
    if kind == "auto":
        kind = auto_kind(bank, exact_max)
        limit = AUTO_EXACT_MAX if exact_max is None else exact_max
        log(f"Index auto: {kind} for {n:,} rows ("
            + (f"<= {limit:,}: exact search is the faster" if kind == "exact" else
               f"> {limit:,}: IVF" + (", 8-bit codes to fit the memory" if kind == "ivf-sq8"
                                      else "")) + ")")
    if kind == "exact":
        return ExactIndex(bank)
    from lnsp.progress import Progress

    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        with Progress(n, "index", unit="rows") as bar:
            _add(index, bank, bar)
        return index
    auto = kind != requested
    index = _ivf(bank, kind, nlist or auto_nlist(n), data_dir, log, seed)
    if nprobe:
        _set_nprobe(index, nprobe)
        return index
    cal = calibrate(index, bank, k, log=log, seed=seed)
    if auto and exact_max is None and cal["ms_per_query"] >= cal["exact_ms_per_query"]:
        # No neighbourhood structure to exploit (isotropic rows, say): the lists that
        # reach the recall cost more than reading the whole bank.
        log(f"Index auto: exact after all: IVF at recall {cal['recall']:.3f} takes "
            f"{cal['ms_per_query']:.3f} ms a query, exact search {cal['exact_ms_per_query']:.3f}")
        return ExactIndex(bank)
    return index


def fingerprint(bank: np.ndarray, rows: int = 257) -> str:
    """What the bank holds, cheaply: its shape and a hash of rows spread over it (a new
    bank of the same shape gets a new cached index, not the old one's lists)."""
    import hashlib

    n = bank.shape[0]
    picked = np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))
    h = hashlib.sha1(repr(bank.shape).encode())
    h.update(np.ascontiguousarray(bank[picked], dtype=np.float32).tobytes())
    return h.hexdigest()[:12]


def cache_path(data_dir: Path, kind: str, nlist: int, bank: np.ndarray) -> Path:
    """The cached IVF index of this bank: index.ivf1024-<fingerprint>.faiss, ..."""
    return Path(data_dir) / f"index.{kind.replace('-', '')}{nlist}-{fingerprint(bank)}.faiss"


def _ivf(bank: np.ndarray, kind: str, nlist: int, data_dir: Path | None, log, seed: int):
    n, d = bank.shape
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants ~39 training points per list
    cached = cache_path(data_dir, kind, nlist, bank) if data_dir is not None else None
    if cached is not None and cached.exists():
        try:
            index = faiss.read_index(str(cached))
        except (RuntimeError, OSError) as e:  # torn (a kill mid-write), or unreadable
            log(f"Cached IVF index {cached} unreadable ({str(e).splitlines()[0][:80]}); "
                "building it again")
            index = None
        if index is not None and index.ntotal == n and index.d == d:
            log(f"Loaded cached IVF index {cached}")
            return index
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf-sq8":  # 1 byte per dimension: a quarter of the memory traffic
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    # ~100 points per list trains k-means well enough and bounds the extra memory.
    sample = np.random.default_rng(seed).choice(n, size=min(n, nlist * 100), replace=False)
    from lnsp.progress import Progress

    with Progress(2 * n, "index", unit="rows") as bar:  # assign (to reserve), then add
        bar.set(0, "train")
        index.train(np.ascontiguousarray(bank[np.sort(sample)], dtype=np.float32))
        _reserve_lists(index, bank, bar)
        _add(index, bank, bar)
    if cached is not None:
        # A temporary name of this process's own: ranks that build at once each write
        # a whole file and the last rename wins (the same index: the same seed).
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        try:
            faiss.write_index(index, str(tmp))
            tmp.replace(cached)
            log(f"Saved IVF index to {cached} for the next run")
        except (OSError, RuntimeError) as e:  # read-only data directory: fine, build again
            tmp.unlink(missing_ok=True)
            log(f"Could not save IVF index beside the data ({e}); continuing")
    return index


def calibrate(index, bank: np.ndarray, k: int = 100, target: float = RECALL_TARGET,
              queries: int = CALIBRATION_QUERIES, log=print, seed: int = 0) -> dict:
    """Set the IVF index's nprobe to the fewest lists (a power of two) whose recall@k
    against exact search reaches `target` on a sample of queries, and return what was
    measured. The queries are bank rows moved by noise (cosine ~0.9 to the row): near
    the data, as a trained query tower's outputs are, without being rows themselves."""
    import time

    ivf = faiss.try_extract_index_ivf(index)
    n, d = bank.shape
    rng = np.random.default_rng(seed + 1)
    rows = np.asarray(bank[np.sort(rng.choice(n, size=min(n, queries), replace=False))],
                      dtype=np.float32)
    noise = rng.standard_normal(rows.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    q = rows + 0.5 * noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k = min(k, n)
    t = time.perf_counter()
    _, truth = ExactIndex(bank).search(q, k)
    exact_ms = (time.perf_counter() - t) * 1e3 / len(q)
    tried = {}
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        t = time.perf_counter()
        _, found = index.search(q, k)
        ms = (time.perf_counter() - t) * 1e3 / len(q)
        recall = overlap(found, truth)
        tried[nprobe] = recall
        if recall >= target or nprobe >= ivf.nlist:
            break
        nprobe = min(2 * nprobe, ivf.nlist)
    result = {"nlist": int(ivf.nlist), "nprobe": nprobe, "recall": recall, "k": k,
              "target": target, "queries": len(q), "ms_per_query": ms, "exact_ms_per_query": exact_ms,
              "tried": tried}
    log(f"IVF calibrated: nprobe {nprobe} of {ivf.nlist} lists, recall@{k} {recall:.3f} "
        f"against exact on {len(q)} sample queries (target {target})"
        + ("" if recall >= target else ": target not reached even scanning every list"))
    _CALIBRATIONS[id(index)] = result
    return result


_CALIBRATIONS: dict[int, dict] = {}  # faiss objects take no new attributes


def calibration(index) -> dict | None:
    """What calibrate() measured for this index (nprobe, recall, ...), if it ran."""
    return _CALIBRATIONS.get(id(index))


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` (ids) that `found` holds too: recall@K."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))


class RecallCheck:
    """The miner's recall where it matters: for the model's own queries. Calibration at
    build time uses queries near bank rows; a model's queries can sit far from every row
    (early in training, say), and there an nprobe calibrated at 0.99 can find a few
    percent of the true neighbours. At the first training search and every `every`
    after it, the batch's queries are searched exactly as well (a GEMM over the whole
    bank) and the overlap is measured. When nprobe was not fixed by the user, it is
    doubled until the recall reaches `target` on those same queries, and halved again
    when the halved setting still keeps target + LOWER_MARGIN (the model's queries move
    as it learns). Each change is logged; `last` is the latest measure (steps.jsonl
    carries it). IVF only: exact and flat indexes need no check."""

    def __init__(self, index, bank: np.ndarray, every: int, adjust: bool = True,
                 target: float = MINED_RECALL_TARGET, log=print):
        self.index, self.every, self.adjust, self.target, self.log = \
            index, every, adjust, target, log
        self.ivf = faiss.try_extract_index_ivf(index) if isinstance(index, faiss.Index) else None
        self.exact = ExactIndex(bank) if self.ivf is not None and every > 0 else None
        self.searches = 0
        self.last: dict | None = None

    def observe(self, queries: np.ndarray, found: np.ndarray) -> dict | None:
        """After a training search of `queries` that returned the ids `found`: the measure
        when one was due (None otherwise); nprobe moved as described above."""
        if self.exact is None:
            return None
        self.searches += 1
        if (self.searches - 1) % self.every:  # the first search, then every `every`
            return None
        import time

        started = time.perf_counter()
        k = found.shape[1]
        _, truth = self.exact.search(queries, k)
        measured = recall = overlap(found, truth)
        before = nprobe = int(self.ivf.nprobe)
        if self.adjust and recall < self.target:
            while recall < self.target and nprobe < self.ivf.nlist:
                nprobe = min(2 * nprobe, int(self.ivf.nlist))
                recall = self._recall_at(nprobe, queries, truth)
        elif self.adjust and nprobe > 1:
            lower = self._recall_at(nprobe // 2, queries, truth)
            if lower >= self.target + LOWER_MARGIN:
                nprobe, recall = nprobe // 2, lower
        self.ivf.nprobe = nprobe
        self.last = {"searches": self.searches, "recall": round(measured, 4),
                     "nprobe_before": before, "nprobe": nprobe, "recall_now": round(recall, 4),
                     "target": self.target, "k": k,
                     "ms": round((time.perf_counter() - started) * 1e3, 1)}
        if nprobe != before:
            self.log(f"[MINER] recall@{k} {measured:.3f} for the model's queries at nprobe "
                     f"{before}: nprobe {nprobe} of {self.ivf.nlist} (recall {recall:.3f}, "
                     f"target {self.target})"
                     + ("; every list is searched now: --index exact finds the same, faster"
                        if nprobe == self.ivf.nlist else ""))
        elif recall < self.target:
            self.log(f"[MINER] recall@{k} {measured:.3f} for the model's queries at nprobe "
                     f"{before}, below {self.target}"
                     + (" (nprobe is fixed by --nprobe)" if not self.adjust else
                        " with every list searched"))
        return self.last

    def _recall_at(self, nprobe: int, queries: np.ndarray, truth: np.ndarray) -> float:
        self.ivf.nprobe = nprobe
        return overlap(self.index.search(queries, truth.shape[1])[1], truth)

    def state(self) -> dict:
        """For the checkpoint: a resumed run mines with the same nprobe and checks on the
        same searches as an uninterrupted one."""
        if self.ivf is None:
            return {}
        return {"searches": self.searches, "nprobe": int(self.ivf.nprobe)}

    def restore(self, state: dict | None) -> None:
        if self.ivf is None or not state:
            return
        self.searches = int(state.get("searches", 0))
        self.ivf.nprobe = int(state.get("nprobe", self.ivf.nprobe))


def _reserve_lists(index, bank: np.ndarray, bar=None) -> None:
    """Give each inverted list its final capacity before adding: lists that grow by
    doubling hold up to twice the index in memory at the end of a build."""
    counts = np.zeros(index.nlist, dtype=np.int64)
    for start in range(0, bank.shape[0], ADD_CHUNK):
        rows = np.ascontiguousarray(bank[start:start + ADD_CHUNK], dtype=np.float32)
        _, assign = index.quantizer.search(rows, 1)
        counts += np.bincount(assign.ravel(), minlength=index.nlist)
        if bar:
            bar.update(len(rows), "assign")
    lists = faiss.downcast_InvertedLists(index.invlists)
    for list_no, count in enumerate(counts):
        lists.resize(list_no, int(count))  # a vector shrunk to 0 keeps its capacity
        lists.resize(list_no, 0)


def _set_nprobe(index, nprobe: int) -> None:
    if not isinstance(index, faiss.Index):  # ExactIndex has no lists to probe
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top-k bank rows per query; ids -1 where fewer exist."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
