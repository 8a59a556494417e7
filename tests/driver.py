"""Runs the `lnsp` command with one fault injected, the way a user meets it:
LNSP_TEST_FAULT names the fault, LNSP_TEST_FAULT_STEP the optimizer step before
which it strikes (start-up faults strike during data loading).

  blocked_read  block opening the FIFO LNSP_TEST_GATE until the test writes to it
  deadlock      take a lock the step already holds
  never_returns a step that loops forever
  nan           a non-finite loss
  startup       data loading that never ends
"""

import os
import sys
import threading
import time

import lnsp  # noqa: F401  (thread policy first, as in the real entry point)
from lnsp import cli, data, train

FAULT = os.environ["LNSP_TEST_FAULT"]
AT_STEP = int(os.environ.get("LNSP_TEST_FAULT_STEP", "3"))


def blocked_read(path):
    with open(path, "rb") as fifo:  # open() of a FIFO blocks in the kernel
        return fifo.read(1)


def deadlock():
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def never_returns():
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


train.optimizer_step = faulty_step
data.load = faulty_load

if __name__ == "__main__":
    sys.argv[0] = "lnsp"
    cli.main()
