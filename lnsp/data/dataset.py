"""A data directory: load and check bank.npy, chains.npz and index.faiss, and cut
the chains into (context, next) windows split by chain."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lnsp.errors import DataError  # noqa: F401  (raised here; callers catch it from here)

CHUNK = 65536  # rows checked at a time, so a memory-mapped bank is never copied whole


@dataclass
class Dataset:
    root: Path
    bank: np.ndarray  # (N, D) float32, unit rows; memory-mapped when possible
    ids: np.ndarray  # (M,) int64
    offsets: np.ndarray  # (C+1,) int64
    index: object = None  # the prebuilt index.faiss, checked against the bank

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def chain(self, c: int) -> np.ndarray:
        return self.ids[self.offsets[c]:self.offsets[c + 1]]


def load_bank(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing (expected a float32 (N, D) .npy array)")
    try:
        bank = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if bank.dtype not in (np.float32, np.float64):
        raise DataError(f"{path}: dtype {bank.dtype}, expected float32")
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise DataError(f"{path}: shape {bank.shape}, expected (N, D) with N, D > 0")
    if bank.dtype == np.float64:
        warnings.warn(f"{path}: float64 bank converted to float32 in memory", stacklevel=2)
        bank = np.ascontiguousarray(bank, dtype=np.float32)
    renormalise = False
    for start in range(0, bank.shape[0], CHUNK):
        rows = np.asarray(bank[start:start + CHUNK])
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise DataError(f"{path}: row {start + int(np.argmax(bad))} holds NaN or Inf")
        norms = np.linalg.norm(rows, axis=1)
        if (norms == 0).any():
            raise DataError(f"{path}: row {start + int(np.argmax(norms == 0))} is all zeros")
        renormalise |= bool((np.abs(norms - 1) > 1e-3).any())
    if renormalise:
        warnings.warn(f"{path}: rows are not unit norm; normalised in memory", stacklevel=2)
        bank = np.asarray(bank, dtype=np.float32)
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    return bank


def load_chains(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: missing (expected arrays 'ids' and 'offsets')")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"ids", "offsets"} - set(z.files)
            if missing:
                raise DataError(f"{path}: no array named {', '.join(sorted(missing))}")
            ids, offsets = z["ids"], z["offsets"]
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle/OS errors all mean the same to the user
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    for name, a in (("ids", ids), ("offsets", offsets)):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: '{name}' must be a 1-D integer array "
                            f"(got {a.dtype} {a.shape})")
    ids, offsets = ids.astype(np.int64), offsets.astype(np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f"{path}: ids out of range: bank has {n} rows, "
                        f"ids span {ids.min()}..{ids.max()}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise DataError(f"{path}: offsets must start at 0 and end at len(ids)={len(ids)}")
    if (np.diff(offsets) < 0).any():
        raise DataError(f"{path}: offsets are not monotone "
                        f"(decrease at position {int(np.argmax(np.diff(offsets) < 0)) + 1})")
    return ids, offsets


def load(root: str | Path, ctx_len: int) -> Dataset:
    """Load and check a data directory; raises DataError on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found")
    bank = load_bank(root / "bank.npy")
    ids, offsets = load_chains(root / "chains.npz", bank.shape[0])
    longest = int(np.diff(offsets).max())
    if longest < ctx_len + 1:
        raise DataError(f"{root / 'chains.npz'}: no chain is long enough for a window "
                        f"(longest {longest}, ctx_len {ctx_len} needs {ctx_len + 1})")
    return Dataset(root, bank, ids, offsets, load_index(root / "index.faiss", *bank.shape))


def load_index(path: Path, n: int, d: int):
    """The prebuilt FAISS index when present; it must hold exactly the bank's rows."""
    if not path.exists():
        return None
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0]})") from None
    if index.ntotal != n or index.d != d:
        raise DataError(f"{path}: holds {index.ntotal} vectors of dimension {index.d}, "
                        f"bank.npy has {n} of dimension {d}")
    return index


def split_chains(ds: Dataset, ctx_len: int, val_fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Chain indices for training and held out (at least one each when possible)."""
    lengths = np.diff(ds.offsets)
    usable = np.flatnonzero(lengths >= ctx_len + 1)
    order = np.random.default_rng(seed).permutation(usable)
    n_val = int(round(len(order) * val_fraction)) if len(order) > 1 else 0
    n_val = min(max(n_val, 1 if len(order) > 1 else 0), max(len(order) - 1, 0))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def windows(ds: Dataset, ctx_len: int, val_fraction: float, seed: int, rank: int = 0,
            world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Start positions (into ds.ids) of training and held-out windows, split by chain;
    with several ranks, each takes every world-th training chain."""

    def starts(chains: np.ndarray) -> np.ndarray:
        parts = [np.arange(ds.offsets[c], ds.offsets[c + 1] - ctx_len) for c in chains]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    train, held_out = split_chains(ds, ctx_len, val_fraction, seed)
    return starts(train[rank::world]), starts(held_out)


def window_ids(ds: Dataset, starts: np.ndarray, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, ctx_len) context ids and (B,) next ids of the windows at `starts`."""
    ctx = ds.ids[starts[:, None] + np.arange(ctx_len)[None, :]]
    return ctx, ds.ids[starts + ctx_len]
