"""`lnsp probe`: one step with per-phase timings, and a hard time budget."""

import json

from conftest import lnsp


def test_probe_prints_every_phase_and_exits_0(tmp_path):
    r = lnsp("probe", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    block = r.stdout[r.stdout.index("PROBE RESULT"):]
    for phase in ("load", "forward", "retrieve", "loss", "backward", "total"):
        assert f"  {phase}" in block, phase
    result = json.loads(block.strip().splitlines()[-1])
    assert (result["batch"], result["k"], result["dim"], result["ctx_len"]) == (4, 100, 768, 10)
    assert result["loss"] > 0 and result["step_ms"] > 0


def test_probe_timeout_dumps_and_exits_3(tmp_path):
    r = lnsp("probe", "--timeout", "0.5", cwd=tmp_path, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "[WATCHDOG] probe: no progress" in r.stdout
    assert list((tmp_path / "runs" / "probe" / "dumps").glob("*stall*.txt"))
