"""Every bad input: one line naming the file and the problem, exit code 2, no
traceback, and no run directory left behind."""

import subprocess
import sys

import faiss
import numpy as np
import pytest

from conftest import env

PROBLEMS = {
    "missing bank": (lambda d: (d / "bank.npy").unlink(), "bank.npy: missing"),
    "missing chains": (lambda d: (d / "chains.npz").unlink(), "chains.npz: missing"),
    "wrong dtype": (lambda d: np.save(d / "bank.npy", np.ones((10, 4), np.int32)),
                    "dtype int32"),
    "wrong shape": (lambda d: np.save(d / "bank.npy", np.ones(10, np.float32)), "shape (10,)"),
    "not npy": (lambda d: (d / "bank.npy").write_text("hello"), "not a readable .npy"),
    "nan": (lambda d: _bank(d, nan_row=3), "row 3 holds NaN or Inf"),
    "inf": (lambda d: _bank(d, inf_row=5), "row 5 holds NaN or Inf"),
    "zero row": (lambda d: _bank(d, zero_row=2), "row 2 is all zeros"),
    "ids out of range": (lambda d: _chains(d, ids=[0, 1, 2, 99]), "ids out of range"),
    "offsets not monotone": (lambda d: _chains(d, offsets=[0, 5, 3, 8]), "not monotone"),
    "offsets wrong end": (lambda d: _chains(d, offsets=[0, 2]), "end at len(ids)"),
    "no ids array": (lambda d: np.savez(d / "chains.npz", offsets=np.array([0])),
                     "no array named ids"),
    "float ids": (lambda d: np.savez(d / "chains.npz", ids=np.zeros(4),
                                     offsets=np.array([0, 4])), "1-D integer"),
    "no window long enough": (lambda d: _chains(d, ids=[0, 1, 2, 3], offsets=[0, 2, 4]),
                              "no chain is long enough"),
    "index mismatch": (lambda d: _index(d, 5), "holds 5 vectors"),
    "index unreadable": (lambda d: (d / "index.faiss").write_text("nope"),
                         "not a readable FAISS index"),
    "no data dir": (lambda d: __import__("shutil").rmtree(d), "data directory not found"),
}


def _bank(d, nan_row=None, inf_row=None, zero_row=None):
    bank = np.eye(8, 4, dtype=np.float32) + np.eye(8, 4, k=-4, dtype=np.float32)
    if nan_row is not None:
        bank[nan_row, 0] = np.nan
    if inf_row is not None:
        bank[inf_row, 1] = np.inf
    if zero_row is not None:
        bank[zero_row] = 0
    np.save(d / "bank.npy", bank)


def _chains(d, ids=(0, 1, 2, 3, 4, 5, 6, 7), offsets=None):
    ids = np.array(ids)
    offsets = np.array(offsets if offsets is not None else [0, len(ids)])
    np.savez(d / "chains.npz", ids=ids, offsets=offsets)


def _index(d, n):
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(n, 4, dtype=np.float32))
    faiss.write_index(index, str(d / "index.faiss"))


def test_every_bad_input_is_one_line_exit_2(tmp_path):
    # All cases run at once: each is a real `lnsp train` process.
    procs = {}
    for name, (breaks, _) in PROBLEMS.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        _bank(d)
        _chains(d)
        breaks(d)
        run_dir = tmp_path / ("run_" + name.replace(" ", "_"))
        procs[name] = (run_dir, subprocess.Popen(
            [sys.executable, "-m", "lnsp", "train", "--data", str(d), "--run-dir",
             str(run_dir), "--ctx-len", "3", "--threads", "safe"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
    for name, (run_dir, proc) in procs.items():
        out, err = proc.communicate(timeout=90)
        expected = PROBLEMS[name][1]
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{out}\n{err}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], f"{name}: {err!r}"
        assert "Traceback" not in err + out, name
        assert not run_dir.exists(), f"{name}: left a run directory behind"


def test_float64_bank_is_converted_with_a_warning(tmp_path):
    from lnsp.data import dataset as data

    _bank(tmp_path)
    np.save(tmp_path / "bank.npy", np.load(tmp_path / "bank.npy").astype(np.float64))
    _chains(tmp_path)
    with pytest.warns(UserWarning, match="float64"):
        ds = data.load(tmp_path, ctx_len=3)
    assert ds.bank.dtype == np.float32


def test_bank_is_memory_mapped(small_data):
    from lnsp.data import dataset as data

    ds = data.load(small_data, ctx_len=10)
    assert isinstance(ds.bank, np.memmap)


def test_split_is_by_chain(small_data):
    from lnsp.data import dataset as data

    ds = data.load(small_data, ctx_len=10)
    train, val = data.windows(ds, 10, 0.2, seed=0)
    chain_of = np.searchsorted(ds.offsets, np.concatenate([train, val]), side="right") - 1
    train_chains = set(chain_of[:len(train)])
    val_chains = set(chain_of[len(train):])
    assert train_chains and val_chains and not train_chains & val_chains
