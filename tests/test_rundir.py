"""The run directory's contract and the pure functions that read it: records, the one
staleness check, the state of a run, the laggard rank and the failure classes."""

import json
import time

import pytest

from lnsp.train.distributed import classify as classify_failure, laggards, stalled_pid
from lnsp.errors import (ConfigError, DataError, LaunchError, LnspError, RunDirError,
                         TrainingError)
from lnsp.rundir import (ExitCode, ExitRecord, Heartbeat, RunDir, RunRecord, StepRecord,
                         run_staleness, staleness)
from lnsp.observe.status import classify


def test_records_round_trip_and_keep_unknown_fields(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_heartbeat(Heartbeat(pid=7, time=100.0, epoch=2, step=9, phase="train", loss=1.5))
    assert rd.read_heartbeat() == Heartbeat(pid=7, time=100.0, epoch=2, step=9, phase="train",
                                            loss=1.5)
    ended = rd.write_exit("stopped", ExitCode.DONE, 40, signal="SIGTERM")
    on_disk = json.loads(rd.exit.read_text())
    assert on_disk["signal"] == "SIGTERM" and on_disk["exit_code"] == ExitCode.DONE \
        and "cause" not in on_disk
    assert rd.read_exit() == ended and ended.extra == {"signal": "SIGTERM"}
    rd.append_step(StepRecord(5, 1, 2.0, 80.0, {"forward": 0.01}, 300.0, 1.0))
    with open(rd.steps, "a") as f:
        f.write('{"step": 10, "epo')  # a torn last line, being written
    assert [r.step for r in rd.read_steps()] == [5]
    rd.rank_heartbeat(1).write_text(json.dumps({"pid": 8, "time": 5.0, "step": 3}))
    assert rd.rank_heartbeats()[1].step == 3


def test_run_json_reads_as_a_record_written_in_parts(tmp_path):
    """Launcher, supervisor and trainer each add their own fields; the record reads them
    all, with defaults for what is not there yet and any other key kept as it is."""
    rd = RunDir(tmp_path)
    assert rd.read_run_record() is None  # no run.json: no record, not an empty one
    rd.update_run(backend="tmux", launch_time=5.0, tmux_session="exp1")
    rd.update_run(supervisor_pid=11, supervisor_start=6.0, max_restarts=2)
    rd.update_run(pid=12, start_time=7.0, ranks=[{"rank": 0, "pid": 12}], future_field=[1])
    run = rd.read_run_record()
    assert (run.backend, run.pid, run.start_time, run.supervisor_pid, run.max_restarts,
            run.restarts, run.world_size, run.ranks) == ("tmux", 12, 7.0, 11, 2, 0, 1,
                                                         [{"rank": 0, "pid": 12}])
    assert run.extra == {"tmux_session": "exp1", "future_field": [1]}
    assert RunRecord.of(None) == RunRecord() and RunRecord().backend == "foreground"
    with pytest.raises(AttributeError):  # frozen: run.json changes through update_run only
        run.pid = 13


def test_no_other_module_spells_a_run_directory_file_name():
    """The run directory's file names live in lnsp/rundir.py alone: a string in any other
    module's code (its docstrings aside) that is one, ends in one or starts a per-rank
    one fails here."""
    import ast
    from pathlib import Path

    import lnsp

    rd = RunDir("r")
    names = {getattr(rd, k).name for k, v in vars(RunDir).items() if isinstance(v, property)}
    names |= {rd.last_checkpoint().name, rd.best_checkpoint().name, rd.verdict(rd.root).name}
    names |= {p.name.split("7")[0] for p in (rd.rank_heartbeat(7), rd.rank_exit(7),
                                             rd.survivor_mark(7), rd.node_console("7"),
                                             rd.epoch_checkpoint(7))}
    assert {"run.json", "heartbeat.json", "dumps", "tb", "heartbeat-rank"} <= names
    found = []
    for path in sorted(Path(lnsp.__file__).parent.rglob("*.py")):
        if path.name == "rundir.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                        ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        found += [f"{path.relative_to(path.parents[2])}:{node.lineno} {node.value!r}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docstrings
                  and any(node.value == n or node.value.endswith("/" + n) for n in names)]
    assert not found, found


def test_a_record_missing_its_required_fields_reads_as_none(tmp_path):
    rd = RunDir(tmp_path)
    rd.heartbeat.write_text('{"step": 3}')  # no pid, no time
    rd.exit.write_text("not json")
    assert rd.read_heartbeat() is None and rd.read_exit() is None


def test_staleness_uses_the_startup_budget_before_the_first_step():
    assert not staleness(0.0, False, 2.0, 10.0, now=9.0).stale
    assert staleness(0.0, True, 2.0, 10.0, now=9.0).stale
    s = staleness(0.0, True, 2.0, 10.0, now=3.0, grace=5.0)  # grace at most doubles
    assert s.budget == 4.0 and not s.stale and s.kind == "step"


def test_run_staleness_ignores_the_heartbeat_of_an_earlier_trainer():
    old = Heartbeat(pid=1, time=0.0, step=9)
    s = run_staleness(old, pid=2, started=50.0, stall_timeout=2, startup_timeout=30, now=60.0)
    assert not s.stepping and s.idle == 10.0 and not s.stale
    s = run_staleness(Heartbeat(pid=2, time=55.0), 2, 50.0, 2, 30, now=60.0)
    assert s.stepping and s.stale


