"""Checkpoints, written atomically: model, optimizer, position, RNG state and the
config that produced them."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from lnsp.rundir import atomic_write


def save(path: Path, model, optimizer, config, **position) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": config.to_json(), **position},
               buf)
    atomic_write(path, buf.getvalue())


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
