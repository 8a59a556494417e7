"""The dual-path decider: per generated vector, SNAP to the nearest bank vector, BLEND
with it, or stay NOVEL, by cosine thresholds per lane, with a near-duplicate guard.

The thresholds are cosines. LANES holds the seed's fixed values; a trained model's
own, measured on held-out windows (lnsp.train.calibrate), replace them when the checkpoint
carries a calibration. BLEND's weight follows the seed's schedule mapped onto the
lane's [tau_novel, tau_snap]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DUP_COSINE = 0.98  # above this, a recently used neighbour is a near-duplicate
DUP_WINDOW = 8  # how many recently used ids the guard looks at


# The seed's neutral lane: the scale on which blend_weight's schedule was written.
SEED_SNAP, SEED_NOVEL = 0.92, 0.85


@dataclass(frozen=True)
class Lane:
    name: str
    tau_snap: float
    tau_novel: float
    k: int
    calibrated: bool = False  # thresholds measured on this model's held-out windows

    def alpha(self, c: float) -> float:
        """BLEND's weight on the predicted vector: the seed schedule with the lane's
        [tau_novel, tau_snap] mapped affinely onto the seed's [0.85, 0.92]."""
        u = (c - self.tau_novel) / (self.tau_snap - self.tau_novel)
        return blend_weight(SEED_NOVEL + u * (SEED_SNAP - SEED_NOVEL))


LANES = {
    "conservative": Lane("conservative", 0.94, 0.88, 500),
    "neutral": Lane("neutral", 0.92, 0.85, 500),
    "creative": Lane("creative", 0.90, 0.82, 300),
}


def lane(name: str, tau_snap: float | None = None, tau_novel: float | None = None,
         k: int | None = None, calibration: dict | None = None) -> Lane:
    """A lane profile by name: the calibrated thresholds when a calibration is given
    (its "lanes" entry, as lnsp.train.calibrate writes it), else the seed's; any value given
    explicitly overrides both."""
    if name not in LANES:
        raise ValueError(f"lane must be one of {', '.join(LANES)} (got {name!r})")
    base = LANES[name]
    if calibration and name in calibration.get("lanes", {}):
        measured = calibration["lanes"][name]
        base = Lane(name, float(measured["tau_snap"]), float(measured["tau_novel"]),
                    int(measured.get("k", base.k)), True)
    chosen = Lane(name, base.tau_snap if tau_snap is None else tau_snap,
                  base.tau_novel if tau_novel is None else tau_novel, base.k if k is None else k,
                  base.calibrated and tau_snap is None and tau_novel is None)
    if not chosen.tau_novel < chosen.tau_snap:
        raise ValueError(f"tau_novel ({chosen.tau_novel}) must be below tau_snap "
                         f"({chosen.tau_snap})")
    return chosen


def blend_weight(c: float) -> float:
    """The seed's weight on the predicted vector: 0.3 up to c = 0.86, linearly to 0.7
    at 0.91, linearly to 0.9 at 0.95, then 0.9 (on the seed's neutral scale)."""
    if c <= 0.86:
        return 0.3
    if c <= 0.91:
        return 0.3 + 0.4 * (c - 0.86) / 0.05
    if c <= 0.95:
        return 0.7 + 0.2 * (c - 0.91) / 0.04
    return 0.9


@dataclass
class Decision:
    decision: str  # SNAP, BLEND, NOVEL, NOVEL_DUP_DROP
    vector: np.ndarray  # unit norm
    c: float | None
    neighbor_id: int | None
    alpha: float | None


def _unit(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.linalg.norm(x)), 1e-12)


def decide(v: np.ndarray, neighbors: np.ndarray, neighbor_ids: np.ndarray, profile: Lane,
           recent_ids=()) -> Decision:
    """Choose for predicted vector v among its (K, D) neighbours. c is computed here,
    from the vectors, never taken from the caller."""
    v = _unit(np.asarray(v, dtype=np.float64))
    if len(neighbors) == 0:
        return Decision("NOVEL", v.astype(np.float32), None, None, None)
    # Find the best neighbour in float32 (fast at K = 500), then compute its cosine
    # in float64, so that the thresholds are applied exactly.
    n = np.asarray(neighbors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", n, n))
    best = int(np.argmax((n @ v.astype(np.float32)) / np.maximum(norms, 1e-12)))
    neighbor = _unit(n[best].astype(np.float64))
    c, nid = float(neighbor @ v), int(neighbor_ids[best])
    if c > DUP_COSINE and nid in list(recent_ids)[-DUP_WINDOW:]:
        return Decision("NOVEL_DUP_DROP", v.astype(np.float32), c, nid, None)
    if c >= profile.tau_snap:
        return Decision("SNAP", neighbor.astype(np.float32), c, nid, None)
    if c <= profile.tau_novel:
        return Decision("NOVEL", v.astype(np.float32), c, nid, None)
    alpha = profile.alpha(c)
    return Decision("BLEND", _unit(alpha * v + (1 - alpha) * neighbor).astype(np.float32),
                    c, nid, alpha)
