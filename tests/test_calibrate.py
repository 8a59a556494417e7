"""Calibration at constructed confidences: the isotonic buckets, and lanes whose
thresholds follow precision within their share bounds."""

import numpy as np
import pytest

from lnsp.train.calibrate import POLICY, buckets, isotonic, measure, same, thresholds, uninformative


def test_isotonic_pools_adjacent_violators():
    fitted = isotonic(np.array([0.1, 0.5, 0.3, 0.7, 0.6, 0.9]), np.ones(6))
    assert np.allclose(fitted, [0.1, 0.4, 0.4, 0.65, 0.65, 0.9])
    assert np.allclose(isotonic(np.array([0.2, 0.0]), np.array([3.0, 1.0])), [0.15, 0.15])


def informative(n=4000, seed=0):
    """Windows whose neighbour is right with probability c (confidence informs)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0, 1, n)
    return c, rng.uniform(0, 1, n) < c


def test_lanes_follow_precision_and_keep_all_three_paths():
    c, correct = informative()
    table = buckets(c, correct)
    assert len(table) == 20 and sum(b["windows"] for b in table) == len(c)
    assert all(a["isotonic"] <= b["isotonic"] for a, b in zip(table, table[1:]))
    lanes = thresholds(c, correct, table)
    overall = correct.mean()
    for name, lane in lanes.items():
        low, high = POLICY[name]["snap_share"]
        assert low - 0.01 <= lane["snap_share"] <= high + 0.01
        low, high = POLICY[name]["novel_share"]
        assert low - 0.01 <= lane["novel_share"] <= high + 0.01
        assert lane["blend_share"] >= 0.14 and lane["tau_novel"] < lane["tau_snap"]
        assert lane["snap_precision"] > overall + 0.2  # confidence carries information
        assert lane == {**lane, **measure(c, correct, lane["tau_snap"], lane["tau_novel"])}
    # Conservative snaps least and most precisely; creative most often.
    cons, neut, crea = lanes["conservative"], lanes["neutral"], lanes["creative"]
    assert cons["snap_share"] <= neut["snap_share"] <= crea["snap_share"]
    assert cons["snap_precision"] >= neut["snap_precision"] >= crea["snap_precision"]
    assert cons["snap_precision"] >= 0.85


def test_a_perfect_model_still_blends_and_stays_novel():
    """Every neighbour right: precision is reached everywhere, the share bounds keep
    BLEND and NOVEL on held-out windows."""
    c = np.random.default_rng(1).uniform(0.3, 0.9, 1000)
    correct = np.ones(1000, bool)
    lanes = thresholds(c, correct, buckets(c, correct))
    for name, lane in lanes.items():
        assert lane["snap_share"] == pytest.approx(POLICY[name]["snap_share"][1], abs=0.01)
        assert lane["novel_share"] == pytest.approx(POLICY[name]["novel_share"][0], abs=0.01)
        assert lane["blend_share"] > 0.1 and lane["snap_precision"] == 1.0


def test_confidence_without_information_is_named():
    c, correct = informative()
    assert uninformative(thresholds(c, correct, buckets(c, correct)), correct.mean()) is None
    rng = np.random.default_rng(2)
    noise = rng.uniform(0, 1, 4000) < 0.1  # right 10% of the time, whatever c is
    lanes = thresholds(c, noise, buckets(c, noise))
    assert "no information" in uninformative(lanes, noise.mean())
    perfect = {"neutral": {"snap_precision": 1.0}}
    assert uninformative(perfect, 0.98) is None  # 1.0 is the ceiling


def test_a_repeated_sentence_is_the_same_vector():
    """Text corpora repeat sentences: a neighbour that is a copy of the true next
    vector under another id is right; a near one is not."""
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((4, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank[2] = bank[0]
    bank[3] = bank[0] + 0.01 * bank[1]
    bank[3] /= np.linalg.norm(bank[3])
    assert same(bank, [0, 2, 0, 1], [0, 0, 3, 0]).tolist() == [True, True, False, False]


def test_thresholds_are_not_stored_into_a_checkpoint_the_run_replaced(tmp_path):
    """`lnsp calibrate` on a live run: best.pt is replaced by a newer one while the older
    is being calibrated; the newer is kept as it is, not overwritten by the older's
    weights with thresholds measured on them."""
    import os

    import torch

    from lnsp.train.calibrate import identity, write_into_checkpoint
    from lnsp.rundir import atomic_write

    best = tmp_path / "best.pt"
    torch.save({"step": 100, "weights": torch.zeros(3)}, best)
    calibrated = identity(best)  # the checkpoint calibration started from
    newer = tmp_path / "newer.pt"
    torch.save({"step": 200, "weights": torch.ones(3)}, newer)
    atomic_write(best, newer.read_bytes())  # the run's next best, as the trainer writes it
    assert write_into_checkpoint(best, {"lanes": {}}, expect=calibrated) is False
    kept = torch.load(best, weights_only=False)
    assert kept["step"] == 200 and "calibration" not in kept
    assert write_into_checkpoint(best, {"lanes": {}}, expect=identity(best)) is True
    assert torch.load(best, weights_only=False)["calibration"] == {"lanes": {}}
    assert os.path.getsize(best) > 0
