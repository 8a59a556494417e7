"""Checkpoints load with weights_only: a file from elsewhere that carries code is
refused with one line and exit code 2, and its code never runs."""

import os

import torch

from conftest import FAST_TRAIN, lnsp


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_generate_refuses_a_checkpoint_that_carries_code(small_data, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "config": {"hidden": 32}}, evil)
    r = lnsp("generate", "--checkpoint", evil, "--data", small_data, "--steps", "2")
    assert r.returncode == 2, r.stdout + r.stderr
    assert not marker.exists(), "the checkpoint's code ran"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_trained_checkpoint_loads_with_weights_only(small_data, tmp_path):
    from lnsp import checkpoint

    run = tmp_path / "run"
    r = lnsp("train", "--data", small_data, "--run-dir", run, "--max-steps", "3", *FAST_TRAIN)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["config"]["hidden"] == 32 and state["model"]
    # The fused AdamW (one kernel over all parameters) and the precision auto chose,
    # which a resumed run keeps.
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    assert isinstance(state["bf16"], bool) and state["miner"] == {}  # exact search: no check
    r = lnsp("generate", "--checkpoint", run / "checkpoints" / "last.pt", "--data", small_data,
             "--steps", "2", "--start", "0")
    assert r.returncode == 0, r.stdout + r.stderr
