"""The dual-path decider at exact constructed cosines, the guard, the lanes and the
retriever's failure paths."""

import threading

import faiss
import numpy as np
import pytest

from lnsp.generate.decider import LANES, blend_weight, decide, lane
from lnsp.generate.generation import Retriever

NEUTRAL = LANES["neutral"]
D = 16


def pair(c: float, nid: int = 7):
    """v and one neighbour at cosine c (the neighbour deliberately not unit norm)."""
    v = np.zeros(D)
    v[0] = 1.0
    n = np.zeros(D)
    n[0], n[1] = c, np.sqrt(1 - c * c)
    return v, 2.5 * n[None, :], np.array([nid])


@pytest.mark.parametrize("c, expected", [
    (0.99, "SNAP"), (0.92 + 1e-9, "SNAP"), (0.92 - 1e-6, "BLEND"), (0.88, "BLEND"),
    (0.85 + 1e-6, "BLEND"), (0.85 - 1e-9, "NOVEL"), (0.5, "NOVEL"), (-0.3, "NOVEL")])
def test_each_path_at_its_thresholds(c, expected):
    v, n, ids = pair(c)
    d = decide(v, n, ids, NEUTRAL)
    assert d.decision == expected and d.c == pytest.approx(c, abs=1e-7)
    assert np.linalg.norm(d.vector) == pytest.approx(1.0, abs=1e-6)
    if expected == "SNAP":
        assert np.allclose(d.vector, n[0] / np.linalg.norm(n[0]), atol=1e-6)
        assert d.neighbor_id == 7 and d.alpha is None
    if expected == "NOVEL":
        assert np.allclose(d.vector, v, atol=1e-6) and d.alpha is None
    if expected == "BLEND":
        a = blend_weight(d.c)
        mix = a * v + (1 - a) * n[0] / np.linalg.norm(n[0])
        assert d.alpha == pytest.approx(a)
        assert np.allclose(d.vector, mix / np.linalg.norm(mix), atol=1e-6)


@pytest.mark.parametrize("c, weight", [
    (0.0, 0.3), (0.86, 0.3), (0.885, 0.5), (0.91, 0.7), (0.93, 0.8), (0.95, 0.9),
    (0.97, 0.9), (1.0, 0.9)])
def test_weight_schedule(c, weight):
    assert blend_weight(c) == pytest.approx(weight)


def test_weight_schedule_is_continuous_and_monotone():
    cs = np.linspace(0.8, 1.0, 2001)
    w = np.array([blend_weight(c) for c in cs])
    assert (np.diff(w) >= -1e-12).all() and np.abs(np.diff(w)).max() < 1e-3


def test_c_is_the_best_of_all_neighbours_computed_from_vectors():
    v, n1, _ = pair(0.5, 1)
    _, n2, _ = pair(0.95, 2)
    d = decide(v, np.vstack([n1, n2]), np.array([1, 2]), NEUTRAL)
    assert d.neighbor_id == 2 and d.c == pytest.approx(0.95) and d.decision == "SNAP"


def test_near_duplicate_guard_and_its_window():
    v, n, ids = pair(0.99, 42)
    recent = [42] + list(range(100, 107))  # 42 is 8th from the end: inside
    assert decide(v, n, ids, NEUTRAL, recent).decision == "NOVEL_DUP_DROP"
    recent = [42] + list(range(100, 108))  # 9th from the end: outside
    assert decide(v, n, ids, NEUTRAL, recent).decision == "SNAP"
    v, n, ids = pair(0.975, 42)  # not above 0.98: no guard
    assert decide(v, n, ids, NEUTRAL, [42]).decision == "SNAP"
    dropped = decide(*pair(0.99, 42), NEUTRAL, [42])
    assert np.allclose(dropped.vector, pair(0.99)[0])


@pytest.mark.parametrize("name, snap, novel, k", [
    ("conservative", 0.94, 0.88, 500), ("neutral", 0.92, 0.85, 500),
    ("creative", 0.90, 0.82, 300)])
def test_lanes(name, snap, novel, k):
    profile = lane(name)
    assert (profile.tau_snap, profile.tau_novel, profile.k) == (snap, novel, k)
    v, n, ids = pair(snap - 0.005)
    assert decide(v, n, ids, profile).decision == "BLEND"
    v, n, ids = pair(novel - 0.005)
    assert decide(v, n, ids, profile).decision == "NOVEL"


def test_lane_overrides_and_bad_values():
    assert lane("creative", tau_snap=0.95, k=10).tau_snap == 0.95
    with pytest.raises(ValueError):
        lane("wild")
    with pytest.raises(ValueError):
        lane("neutral", tau_snap=0.8, tau_novel=0.9)


def test_a_failing_retriever_gives_none_and_is_logged():
    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32))
    said = []
    r = Retriever(index, np.eye(8, dtype=np.float32), log=said.append)
    assert r.search(np.ones(5, np.float32), 3) is None  # wrong dimension: faiss raises
    assert "retriever failed" in said[0]
    ids, vectors = r.search(np.eye(8, dtype=np.float32)[2], 3)
    assert ids[0] == 2 and vectors.shape == (3, 8)


def test_a_retriever_that_times_out_gives_none():
    release = threading.Event()

    class Stuck:  # a search that never answers until released
        def search(self, queries, k):
            release.wait(10)
            raise RuntimeError("released")

    said = []
    r = Retriever(Stuck(), np.eye(8, dtype=np.float32), timeout_s=0.2, log=said.append)
    assert r.search(np.ones(8, np.float32), 3) is None and "timed out" in said[0]
    release.set()


CALIBRATION = {"lanes": {"neutral": {"tau_snap": 0.6, "tau_novel": 0.4, "k": 50},
                         "creative": {"tau_snap": 0.5, "tau_novel": 0.3, "k": 40}}}


@pytest.mark.parametrize("c, expected, alpha", [
    (0.65, "SNAP", None), (0.6 + 1e-9, "SNAP", None), (0.6 - 1e-6, "BLEND", 0.75),
    (0.5, "BLEND", 0.5), (0.4 + 1e-6, "BLEND", 0.3), (0.4 - 1e-9, "NOVEL", None),
    (0.2, "NOVEL", None)])
def test_calibrated_lane_at_constructed_cosines(c, expected, alpha):
    profile = lane("neutral", calibration=CALIBRATION)
    assert (profile.tau_snap, profile.tau_novel, profile.k, profile.calibrated) == \
        (0.6, 0.4, 50, True)
    d = decide(*pair(c), profile)
    assert d.decision == expected
    # BLEND's weight: the seed's schedule with [0.4, 0.6] mapped onto [0.85, 0.92].
    assert d.alpha == (None if alpha is None else pytest.approx(alpha, abs=1e-4))


def test_calibrated_blend_weight_is_the_seed_schedule_rescaled():
    profile = lane("creative", calibration=CALIBRATION)
    for u in np.linspace(0, 1, 11):
        c = 0.3 + u * 0.2
        assert profile.alpha(c) == pytest.approx(blend_weight(0.85 + u * 0.07))
    assert lane("neutral").alpha(0.88) == pytest.approx(blend_weight(0.88))  # seed: identity


def test_explicit_thresholds_override_the_calibration():
    profile = lane("neutral", tau_snap=0.7, calibration=CALIBRATION)
    assert (profile.tau_snap, profile.tau_novel, profile.calibrated) == (0.7, 0.4, False)
    assert lane("conservative", calibration=CALIBRATION) == LANES["conservative"]  # not in it
    with pytest.raises(ValueError, match="tau_novel"):
        lane("neutral", tau_novel=0.65, calibration=CALIBRATION)
