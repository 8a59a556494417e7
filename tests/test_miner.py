"""The miners: FAISS flat and IVF, and the torch exact search that must agree with
FAISS's exact answers."""

import faiss
import numpy as np
import pytest

from lnsp.model import miner


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


def test_auto_searches_exactly_while_the_bank_is_small(bank):
    said = []
    index = miner.build(bank, "auto", exact_max=len(bank), log=said.append)
    assert isinstance(index, miner.ExactIndex)
    assert "exact" in said[0] and "1,000 rows" in said[0]


@pytest.fixture(scope="module")
def clustered():
    """Rows around 40 centres, as embeddings of text on a few topics are."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 32))
    x = centres[rng.integers(0, 40, 2000)] + rng.standard_normal((2000, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_builds_ivf_with_calibrated_nprobe_beyond_the_threshold(clustered):
    """nprobe is the fewest lists (a power of two) whose measured recall@K reaches the
    target: the one below it falls short."""
    bank, said = clustered, []
    index = miner.build(bank, "auto", k=20, exact_max=100, log=said.append)
    ivf = faiss.try_extract_index_ivf(index)
    cal = miner.calibration(index)
    assert ivf is not None and ivf.nlist == miner.auto_nlist(2000) == 32
    assert ivf.nprobe == cal["nprobe"] < 32 and cal["recall"] >= miner.RECALL_TARGET
    assert cal["nprobe"] > 1 and cal["tried"][cal["nprobe"] // 2] < miner.RECALL_TARGET
    assert any(f"nprobe {ivf.nprobe} of 32" in m and "recall@20" in m for m in said), said
    # The logged recall is what the index really gives on fresh queries.
    queries = bank[500:600] + 0.5 * np.random.default_rng(5).standard_normal((100, 32)) / 32 ** .5
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    _, got = index.search(queries, 20)
    _, want = miner.ExactIndex(bank).search(queries, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, want)])
    assert recall >= miner.RECALL_TARGET - 0.05


def test_auto_stores_8_bit_codes_when_a_second_copy_would_not_fit(bank, monkeypatch):
    monkeypatch.setattr(miner, "IVF_MEMORY_SHARE", 1e-9)
    assert miner.auto_kind(bank, exact_max=10) == "ivf-sq8"
    assert miner.auto_kind(bank, exact_max=10_000) == "exact"


def _ivf(bank, nlist=32, nprobe=1):
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(bank.shape[1]), bank.shape[1], nlist,
                               faiss.METRIC_INNER_PRODUCT)
    index.train(bank)
    index.add(bank)
    index.nprobe = nprobe
    return index


def _far_queries(n=16, d=32, seed=7):
    """Unit vectors in no neighbourhood of the bank: an untrained model's queries."""
    q = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_recall_check_raises_nprobe_until_the_models_queries_are_served(clustered):
    """Calibrated on queries near the rows, nprobe 1 misses most exact neighbours of
    queries far from them; the check measures that on the queries themselves and raises
    nprobe until the recall reaches the target."""
    index, said = _ivf(clustered), []
    check = miner.RecallCheck(index, clustered, every=1, log=said.append)
    q = _far_queries()
    _, found = index.search(q, 20)
    last = check.observe(q, found)
    assert last["nprobe_before"] == 1 and last["recall"] < miner.MINED_RECALL_TARGET, last
    assert index.nprobe == last["nprobe"] > 1 and last["recall_now"] >= miner.MINED_RECALL_TARGET
    # What the check reports is what the index now gives on these queries.
    _, again = index.search(q, 20)
    _, truth = miner.ExactIndex(clustered).search(q, 20)
    assert miner.overlap(again, truth) == pytest.approx(last["recall_now"], abs=1e-4)
    assert miner.overlap(found, truth) == pytest.approx(last["recall"], abs=1e-4)
    # The power of two below it falls short: the fewest lists that reach the target.
    index.nprobe = last["nprobe"] // 2
    assert miner.overlap(index.search(q, 20)[1], truth) < miner.MINED_RECALL_TARGET
    assert len(said) == 1 and said[0].startswith("[MINER] recall@20") and \
        f"nprobe {last['nprobe']} of 32" in said[0], said


