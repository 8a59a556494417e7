"""The miners: FAISS flat and IVF, and the torch exact search that must agree with
FAISS's exact answers."""

import faiss
import numpy as np
import pytest

from lnsp import miner


@pytest.fixture(scope="module")
def bank():
    x = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [100, 333, miner.EXACT_CHUNK])
def test_exact_index_agrees_with_faiss_flat(bank, monkeypatch, chunk):
    monkeypatch.setattr(miner, "EXACT_CHUNK", chunk)
    queries = bank[:17] + 0.1
    flat = faiss.IndexFlatIP(32)
    flat.add(bank)
    want_scores, want_ids = flat.search(queries, 25)
    got_scores, got_ids = miner.build(bank, "exact").search(queries, 25)
    assert np.array_equal(got_ids, want_ids)
    assert np.allclose(got_scores, want_scores, atol=1e-5)


def test_exact_index_pads_like_faiss_when_k_exceeds_the_bank(bank):
    scores, ids = miner.ExactIndex(bank[:5]).search(bank[:2], 8)
    assert (ids[:, 5:] == -1).all() and sorted(ids[0, :5]) == [0, 1, 2, 3, 4]
    assert np.isneginf(scores[:, 5:]).all()


def test_ivf_finds_most_exact_neighbours(bank):
    index = miner.build(bank, "ivf", nlist=16, nprobe=8, log=lambda m: None)
    _, ivf_ids = index.search(bank[:50], 10)
    _, exact_ids = miner.ExactIndex(bank).search(bank[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf_ids, exact_ids)])
    assert recall > 0.8 and (ivf_ids[:, 0] == np.arange(50)).all()
