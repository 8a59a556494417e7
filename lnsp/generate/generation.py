"""Autoregressive next-vector generation from a checkpoint: the query tower predicts
v, FAISS finds its neighbours, the decider picks SNAP / BLEND / NOVEL with the
checkpoint's calibrated thresholds, and the chosen vector joins the context (or, with
teacher forcing, the true next one). One JSON line per step; with texts.jsonl, each
step carries its sentence and the console shows the passage."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import torch

from lnsp.train import checkpoint
from lnsp.data import dataset as data
from lnsp.model import miner
from lnsp.config import load as load_config
from lnsp.generate.decider import DUP_WINDOW, Lane, decide, lane
from lnsp.model.tower import QueryTower


class Retriever:
    """FAISS search with a time budget; a failure or a timeout returns None."""

    def __init__(self, index, bank, timeout_s: float = 1.0, log=print):
        self.index, self.bank, self.timeout_s, self.log = index, bank, timeout_s, log
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lnsp-retrieve")

    def search(self, v: np.ndarray, k: int, exclude=()):
        """Ids and vectors of v's k nearest bank rows, `exclude` (the context's ids)
        left out as calibration and evaluation leave them out."""
        exclude = [i for i in exclude if i is not None]
        future = self.pool.submit(miner.search, self.index, v[None, :], k + len(exclude))
        try:
            _, ids = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.log(f"retriever timed out after {self.timeout_s:g}s: NOVEL for this step")
            return None
        except Exception as e:  # any search failure degrades to NOVEL, never a crash
            self.log(f"retriever failed ({type(e).__name__}: {e}): NOVEL for this step")
            return None
        ids = ids[0][(ids[0] >= 0) & ~np.isin(ids[0], exclude)][:k]
        return ids, np.asarray(self.bank[ids], dtype=np.float32)


TOLERANCE = 0.1  # generation's SNAP precision vs calibration's promise, reported


def step(model, context: list[np.ndarray], exclude: list, ctx_len: int,
         retriever: Retriever, profile: Lane, recent: list[int]) -> tuple[dict, np.ndarray]:
    """One generation step: predict, retrieve (the `exclude` ids left out: the window's
    own), decide. Returns (record, vector)."""
    t = time.perf_counter()
    with torch.no_grad():
        window = torch.from_numpy(np.stack(context[-ctx_len:])[None])
        v = model(window)[0].numpy()
    found = retriever.search(v, profile.k, exclude)
    if found is None:
        d = decide(v, np.zeros((0, len(v))), np.zeros(0, np.int64), profile)
    else:
        d = decide(v, found[1], found[0], profile, recent)
    record = {"decision": d.decision, "c": d.c, "neighbor_id": d.neighbor_id,
              "alpha": d.alpha, "lane": profile.name,
              "latency_ms": (time.perf_counter() - t) * 1e3}
    return record, d.vector


def load_texts(root: Path, n: int) -> list | None:
    """The sentence of each bank row from texts.jsonl (None when there is none)."""
    path = Path(root) / "texts.jsonl"
    if not path.is_file():
        return None
    texts: list = [None] * n
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                i = int(row["id"])
            except (ValueError, KeyError, TypeError):
                raise data.DataError(f"{path}: line {number} is not a JSON object with "
                                     "'id' and 'text'") from None
            if not 0 <= i < n:
                raise data.DataError(f"{path}: line {number}: id {i} out of range (bank has "
                                     f"{n} rows)")
            texts[i] = row.get("text")
    return texts


def calibration_of(state: dict, checkpoint_path: Path) -> dict | None:
    """The checkpoint's calibration, else its run directory's calibration.json."""
    from lnsp.train.calibrate import run_dir_of
    from lnsp.rundir import RunDir, read_json

    if state.get("calibration"):
        return state["calibration"]
    run_dir = run_dir_of(checkpoint_path)
    found = read_json(RunDir(run_dir).calibration) if run_dir else None
    return found if found and "lanes" in found else None


def generate(checkpoint_path: str, data_dir: str, steps: int, lane_name: str = "neutral",
             tau_snap: float | None = None, tau_novel: float | None = None,
             k: int | None = None, start: int | None = None,
             context_ids: list[int] | None = None, seed: int = 0, out: str | None = None,
             echo=print, retriever_timeout: float = 1.0, chains: int = 1,
             teacher_forced: bool = False) -> dict:
    state = checkpoint.load(Path(checkpoint_path))
    config = load_config(state["config"])
    ds = data.load(data_dir, config.ctx_len)
    calibration = calibration_of(state, Path(checkpoint_path))
    try:
        profile = lane(lane_name, tau_snap, tau_novel, k, calibration)
    except ValueError as e:
        raise data.DataError(str(e)) from None
    texts = load_texts(ds.root, ds.bank.shape[0])
    torch.manual_seed(seed)
    model = QueryTower(ds.dim, config.hidden)
    model.load_state_dict(state["model"])
    model.eval()
    index = miner.build(ds.bank, "flat", prebuilt=ds.index, log=lambda m: None)
    retriever = Retriever(index, ds.bank, retriever_timeout, echo)

    _, held_out = data.split_chains(ds, config.ctx_len, config.val_fraction, config.seed)
    if context_ids is not None:
        bad = [i for i in context_ids if not 0 <= i < ds.bank.shape[0]]
        if bad:
            raise data.DataError(f"--context-ids: {bad} out of range (bank has "
                                 f"{ds.bank.shape[0]} rows)")
        if teacher_forced:
            raise data.DataError("--teacher-forced needs a chain (--start), not --context-ids")
        starts = [(None, [int(i) for i in context_ids], [])]
    else:
        if start is not None:
            picked = [start]
        else:  # held-out chains chosen by the seed
            picked = [int(c) for c in np.random.default_rng(seed).choice(
                held_out, size=min(chains, len(held_out)), replace=False)]
        starts = []
        for c in picked:
            if not 0 <= c < len(ds.offsets) - 1:
                raise data.DataError(f"--start {c}: no such chain (0..{len(ds.offsets) - 2})")
            chain = ds.chain(c)
            if len(chain) < config.ctx_len + (1 if teacher_forced else 0):
                raise data.DataError(f"--start {c}: chain has {len(chain)} vectors, "
                                     f"ctx_len is {config.ctx_len}")
            truth = [int(i) for i in chain[config.ctx_len:]] if c in set(held_out) else []
            starts.append((c, [int(i) for i in chain], truth))

    records = []
    sink = open(out, "w") if out else None
    try:
        for chain_index, chain_ids, truth in starts:
            ids = chain_ids[:config.ctx_len] if chain_index is not None else chain_ids
            context = [np.asarray(ds.bank[i], dtype=np.float32) for i in ids]
            context_known: list = list(ids)  # a bank id per context vector, None if NOVEL
            recent = list(ids)
            n = min(steps, len(chain_ids) - config.ctx_len) if teacher_forced else steps
            if texts:
                _show_context(echo, chain_index, ids, texts, profile, teacher_forced)
            for t in range(n):
                # The window's ids are left out, as calibration leaves them out; running
                # free, so are the sentences just used (a BLEND's neighbour is not in
                # the window, and SNAPping to it next would say it twice).
                exclude = context_known[-config.ctx_len:]
                if not teacher_forced:
                    exclude = list(dict.fromkeys(exclude + recent[-DUP_WINDOW:]))
                record, vector = step(model, context, exclude, config.ctx_len,
                                      retriever, profile, recent)
                true_id = truth[t] if t < len(truth) else None
                record = {"step": t + 1, "chain": chain_index, **record, "truth_id": true_id}
                if texts:
                    _add_text(record, texts)
                    _show_step(echo, record)
                records.append(record)
                if teacher_forced:  # the true next vector joins the context
                    context.append(np.asarray(ds.bank[true_id], dtype=np.float32))
                    context_known.append(true_id)
                else:
                    context.append(vector)
                    context_known.append(record["neighbor_id"]
                                         if record["decision"] == "SNAP" else None)
                if record["decision"] in ("SNAP", "BLEND"):
                    recent.append(record["neighbor_id"])
                if sink:
                    sink.write(json.dumps(record) + "\n")
    finally:
        if sink:
            sink.close()
    return summarise(records, profile, calibration, [s[0] for s in starts], teacher_forced,
                     any(s[2] for s in starts), ds.bank)


def summarise(records: list[dict], profile: Lane, calibration: dict | None, chains: list,
              teacher_forced: bool, held_out: bool, bank) -> dict:
    """Decision counts, and on held-out chains SNAP precision beside what the
    calibration promised for this lane (a SNAP to a repeat of the true next sentence
    counts as right, as calibration counts it)."""
    from lnsp.train.evaluate import same

    counts = Counter(r["decision"] for r in records)
    cs = [r["c"] for r in records if r["c"] is not None]
    snaps = [r for r in records if r["decision"] == "SNAP" and r["truth_id"] is not None]
    precision = (float(same(bank, [r["neighbor_id"] for r in snaps],
                            [r["truth_id"] for r in snaps]).mean()) if snaps else None)
    summary = {"steps": len(records), "lane": profile.name,
               "tau_snap": profile.tau_snap, "tau_novel": profile.tau_novel, "k": profile.k,
               "calibrated": profile.calibrated,
               "mode": "teacher_forced" if teacher_forced else "free",
               "start_chains": chains, "decisions": dict(counts),
               "mean_c": float(np.mean(cs)) if cs else None, "held_out": held_out,
               "snaps_scored": len(snaps), "snap_true_next": precision}
    if profile.calibrated and calibration:
        promised = calibration["lanes"][profile.name]
        summary["calibration"] = {key: promised[key] for key in
                                  ("snap_share", "blend_share", "novel_share",
                                   "snap_precision")}
        if precision is not None and promised["snap_precision"] is not None:
            gap = precision - promised["snap_precision"]
            summary["snap_precision_gap"] = gap
            summary["within_tolerance"] = abs(gap) <= TOLERANCE
    return summary


def _add_text(record: dict, texts: list) -> None:
    nid = record["neighbor_id"]
    record["text"] = texts[nid] if nid is not None else None
    # A NOVEL vector is no sentence of the bank: its text is the nearest one's.
    record["text_source"] = (None if nid is None else
                             "neighbor" if record["decision"] in ("SNAP", "BLEND") else "nearest")
    if record["truth_id"] is not None:
        record["truth_text"] = texts[record["truth_id"]]


def _clip(text, width: int = 90) -> str:
    text = " ".join(str(text).split()) if text is not None else "(no text)"
    return text if len(text) <= width else text[:width - 1] + "…"


def _show_context(echo, chain, ids, texts, profile: Lane, teacher_forced: bool) -> None:
    where = f"chain {chain}" if chain is not None else "given context"
    echo(f"--- {where}, lane {profile.name} (snap c >= {profile.tau_snap:.3f}, novel c <= "
         f"{profile.tau_novel:.3f}{', calibrated' if profile.calibrated else ''})"
         f"{', teacher-forced' if teacher_forced else ''}")
    for i in ids:
        echo(f"  {'context':<15}{_clip(texts[i])}")


def _show_step(echo, record: dict) -> None:
    c = f"{record['c']:.2f}" if record["c"] is not None else "  - "
    label = f"{record['decision'][:5]:<5} {c}"
    text = _clip(record.get("text"))
    if record.get("text_source") == "nearest":
        text = "~ " + text  # the nearest sentence to a vector that is none of them
    echo(f"  {label:<15}{text}")
    if record["truth_id"] is not None:
        said = record.get("text")
        same = record["neighbor_id"] == record["truth_id"] or (
            said is not None and said == record.get("truth_text"))  # a repeated sentence
        mark = "=" if same else "≠"
        echo(f"  {'  truth ' + mark:<15}{_clip(record.get('truth_text'))}")
