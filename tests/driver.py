"""Runs the `lnsp` command with one fault injected, the way a user meets it:
LNSP_TEST_FAULT names the fault, LNSP_TEST_FAULT_STEP the optimizer step before
which it strikes (start-up faults strike during data loading).

  blocked_read  block opening the FIFO LNSP_TEST_GATE until the test writes to it
  deadlock      take a lock the step already holds
  never_returns a step that loops forever
  nan           a non-finite loss
  startup       data loading that never ends
  crash         an exception at that step of every attempt (a crash loop)
  slow_eval     every evaluation chunk takes LNSP_TEST_EVAL_SECONDS (a long evaluation)
  gil_held      native code that keeps the GIL forever: no thread of the trainer runs
                Python (its watchdog neither), only an outside observer sees it frozen

LNSP_TEST_TRIGGER (a path): the fault strikes only once the test has created that file
(at the first step from LNSP_TEST_FAULT_STEP on), so a test can look at the healthy run
before it.

LNSP_TEST_FAULT_ONCE (a path): the fault strikes in the first attempt only (the file
records that it did), so a restarted run can get past it. Under `lnsp supervise` the
trainers it starts run through this driver too.

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
from lnsp import cli
from lnsp.data import dataset as data
from lnsp.train import evaluate
from lnsp.launch import supervise
from lnsp.train.trainer import Trainer

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


def gil_held():
    import ctypes

    libc = ctypes.PyDLL(None)  # a PyDLL call keeps the GIL for its whole length
    reached()
    while True:
        libc.sleep(3600)


calls = {"n": 0}
real_step, real_load = Trainer.optimize, data.load


def strikes() -> bool:
    once = os.environ.get("LNSP_TEST_FAULT_ONCE")
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def triggered() -> bool:
    """LNSP_TEST_TRIGGER (a path): the fault waits for the test to create that file,
    striking at the first step from AT_STEP on after it exists; until then the run
    trains as it would (a test can look at a healthy run first)."""
    trigger = os.environ.get("LNSP_TEST_TRIGGER")
    return not trigger or os.path.exists(trigger)


def faulty_step(job, loss):
    calls["n"] += 1
    if calls["n"] >= AT_STEP and "struck" not in calls and triggered() and strikes():
        calls["struck"] = True
        if FAULT == "blocked_read":
            blocked_read(os.environ["LNSP_TEST_GATE"])
        elif FAULT == "deadlock":
            deadlock()
        elif FAULT == "never_returns":
            never_returns()
        elif FAULT == "gil_held":
            gil_held()
        elif FAULT == "nan":
            loss = float("nan")
        elif FAULT == "crash":
            raise RuntimeError("injected crash")
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


def slow_evaluate(*args, **kwargs):
    time.sleep(float(os.environ.get("LNSP_TEST_EVAL_SECONDS", "1")))
    return real_evaluate(*args, **kwargs)


def driven_trainer(config, resume):
    """The supervisor's trainers run through this driver, with the same faults."""
    return [sys.executable, "-u", "-X", "faulthandler", __file__, "train",
            *config.replace(resume=resume).to_argv()]


Trainer.optimize = faulty_step
data.load = faulty_load
if os.environ.get("LNSP_TEST_EVAL_LOG"):
    evaluate.evaluate = logged_evaluate
if FAULT == "slow_eval":
    evaluate.evaluate = slow_evaluate
supervise.trainer_argv = driven_trainer

if __name__ == "__main__":
    sys.argv[0] = "lnsp"
    cli.main()
