#!/usr/bin/env bash
# What only a machine with NVIDIA GPUs can check, in under 5 minutes: the probe on
# cuda, a short single-GPU run, and (with two GPUs or more) a 2-rank DDP run under
# torchrun on NCCL whose ranks each hold their own GPU. One PASS/FAIL line per check;
# exit 0 when every check that could run passed, 1 otherwise, 2 with no GPU at all.
# Needs a CUDA build of torch in the environment (PYTHON=...; default .venv/bin/python):
# the pinned CPU wheel of `make setup` sees no GPU.
# Usage: scripts/gpu-check.sh [WORKDIR]   (default: a fresh temporary directory)
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-$(mktemp -d /tmp/lnsp-gpu-check.XXXXXX)}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; failed=1; }

gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
echo "gpu-check: torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null), $gpus GPU(s), work in $WORK"
if [ "$gpus" -lt 1 ]; then
    echo "FAIL no CUDA device visible to torch (a CPU build of torch, or no GPU): nothing checked"
    exit 2
fi

# 1. The probe: one training step on cuda inside its own 60 s budget.
if timeout 120 "$PY" -m lnsp probe --device cuda --timeout 60 --json >"$WORK/probe.log" 2>&1 \
        && grep -q "PROBE RESULT" "$WORK/probe.log"; then
    pass "probe on cuda ($(grep -m1 -i 'step' "$WORK/probe.log" | head -c 80))"
else
    fail "probe on cuda (see $WORK/probe.log)"
fi

# 2. A short single-GPU run to the end, weights on the GPU, finished in exit.json.
"$PY" -m lnsp data synth --out "$WORK/data" --chains 300 --length 16 --dim 128 >/dev/null
FLAGS=(--data "$WORK/data" --hidden 64 --k 50 --batch-size 32 --epochs 2 --eval-windows 300
       --threads safe --device cuda --stall-timeout 60 --pg-timeout 60)
if timeout 120 "$PY" -m lnsp train "${FLAGS[@]}" --run-dir "$WORK/one" >"$WORK/one.log" 2>&1 \
        && grep -q '"finished"' "$WORK/one/exit.json"; then
    pass "single-GPU run finished ($(grep -c . "$WORK/one/metrics.jsonl") epochs evaluated)"
else
    fail "single-GPU run (see $WORK/one.log)"
fi

# 3. Two ranks on two GPUs: NCCL, each rank on cuda:LOCAL_RANK, the same steps on both.
if [ "$gpus" -ge 2 ]; then
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 TORCH_FR_BUFFER_SIZE=2000 \
        TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_FR_DUMP_TEMP_FILE="$WORK/two/dumps/nccl-trace-rank"
    mkdir -p "$WORK/two/dumps"
    if timeout 180 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
            -m lnsp train "${FLAGS[@]}" --run-dir "$WORK/two" >"$WORK/two.log" 2>&1 \
            && grep -q '"finished"' "$WORK/two/exit.json"; then
        devices=$("$PY" - "$WORK/two" <<'EOF'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
steps = {json.loads((run / f"heartbeat-rank{r}.json").read_text())["step"] for r in (0, 1)}
print("same step on both ranks" if len(steps) == 1 else f"ranks at different steps {steps}")
EOF
)
        if [[ "$devices" == same* ]]; then
            pass "2-GPU DDP on NCCL finished ($devices)"
        else
            fail "2-GPU DDP: $devices"
        fi
    else
        fail "2-GPU DDP on NCCL (see $WORK/two.log)"
    fi
else
    echo "SKIP 2-GPU DDP: only $gpus GPU (not counted as a pass)"
fi

[ "$failed" = 0 ] && echo "gpu-check: all checks that could run passed" \
    || echo "gpu-check: FAILED (logs in $WORK)"
exit "$failed"
