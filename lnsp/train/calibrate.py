"""Decider calibration: on held-out windows, how often the query's nearest bank vector
is the true next one as a function of its cosine c, and per-lane thresholds on c.

An InfoNCE-trained query only has to rank the true next vector first; its absolute
cosine to that vector says nothing by itself. So the thresholds are measured, never
set by hand: held-out windows (the training run's chain split) are sorted by c into
equal-count buckets, the share of correct neighbours per bucket is made monotone in c
(isotonic regression, pool-adjacent-violators: confidence buckets as in kNN-LM), and
each lane snaps where that precision reaches its target and stays NOVEL where it is
low, within bounds on the share of each path so that every lane keeps all three.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from lnsp.train.evaluate import SAME, same  # noqa: F401 (one rule for repeats, shared)

BUCKETS = 20  # equal-count confidence buckets (fewer when there are few windows)
MAX_WINDOWS = 20_000  # held-out windows measured at most (a fixed, seeded sample)

# Per lane: SNAP where the bucketed precision is >= snap_precision and NOVEL where it is
# < novel_precision, each path's held-out share clipped into its bounds. The bounds keep
# SNAP + NOVEL <= 0.85, so that BLEND has at least 15% of the held-out windows.
POLICY = {
    "conservative": {"snap_precision": 0.9, "snap_share": (0.10, 0.40),
                     "novel_precision": 0.5, "novel_share": (0.20, 0.45)},
    "neutral": {"snap_precision": 0.75, "snap_share": (0.20, 0.60),
                "novel_precision": 0.35, "novel_share": (0.10, 0.25)},
    "creative": {"snap_precision": 0.6, "snap_share": (0.30, 0.70),
                 "novel_precision": 0.2, "novel_share": (0.05, 0.15)},
}
UNINFORMATIVE = 0.05  # SNAP precision less than this above Hit@1 is no information
LANE_K = {"conservative": 500, "neutral": 500, "creative": 300}


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of y with weights w (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for yi, wi in zip(y.astype(float), w.astype(float)):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(n, m) for m, _, n in blocks])


def buckets(c: np.ndarray, correct: np.ndarray, n: int = BUCKETS) -> list[dict]:
    """Equal-count buckets of c, each with its raw and isotonic precision."""
    order = np.argsort(c, kind="stable")
    parts = [p for p in np.array_split(order, max(1, min(n, len(c) // 20))) if len(p)]
    raw = np.array([correct[p].mean() for p in parts])
    fitted = isotonic(raw, np.array([len(p) for p in parts]))
    return [{"c_low": float(c[p].min()), "c_high": float(c[p].max()), "windows": int(len(p)),
             "precision": float(r), "isotonic": float(f)}
            for p, r, f in zip(parts, raw, fitted)]


def _share_clip(c_sorted: np.ndarray, tau: float, above: bool, bounds) -> float:
    """tau moved so that the share of windows on its side lies within bounds."""
    n = len(c_sorted)
    share = (np.sum(c_sorted >= tau) if above else np.sum(c_sorted <= tau)) / n
    low, high = bounds
    target = min(max(share, low), high)
    if target == share:
        return tau
    m = int(round(target * n))
    if above:  # the m largest values snap: tau between the (n-m)th and (n-m+1)th
        lo = c_sorted[n - m - 1] if n - m - 1 >= 0 else c_sorted[0] - 1e-6
        hi = c_sorted[n - m] if n - m < n else c_sorted[-1] + 1e-6
    else:  # the m smallest values are NOVEL
        lo = c_sorted[m - 1] if m >= 1 else c_sorted[0] - 1e-6
        hi = c_sorted[m] if m < n else c_sorted[-1] + 1e-6
    return float((lo + hi) / 2)


def thresholds(c: np.ndarray, correct: np.ndarray, table: list[dict]) -> dict:
    """Per lane tau_snap / tau_novel from the bucket table, held-out shares and the
    SNAP precision they give on the same windows."""
    c_sorted = np.sort(c)
    lanes = {}
    for name, policy in POLICY.items():
        # Lowest bucket edge from which the isotonic precision reaches the target.
        reach = [b for b in table if b["isotonic"] >= policy["snap_precision"]]
        tau_snap = reach[0]["c_low"] if reach else c_sorted[-1] + 1e-6
        tau_snap = _share_clip(c_sorted, tau_snap, True, policy["snap_share"])
        low = [b for b in table if b["isotonic"] < policy["novel_precision"]]
        tau_novel = low[-1]["c_high"] if low else c_sorted[0] - 1e-6
        tau_novel = _share_clip(c_sorted, tau_novel, False, policy["novel_share"])
        tau_novel = min(tau_novel, tau_snap - 1e-6)
        lanes[name] = {"tau_snap": float(tau_snap), "tau_novel": float(tau_novel),
                       "k": LANE_K[name], **measure(c, correct, tau_snap, tau_novel)}
    return lanes


def uninformative(lanes: dict, hit1: float) -> str | None:
    """A warning when no lane's SNAP is more precise than the model's Hit@1: confidence
    that does not separate right from wrong neighbours makes every SNAP a guess."""
    best = max(lane["snap_precision"] or 0.0 for lane in lanes.values())
    if best >= min(hit1 + UNINFORMATIVE, 1.0):
        return None
    return (f"SNAP precision {best:.2f} is not above Hit@1 {hit1:.2f}: this model's "
            "cosine carries no information about which neighbour is right")


def measure(c: np.ndarray, correct: np.ndarray, tau_snap: float, tau_novel: float) -> dict:
    """Shares of each path and the SNAP precision at the given thresholds."""
    snap, novel = c >= tau_snap, c <= tau_novel
    return {"snap_share": float(snap.mean()), "blend_share": float((~snap & ~novel).mean()),
            "novel_share": float(novel.mean()),
            "snap_precision": float(correct[snap].mean()) if snap.any() else None,
            "blend_precision": (float(correct[~snap & ~novel].mean())
                                if (~snap & ~novel).any() else None)}


def nearest(model, ds, index, starts: np.ndarray, ctx_len: int, batch: int = 512,
            tick=lambda: None):
    """Per window: cosine c of the query to its nearest bank vector other than the
    context ids (as evaluation excludes them) and whether that vector is the true next
    (or a repeat of it). `tick` after every batch: a sign of life to the supervisor."""
    import torch

    from lnsp.model import miner
    from lnsp.data.dataset import window_ids
    from lnsp.train.evaluate import REPEATS, copies

    cs, right = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            context, target = window_ids(ds, starts[i:i + batch], ctx_len)
            vectors = np.asarray(ds.bank[context.reshape(-1)]).reshape(*context.shape, -1)
            query = model(torch.from_numpy(vectors)).float().numpy()
            tick()
            scores, ids = miner.search(index, query, 1 + ctx_len + REPEATS)
            # As evaluation ranks: repeats of the context are excluded with it.
            _, in_context = copies(ds.bank, ids, context, target)
            keep = (ids != -1) & ~in_context
            first = keep.argmax(axis=1)
            rows = np.arange(len(ids))
            # The cosine from the vectors themselves (the index may be approximate).
            best = ids[rows, first]
            neighbour = np.asarray(ds.bank[best], dtype=np.float64)
            cs.append(np.einsum("ij,ij->i", neighbour, query.astype(np.float64)))
            right.append(same(ds.bank, best, target))
    return np.concatenate(cs), np.concatenate(right)


def calibrate(model, ds, config, index=None, hit1: float | None = None,
              tick=lambda: None) -> dict:
    """The calibration of `model` on the held-out windows of `config`'s chain split."""
    from lnsp.data import dataset as data
    from lnsp.model import miner

    if index is None:
        index = miner.build(ds.bank, "flat", prebuilt=ds.index, log=lambda m: None)
    _, held_out = data.windows(ds, config.ctx_len, config.val_fraction, config.seed)
    if len(held_out) == 0:
        raise data.DataError(f"{ds.root}: no held-out windows to calibrate on")
    if len(held_out) > MAX_WINDOWS:
        held_out = np.sort(np.random.default_rng(config.seed + 2).choice(
            held_out, MAX_WINDOWS, replace=False))
    c, correct = nearest(model, ds, index, held_out, config.ctx_len, tick=tick)
    table = buckets(c, correct)
    lanes = thresholds(c, correct, table)
    hit1 = float(correct.mean())
    return {"windows": int(len(c)), "hit@1": hit1, "warning": uninformative(lanes, hit1),
            "c_mean": float(c.mean()),
            "c_quantiles": [float(q) for q in np.quantile(c, [0.05, 0.25, 0.5, 0.75, 0.95])],
            "lanes": lanes, "buckets": table,
            "policy": {k: {kk: list(vv) if isinstance(vv, tuple) else vv
                           for kk, vv in v.items()} for k, v in POLICY.items()}}


