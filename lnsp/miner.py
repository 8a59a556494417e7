"""The hard-negative miner: a FAISS index over the bank, searched synchronously in
the training process. Exact inner product by default, IVF for large banks, a
prebuilt index.faiss checked against the bank, or `exact`: the same exact search as
a torch GEMM + top-k (faiss's bundled BLAS measured 3.5x slower here)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

ADD_CHUNK = 65536
EXACT_CHUNK = 262144  # bank rows per GEMM in ExactIndex: bounds the score matrix


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


def build(bank: np.ndarray, kind: str = "flat", nlist: int = 256, nprobe: int = 8,
          data_dir: Path | None = None, log=print, seed: int = 0, prebuilt=None):
    """An index over `bank`: the data's checked index.faiss when given, else a cached
    IVF index, else one built now (IVF is then saved beside the data for the next run)."""
    n, d = bank.shape
    if prebuilt is not None:
        _set_nprobe(prebuilt, nprobe)
        return prebuilt
    if kind == "exact":
        return ExactIndex(bank)
    from lnsp.progress import Progress

    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        with Progress(n, "index", unit="rows") as bar:
            _add(index, bank, bar)
        return index
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants ~39 training points per list
    name = f"index.{kind.replace('-', '')}{nlist}.faiss"  # index.ivf1024.faiss, ...
    cached = data_dir / name if data_dir is not None else None
    if cached is not None and cached.exists():
        index = faiss.read_index(str(cached))
        if index.ntotal == n and index.d == d:
            _set_nprobe(index, nprobe)
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
    with Progress(2 * n, "index", unit="rows") as bar:  # assign (to reserve), then add
        bar.set(0, "train")
        index.train(np.ascontiguousarray(bank[np.sort(sample)], dtype=np.float32))
        _reserve_lists(index, bank, bar)
        _add(index, bank, bar)
    _set_nprobe(index, nprobe)
    if cached is not None:
        try:
            tmp = cached.with_suffix(".tmp")
            faiss.write_index(index, str(tmp))
            tmp.replace(cached)
            log(f"Saved IVF index to {cached} for the next run")
        except (OSError, RuntimeError) as e:  # read-only data directory: fine, build again
            log(f"Could not save IVF index beside the data ({e}); continuing")
    return index


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
