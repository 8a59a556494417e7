"""lnsp.guard: the guard's small public API, for a training script that wants more than
`lnsp run -- python train.py` gives it with no code change.

    import lnsp.guard as guard

    for batch in loader:
        loss = train_step(batch)            # optimizer.step() beats the heartbeat itself
        guard.step(loss=loss.item(), lr=lr) # optional: scalars into steps.jsonl
        if guard.should_stop():             # SIGTERM, Ctrl-C, SIGHUP, `lnsp stop`
            save_checkpoint(); break
    with guard.phase("evaluate"):           # a phase with its own learned budget
        evaluate()
    start = load_checkpoint() if guard.attempt() else 0   # 0 first, n after n restarts

Every call is a cheap no-op when the script runs without lnsp. Standard library only:
this module lives in the user's interpreter.
"""

from __future__ import annotations

import contextlib

from lnsp.guard import runtime as _runtime

__all__ = ["active", "step", "phase", "should_stop", "attempt"]


def active() -> bool:
    """Whether this process runs under the guard (`lnsp run`, `lnsp launch`)."""
    return _runtime.current is not None


def step(loss: float | None = None, **scalars: float) -> None:
    """One training step done, with its loss and any scalars (steps.jsonl, TensorBoard).
    With an optimizer in the process its step already counted: this only adds the
    figures to it; without one (another framework) it counts the step."""
    rt = _runtime.current
    if rt is not None:
        rt.user_step(loss, scalars)


@contextlib.contextmanager
def phase(name: str):
    """A named phase (evaluate, checkpoint, ...) with its own learned budget: a long
    evaluation is not a stall, and its time is not charged to training. Entering and
    leaving are signs of progress; phases nest (leaving one goes back to the outer)."""
    rt = _runtime.current
    if rt is None:
        yield
        return
    outer = rt.enter_phase(name)
    try:
        yield
    finally:
        rt.leave_phase(outer)


def should_stop() -> bool:
    """True once SIGTERM, SIGINT (Ctrl-C), SIGHUP or `lnsp stop` asked this run to stop.
    A script that asks is trusted to stop at its next boundary (a checkpoint first); one
    that never asks is ended by the signal as plain Python would end it."""
    rt = _runtime.current
    return rt.should_stop() if rt is not None else False


def attempt() -> int:
    """0 on the first start, n after n restarts (`--max-restarts`): a script resumes from
    its own checkpoint when this is not 0."""
    return _runtime.attempt()
