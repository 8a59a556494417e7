"""The restart policy, one copy for every restarter (the supervisor, `lnsp run`, and a
trainer that torchrun's agent restarts): which endings a restart can fix, and when
restarts have become a crash loop."""

from __future__ import annotations

from lnsp.rundir import ExitCode, RunDir

CRASH_LOOP_ATTEMPTS = 3  # the first attempt and two restarts

# Endings: what a restart can fix.
RESTARTABLE = {"stall": True, "crash": True, "bad-input": False, "non-finite": False,
               "out-of-memory": False, "stopped": False, "finished": False}


def classify_ending(exit_code: int, record) -> str:
    """The kind of an ending from the trainer's exit code and its exit.json (a dict, a
    lnsp.rundir.ExitRecord, or None)."""
    if hasattr(record, "state"):  # an ExitRecord: its fields and extras as one dict
        record = {"state": record.state, "cause": record.cause or "", **record.extra}
    record = record or {}
    text = f"{record.get('error', '')} {record.get('cause', '')}".lower()
    if exit_code == 0:
        return "stopped" if record.get("state") == "stopped" else "finished"
    if exit_code == 2:
        return "bad-input"
    if "non-finite" in text:
        return "non-finite"
    if "out of memory" in text or "memoryerror" in text or exit_code == -9 and \
            record.get("oom"):
        return "out-of-memory"
    if exit_code == 3:
        return "stall"
    return "crash"


def crash_loop(checkpoint_steps: list[int]) -> bool:
    """Two restarts in a row that made no progress past the last checkpoint.
    `checkpoint_steps`: the checkpoint step each attempt started from, then the one the
    last attempt left. A restart made no progress when the checkpoint it left is the one
    it started from; the first attempt is not a restart."""
    if len(checkpoint_steps) < 4:  # the first attempt, two restarts, and where they left it
        return False
    latest, previous = checkpoint_steps[-2:], checkpoint_steps[-3:-1]
    return latest[1] <= latest[0] and previous[1] <= previous[0]


def alike_endings(endings: list[tuple[int, int, str | None]]) -> bool:
    """The last CRASH_LOOP_ATTEMPTS attempts ended alike: the same exit code and cause
    at the same optimizer step (a script that resumes from its own checkpoint and dies
    at the same place every time), or each before its first step."""
    if len(endings) < CRASH_LOOP_ATTEMPTS:
        return False
    last = endings[-CRASH_LOOP_ATTEMPTS:]
    return len(set(last)) == 1 or all(step == 0 for _, step, _ in last)


def restart_refused(rd: RunDir) -> tuple[str, int] | None:
    """For a job that torchrun's agent restarts (it restarts on any failure): why this
    attempt should not run, and its exit code, or None. Every rank asks before the
    rendezvous, from the same files, so all give the same answer."""
    if rd.stop_requested():  # torchrun restarts ranks that `lnsp stop` had to kill
        return "the run was stopped (lnsp stop): not running again", int(ExitCode.DONE)
    record = rd.read_exit()
    if record is None:
        return None
    kind = classify_ending(record.exit_code, record)
    if not RESTARTABLE.get(kind, True):
        return (f"the last attempt ended: {kind} ({record.cause or record.state}); a restart "
                "would repeat it: not running", int(record.exit_code) or 1)
    steps = rd.read_run().get("attempts_from", []) + [rd.checkpoint_step()]
    if crash_loop(steps):
        return (f"crash loop: the last restarts made no progress past step {steps[-1]}; "
                f"each ended: {record.cause or kind}", int(ExitCode.CRASH_LOOP))
    return None