def load_model(state: dict, dim: int):
    from lnsp.config import load as load_config
    from lnsp.model.tower import QueryTower

    config = load_config(state["config"])
    model = QueryTower(dim, config.hidden)
    model.load_state_dict(state["model"])
    model.eval()
    return model, config


def identity(path: Path) -> tuple[int, int, int]:
    """Which file a checkpoint path holds now (inode, size, mtime): a live run replaces
    best.pt with a new file when it improves."""
    st = Path(path).stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def write_into_checkpoint(path: Path, calibration: dict,
                          expect: tuple[int, int, int] | None = None) -> bool:
    """The checkpoint with its calibration stored beside the weights (plain types).
    With `expect` (the identity of the checkpoint that was calibrated): only if the
    path still holds that file; False (nothing written) when a live run has replaced
    it since, whose newer weights the thresholds were not measured on."""
    import torch

    from lnsp.train import checkpoint
    from lnsp.rundir import atomic_write

    state = checkpoint.load(path)
    if expect is not None and identity(path) != expect:
        return False
    state["calibration"] = calibration
    buf = io.BytesIO()
    torch.save(state, buf)
    if expect is not None and identity(path) != expect:  # replaced while we serialised
        return False
    atomic_write(path, buf.getvalue())
    return True


def run_dir_of(checkpoint_path: Path) -> Path | None:
    """The run directory that holds a checkpoint (runs/x/checkpoints/best.pt)."""
    from lnsp.rundir import RunDir

    parent = Path(checkpoint_path).resolve().parent
    return parent.parent if RunDir(parent.parent).checkpoints == parent else None


