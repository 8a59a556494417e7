"""The names of a run's phases, one spelling for every module: the watchdog learns a
budget per phase, goodput charges each to a category, the heartbeat shows the current
one. A str enum: it is written to JSON and compared with the strings older records hold.
Standard library only (the guard runs in a user's interpreter)."""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    STARTUP = "startup"  # process start to the first sign of work
    LOAD_DATA = "load data"
    INDEX = "index"  # the miner's FAISS index
    RENDEZVOUS = "rendezvous"  # the ranks of a distributed job meet
    # one optimizer step, micro-batch by micro-batch
    LOAD = "load"
    FORWARD = "forward"
    RETRIEVE = "retrieve"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    SYNC = "sync"  # a rank reached the collectives of its step
    STEP_END = "step end"  # after an optimizer step: heartbeat, log, the next batch
    TRAIN = "train"  # between an epoch's end and its next step
    EVALUATE = "evaluate"
    CHECKPOINT = "checkpoint"
    BARRIER = "barrier"
    CALIBRATE = "calibrate"
    END = "end"
    # the goodput clock's own: time lost to a reported stall, or to a paused process
    STALLED = "stalled"
    PAUSED = "paused"

    __str__ = str.__str__  # "evaluate", not "Phase.EVALUATE", in lines and records
    __format__ = str.__format__


# The parts of one training step, in order (the probe's timings, the bench's).
STEP_PHASES = (Phase.LOAD, Phase.FORWARD, Phase.RETRIEVE, Phase.LOSS, Phase.BACKWARD)
# Phases that are not slowdowns of training: their time is not in the slowdown window.
PAUSES = (Phase.EVALUATE, Phase.CHECKPOINT, Phase.BARRIER, Phase.TRAIN, Phase.CALIBRATE)