@pytest.mark.parametrize("ended, alive, trainer, beat_age, expected", [
    (None, True, True, 0.5, "running"),
    (None, True, True, 5.0, "stalled"),
    (None, False, False, None, "failed"),
    (ExitRecord("finished", 0, 10), False, False, 1.0, "finished"),
    (ExitRecord("stalled", 3, 10), True, False, 9.0, "restarting"),
    (ExitRecord("stopped", 0, 10), False, False, 1.0, "stopped"),
])
def test_state_of_a_run(ended, alive, trainer, beat_age, expected):
    now = 1000.0
    run = RunRecord(pid=42, start_time=900.0, stall_timeout=2, startup_timeout=60,
                    restarts=0, max_restarts=1)
    beat = Heartbeat(pid=42, time=now - beat_age) if beat_age is not None else None
    assert classify(run, beat, ended, alive, trainer, now) == expected


def test_a_run_still_starting_and_one_never_started():
    now = 1000.0
    assert classify(RunRecord(launch_time=now - 5), None, None, False, False, now) == "starting"
    assert classify(RunRecord(pid=1, start_time=now - 100, startup_timeout=60), None, None,
                    True, True, now) == "stalled"


def test_a_run_that_names_no_budgets_is_judged_by_the_configs_defaults():
    from lnsp.config import TrainConfig

    stall, startup, now = TrainConfig().stall_timeout, TrainConfig().startup_timeout, 1e4
    run = RunRecord(pid=1, start_time=0.0)
    for age, expected in ((stall - 1, "running"), (stall + 1, "stalled")):
        assert classify(run, Heartbeat(pid=1, time=now - age), None, True, True, now) == expected
    for age, expected in ((startup - 1, "running"), (startup + 1, "stalled")):
        run = RunRecord(pid=1, start_time=now - age)  # no heartbeat yet: still starting
        assert classify(run, None, None, True, True, now) == expected


def test_laggards_name_the_oldest_other_rank():
    now = 100.0
    beats = {0: Heartbeat(pid=10, time=99.0, step=5), 1: Heartbeat(pid=11, time=90.0, step=4,
                                                                   phase="forward", host="h"),
             2: Heartbeat(pid=12, time=98.0, step=5)}
    text = laggards(beats, me=0, now=now)
    assert text.startswith("rank 1 stalled (pid 11, step 4, phase 'forward', heartbeat 10.0s")
    assert "rank 0 1.0s" in text and "rank 2 2.0s" in text
    assert stalled_pid(beats, 0, "h") == 11 and stalled_pid(beats, 0, "elsewhere") is None
    assert laggards({}, 0, now) == ""


def test_failure_classification():
    timeout = classify_failure(RuntimeError("Timed out waiting 6000ms for recv"), 0, "rank 1 x")
    assert timeout.exit_code == ExitCode.STALLED and "collective timed out: rank 1 x" in str(timeout)
    left = classify_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1"), 0)
    assert left.exit_code == ExitCode.INTERNAL and "another rank left the job" in str(left)


def test_error_types_carry_their_exit_codes():
    assert {DataError("x").exit_code, ConfigError("x").exit_code, RunDirError("x").exit_code,
            LaunchError("x").exit_code} == {ExitCode.BAD_INPUT}
    assert TrainingError("x").exit_code == ExitCode.INTERNAL
    assert LaunchError("x", 1).exit_code == 1 and isinstance(RunDirError("x"), LnspError)
    assert not isinstance(RunDirError("x"), DataError)


def test_run_state_round_trips_through_a_checkpoint_and_ends_epochs():
    from lnsp.train.loop import RunState

    state = RunState(epoch=1, position=9, step=29, best=0.5)
    assert RunState.from_checkpoint({**state.as_dict(), "model": {}}) == state
    state.advance()
    assert state.end_interval(steps_per_epoch=10) == 2 and (state.epoch, state.position) == (2, 0)
    cut = RunState(epoch=0, position=4, step=4)  # the step budget ended mid-epoch
    assert cut.end_interval(10) == 1 and (cut.epoch, cut.position) == (0, 4)
    assert cut.improved(0.3) and cut.improved(0.3) and not cut.improved(0.2)


def test_status_time_is_a_fresh_clock_by_default(tmp_path):
    from lnsp.launch import backend
    from lnsp.observe.status import state

    rd = RunDir(tmp_path)
    rd.update_run(backend="foreground", pid=None, launch_time=time.time())
    assert state(rd, backend)["state"] == "starting"


def test_a_durable_write_fsyncs_the_file_and_then_its_folder(tmp_path):
    """The rename that puts a checkpoint in place is an entry of its folder: without the
    folder's fsync a power cut can bring back the old file (or none). Seen with strace,
    the system calls a real process makes."""
    import shutil
    import subprocess
    import sys

    from conftest import env

    if not shutil.which("strace"):
        pytest.skip("strace is not installed (.ci/run installs it)")
    target = tmp_path / "ckpt" / "last.json"
    code = f"from lnsp.rundir import write_json; write_json({str(target)!r}, {{'step': 1}})"
    r = subprocess.run(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync", sys.executable,
                        "-c", code], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = [line for line in r.stderr.splitlines() if line.startswith(("fsync(", "fdatasync("))]
    assert any(f"<{target.parent}/.last.json." in c for c in calls), calls  # the file
    assert any(c.startswith("fsync(") and f"<{target.parent}>" in c for c in calls), calls
