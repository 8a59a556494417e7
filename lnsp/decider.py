"""The dual-path decider: per generated vector, SNAP to the nearest bank vector, BLEND
with it, or stay NOVEL, by cosine thresholds per lane, with a near-duplicate guard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DUP_COSINE = 0.98  # above this, a recently used neighbour is a near-duplicate
DUP_WINDOW = 8  # how many recently used ids the guard looks at


@dataclass(frozen=True)
class Lane:
    name: str
    tau_snap: float
    tau_novel: float
    k: int


LANES = {
    "conservative": Lane("conservative", 0.94, 0.88, 500),
    "neutral": Lane("neutral", 0.92, 0.85, 500),
    "creative": Lane("creative", 0.90, 0.82, 300),
}


def lane(name: str, tau_snap: float | None = None, tau_novel: float | None = None,
         k: int | None = None) -> Lane:
    """A lane profile by name, with any of its values overridden."""
    if name not in LANES:
        raise ValueError(f"lane must be one of {', '.join(LANES)} (got {name!r})")
    base = LANES[name]
    chosen = Lane(name, base.tau_snap if tau_snap is None else tau_snap,
                  base.tau_novel if tau_novel is None else tau_novel, base.k if k is None else k)
    if not chosen.tau_novel < chosen.tau_snap:
        raise ValueError(f"tau_novel ({chosen.tau_novel}) must be below tau_snap "
                         f"({chosen.tau_snap})")
    return chosen


def blend_weight(c: float) -> float:
    """The weight on the predicted vector: 0.3 up to c = 0.86, linearly to 0.7 at
    0.91, linearly to 0.9 at 0.95, then 0.9."""
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
    alpha = blend_weight(c)
    return Decision("BLEND", _unit(alpha * v + (1 - alpha) * neighbor).astype(np.float32),
                    c, nid, alpha)
