"""The hard-negative miner: a FAISS index over the bank, searched synchronously in
the training process. Exact inner product by default, IVF for large banks, or a
prebuilt index.faiss checked against the bank."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

ADD_CHUNK = 65536


def _add(index, bank: np.ndarray) -> None:
    for start in range(0, bank.shape[0], ADD_CHUNK):
        index.add(np.ascontiguousarray(bank[start:start + ADD_CHUNK], dtype=np.float32))


def build(bank: np.ndarray, kind: str = "flat", nlist: int = 256, nprobe: int = 8,
          data_dir: Path | None = None, log=print, seed: int = 0, prebuilt=None):
    """An index over `bank`: the data's checked index.faiss when given, else a cached
    IVF index, else one built now (IVF is then saved beside the data for the next run)."""
    n, d = bank.shape
    if prebuilt is not None:
        _set_nprobe(prebuilt, nprobe)
        return prebuilt
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        _add(index, bank)
        return index
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants ~39 training points per list
    cached = data_dir / f"index.ivf{nlist}.faiss" if data_dir is not None else None
    if cached is not None and cached.exists():
        index = faiss.read_index(str(cached))
        if index.ntotal == n and index.d == d:
            _set_nprobe(index, nprobe)
            log(f"Loaded cached IVF index {cached}")
            return index
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, size=min(n, nlist * 256), replace=False)
    index.train(np.ascontiguousarray(bank[np.sort(sample)], dtype=np.float32))
    _add(index, bank)
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


def _set_nprobe(index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top-k bank rows per query; ids -1 where fewer exist."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
