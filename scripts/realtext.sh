#!/usr/bin/env bash
# The real-text rows of docs/results.md: two corpora that are on this machine offline (the
# manual pages and the docstrings of numpy and torch), embedded by all-MiniLM-L6-v2,
# each trained by `lnsp train` at its defaults; prints the best epoch of each run
# (what best.pt holds) beside copy-last and the best blend. About 6 min on 2 cores:
# embedding 23,500 sentences, then ~80 s of training for man and ~20 s for docstrings.
# usage: scripts/realtext.sh [OUT_DIR]   (default data/realtext; runs under runs/realtext-*)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-data/realtext}
BIN=.venv/bin
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
[ -f "$OUT/man1000.jsonl" ] || $BIN/lnsp data corpus man --out "$OUT/man1000.jsonl" --limit 1000
[ -f "$OUT/docstrings.jsonl" ] || $BIN/lnsp data corpus docstrings --out "$OUT/docstrings.jsonl" \
    --limit 700 --max-chars 5000 --modules numpy,numpy.linalg,numpy.fft,numpy.random,numpy.polynomial,numpy.ma,torch,torch.nn,torch.nn.functional,torch.linalg,torch.optim,torch.distributions
for name in man1000 docstrings; do
    [ -f "$OUT/$name/bank.npy" ] || $BIN/lnsp data from-text "$OUT/$name.jsonl" --out "$OUT/$name"
    run=runs/realtext-$name-$(date +%Y%m%d-%H%M%S)
    $BIN/lnsp train --data "$OUT/$name" --run-dir "$run" ${ARGS:-}
    $BIN/python - "$run/metrics.jsonl" "$name" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
b = max(rows, key=lambda m: m["hit@10"])
for who, p in (("model", ""), ("copy-last", "baseline_"), (f"blend({b['blend_decay']:g})", "blend_")):
    print(f"{sys.argv[2]:11s} {who:11s} " + " ".join(f"{k} {b[p + k]:.3f}" for k in ("hit@1", "hit@5", "hit@10", "mrr")))
PY
done
