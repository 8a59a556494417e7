"""Runs the `lnsp` command with one fault injected, the way a user meets it:
LNSP_TEST_FAULT names the fault, LNSP_TEST_FAULT_STEP the optimizer step before
which it strikes (start-up faults strike during data loading).

  blocked_read  block opening the FIFO LNSP_TEST_GATE until the test writes to it
  deadlock      take a lock the step already holds
  never_returns a step that loops forever
  nan           a non-finite loss
  startup       data loading that never ends

Just before a fault blocks, the driver creates the file LNSP_TEST_MARKER (when set):
a test that signals, stalls or kills waits for that file, a state it controls, and
never for a step number, which only suggests where the process is.

LNSP_TEST_EVAL_LOG (when set): every call of evaluate.evaluate appends a line
{"rank": R, "windows": N} there, so a test sees which rank evaluated what.
"""

import json
import os
import sys
import threading
import time

import lnsp  # noqa: F401  (thread policy first, as in the real entry point)
from lnsp import cli, data, evaluate, train

FAULT = os.environ.get("LNSP_TEST_FAULT", "")
AT_STEP = int(os.environ.get("LNSP_TEST_FAULT_STEP", "3"))


def reached():
    """Tell the test that the fault is about to block (it waits for this file)."""
    marker = os.environ.get("LNSP_TEST_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))


def blocked_read(path):
    reached()
    with open(path, "rb") as fifo:  # open() of a FIFO blocks in the kernel
        return fifo.read(1)


def deadlock():
    lock = threading.Lock()
    lock.acquire()
    reached()
    lock.acquire()


def never_returns():
    reached()
    while True:
        time.sleep(0.5)


calls = {"n": 0}
real_step, real_load = train.optimizer_step, data.load


def faulty_step(job, loss):
    calls["n"] += 1
    if calls["n"] == AT_STEP:
        if FAULT == "blocked_read":
            blocked_read(os.environ["LNSP_TEST_GATE"])
        elif FAULT == "deadlock":
            deadlock()
        elif FAULT == "never_returns":
            never_returns()
        elif FAULT == "nan":
            loss = float("nan")
    return real_step(job, loss)


def faulty_load(*args, **kwargs):
    if FAULT == "startup":
        never_returns()
    return real_load(*args, **kwargs)


real_evaluate = evaluate.evaluate


def logged_evaluate(model, ds, index, starts, *args, **kwargs):
    with open(os.environ["LNSP_TEST_EVAL_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")),
                            "windows": [int(s) for s in starts]}) + "\n")
    return real_evaluate(model, ds, index, starts, *args, **kwargs)


train.optimizer_step = faulty_step
data.load = faulty_load
if os.environ.get("LNSP_TEST_EVAL_LOG"):
    evaluate.evaluate = logged_evaluate

if __name__ == "__main__":
    sys.argv[0] = "lnsp"
    cli.main()
