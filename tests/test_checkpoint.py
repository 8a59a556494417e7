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
    from lnsp.train import checkpoint

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


def test_the_mps_generator_is_saved_only_where_there_is_one(tmp_path, monkeypatch):
    """A Mac's Metal device has a generator of its own (dropout on mps); it is saved
    and restored there, and simply absent elsewhere. The Mac is faked: torch's own
    answer that MPS is available, and its generator's state."""
    from lnsp.train import checkpoint
    from lnsp.config import TrainConfig

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    checkpoint.save(tmp_path / "linux.pt", model, optimizer, TrainConfig())
    saved = checkpoint.load(tmp_path / "linux.pt")
    assert "torch_rng" in saved and "mps_rng" not in saved
    checkpoint.restore_rng(saved)  # no MPS device: the CPU's alone

    metal = {"state": torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: metal["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: metal.update(state=s))
    checkpoint.save(tmp_path / "mac.pt", model, optimizer, TrainConfig())
    saved = checkpoint.load(tmp_path / "mac.pt")  # still weights_only: a tensor
    assert torch.equal(saved["mps_rng"], torch.arange(8, dtype=torch.uint8))
    metal["state"] = torch.zeros(8, dtype=torch.uint8)
    checkpoint.restore_rng(saved)
    assert torch.equal(metal["state"], torch.arange(8, dtype=torch.uint8))