def test_recall_check_that_needs_every_list_says_exact_search_is_the_faster(clustered):
    index, said = _ivf(clustered, nlist=4), []
    last = miner.RecallCheck(index, clustered, every=1, log=said.append).observe(
        _far_queries(), index.search(_far_queries(), 20)[1])
    assert last["nprobe"] == 4 == index.nprobe and last["recall_now"] == 1.0, last
    assert said and "--index exact finds the same, faster" in said[-1], said


def test_recall_check_lowers_nprobe_that_queries_near_the_rows_do_not_need(clustered):
    index, said = _ivf(clustered, nprobe=32), []
    check = miner.RecallCheck(index, clustered, every=1, log=said.append)
    q = clustered[:16]  # queries on the rows themselves: found in their own list
    last = check.observe(q, index.search(q, 20)[1])
    assert last["recall"] == 1.0 and last["nprobe"] == 16 == index.nprobe, last
    assert last["recall_now"] >= miner.MINED_RECALL_TARGET + miner.LOWER_MARGIN
    assert said and "nprobe 16 of 32" in said[0]


def test_recall_check_measures_on_schedule_and_leaves_a_fixed_nprobe(clustered):
    index, said = _ivf(clustered), []
    check = miner.RecallCheck(index, clustered, every=3, adjust=False, log=said.append)
    q = _far_queries()
    found = index.search(q, 20)[1]
    assert [check.observe(q, found) is None for _ in range(6)] == \
        [False, True, True, False, True, True]  # the first search, then every third
    assert index.nprobe == 1 and check.last["searches"] == 4 and check.last["nprobe"] == 1
    assert len(said) == 2 and all("fixed by --nprobe" in m for m in said), said
    # The state a checkpoint keeps: a resumed run mines and checks as this one would.
    index.nprobe = 4
    other = miner.RecallCheck(_ivf(clustered), clustered, every=3)
    other.restore(check.state())
    assert other.state() == {"searches": 6, "nprobe": 4} == check.state()


def test_recall_check_is_off_for_exact_search_and_at_zero(clustered):
    exact = miner.RecallCheck(miner.ExactIndex(clustered), clustered, every=1)
    off = miner.RecallCheck(_ivf(clustered), clustered, every=0)
    q = _far_queries()
    for check in (exact, off):
        assert check.observe(q, np.zeros((16, 20), dtype=np.int64)) is None
        assert check.state() == {} or check.exact is None


# ---------------------------------------------------------------- the IVF cache
CACHE_BUILD = """
import sys
import numpy as np
from lnsp.model import miner
bank = np.load(sys.argv[1])
index = miner.build(bank, "ivf", nlist=16, nprobe=4, data_dir=sys.argv[2], log=lambda m: None)
print(index.ntotal)
"""


def test_the_ivf_cache_survives_two_ranks_building_it_at_once(tmp_path):
    """Two processes (two ranks of one job) build and save the same cache at once:
    each writes a temporary file of its own, so the one that lands is whole."""
    import subprocess
    import sys

    from conftest import env

    rows = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    np.save(tmp_path / "bank.npy", rows)
    script = tmp_path / "build.py"
    script.write_text(CACHE_BUILD)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "bank.npy"),
                               str(tmp_path)], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cached = miner.cache_path(tmp_path, "ivf", 16, rows)
    assert faiss.read_index(str(cached)).ntotal == 20000
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_a_torn_cache_is_built_again_and_a_new_bank_gets_its_own(tmp_path, bank):
    said = []
    cached = miner.cache_path(tmp_path, "ivf", 8, bank)
    cached.write_bytes(b"IxFI torn off")  # a kill mid-write
    index = miner.build(bank, "ivf", nlist=8, nprobe=2, data_dir=tmp_path, log=said.append)
    assert index.ntotal == len(bank) and any("unreadable" in m for m in said), said
    assert faiss.read_index(str(cached)).ntotal == len(bank)  # saved whole this time
    other = np.roll(bank, 1, axis=0)  # the same shape, other rows
    said.clear()
    miner.build(other, "ivf", nlist=8, nprobe=2, data_dir=tmp_path, log=said.append)
    assert not any("Loaded cached" in m for m in said), said
    assert miner.cache_path(tmp_path, "ivf", 8, other) != cached