def on_demand(checkpoint_path: str, data_dir: str, out: str | None = None,
              store: bool = True) -> tuple[dict, Path]:
    """`lnsp calibrate`: measure, write calibration.json (the run directory's, or
    --out) and store the thresholds in the checkpoint."""
    from lnsp.train import checkpoint
    from lnsp.data import dataset as data
    from lnsp.config import load as load_config
    from lnsp.rundir import RunDir, write_json

    calibrated = identity(Path(checkpoint_path))
    state = checkpoint.load(Path(checkpoint_path))
    ds = data.load(data_dir, load_config(state["config"]).ctx_len)
    model, config = load_model(state, ds.dim)
    result = calibrate(model, ds, config)
    result["checkpoint"] = str(checkpoint_path)
    result["data"] = str(data_dir)
    run_dir = run_dir_of(Path(checkpoint_path))
    target = Path(out) if out else (RunDir(run_dir).calibration if run_dir else
                                    RunDir(Path(checkpoint_path).parent).calibration)
    if store and not write_into_checkpoint(Path(checkpoint_path), result, expect=calibrated):
        # A live run wrote a newer checkpoint meanwhile: it is kept, not put back.
        result["stored"] = False
    write_json(target, result)
    return result, target


def after_training(rd, ds, log, tick=lambda: None) -> None:
    """At the end of a finished run: calibrate best.pt on the held-out windows, write
    calibration.json and store the thresholds in best.pt. It never fails the run;
    `tick` beats the heartbeat as it goes (the supervisor watches it till exit.json)."""
    try:
        from lnsp.train import checkpoint
        from lnsp.rundir import write_json

        best = rd.best_checkpoint()
        if not best.exists():
            return
        model, config = load_model(checkpoint.load(best), ds.dim)
        result = calibrate(model, ds, config, tick=tick)
        result["checkpoint"] = str(best)
        result["data"] = str(ds.root)
        write_json(rd.calibration, result)
        write_into_checkpoint(best, result)
        log("Calibrated best.pt on held-out windows: " + "; ".join(
            f"{name} snap c>={lane['tau_snap']:.3f} ({lane['snap_share']:.0%}, precision "
            f"{lane['snap_precision']:.2f}) novel c<={lane['tau_novel']:.3f} "
            f"({lane['novel_share']:.0%})" for name, lane in result["lanes"].items())
            + f" | Hit@1 {result['hit@1']:.3f}")
        if result["warning"]:
            log(f"Calibration: {result['warning']}")
    except Exception as e:  # calibration must never fail a finished run
        log(f"calibration not written: {type(e).__name__}: {e}")


def table(result: dict) -> str:
    """What `lnsp calibrate` prints: per lane thresholds, shares and SNAP precision."""
    lines = [f"held-out windows {result['windows']}, Hit@1 (nearest is the true next) "
             f"{result['hit@1']:.3f}, c median {result['c_quantiles'][2]:.3f}",
             f"{'lane':<13}{'tau_snap':>9}{'tau_novel':>10}{'SNAP':>7}{'BLEND':>7}{'NOVEL':>7}"
             f"{'SNAP precision':>16}"]
    for name, lane in result["lanes"].items():
        p = lane["snap_precision"]
        lines.append(f"{name:<13}{lane['tau_snap']:>9.3f}{lane['tau_novel']:>10.3f}"
                     f"{lane['snap_share']:>7.0%}{lane['blend_share']:>7.0%}"
                     f"{lane['novel_share']:>7.0%}{'-' if p is None else f'{p:.3f}':>16}")
    if result.get("warning"):
        lines.append("warning: " + result["warning"])
    lines.append("buckets (c range: precision raw / isotonic): " + ", ".join(
        f"{b['c_low']:.2f}-{b['c_high']:.2f}: {b['precision']:.2f}/{b['isotonic']:.2f}"
        for b in result["buckets"]))
    return "\n".join(lines)
