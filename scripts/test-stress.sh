#!/usr/bin/env bash
# Run the tests that signal, stall, kill and launch (runtime, learned watchdog, launch, guard,
# distributed, docker, nodes as containers) COUNT times in a row, on WORKERS xdist
# workers as `make test` runs them; print the passed/failed/skipped counts of every
# round and a total. Exit code 1 when any round had a failure.
# Usage: scripts/test-stress.sh [COUNT]   (default 10; WORKERS default 2; ARGS are passed to pytest;
# TESTS= the files, default all of the above)
set -uo pipefail
COUNT=${1:-10}
PY=${PY:-.venv/bin/python}
WORKERS=${WORKERS:-2}
# TESTS="tests/test_guard.py tests/test_control.py" narrows the rounds to those files.
if [ -n "${TESTS:-}" ]; then read -r -a TESTS <<< "$TESTS"; else
TESTS=(tests/test_runtime.py tests/test_learned_watchdog.py tests/test_launch.py tests/test_guard.py
       tests/test_control.py tests/test_distributed.py tests/test_docker.py tests/test_ddp_docker.py)
fi
OUT=$(mktemp -d "${TMPDIR:-/tmp}/lnsp-stress-XXXXXX")
trap 'rm -rf "$OUT"' EXIT
bad=0
for round in $(seq 1 "$COUNT"); do
    start=$(date +%s)
    "$PY" -m pytest -q -p no:cacheprovider -n "$WORKERS" --junitxml="$OUT/round$round.xml" ${ARGS:-} \
        "${TESTS[@]}" >"$OUT/round$round.log" 2>&1
    line=$("$PY" - "$OUT/round$round.xml" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
failed = [c.get("name") for c in suite.iter("testcase")
          if c.find("failure") is not None or c.find("error") is not None]
n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
print(f"passed {n - len(failed) - skipped} failed {len(failed)} skipped {skipped}"
      + (f" ({', '.join(failed)})" if failed else ""))
PYEOF
)
    echo "round $round/$COUNT: ${line:-no result (see pytest output)} in $(( $(date +%s) - start ))s"
    case "$line" in "passed "*" failed 0 "*) ;; *) bad=$((bad + 1)); tail -40 "$OUT/round$round.log";; esac
done
echo "stress: $((COUNT - bad))/$COUNT rounds green"
[ "$bad" -eq 0 ]
