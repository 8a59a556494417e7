"""Checkpoints, written atomically: model, optimizer, run state, RNG state and the
config that produced them. Only tensors and plain values are stored, so a checkpoint
loads with torch.load(weights_only=True): a file from elsewhere cannot run code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from lnsp.errors import DataError
from lnsp.rundir import atomic_write


def save(path: Path, model, optimizer, config, **state) -> None:
    """`state`: plain values only (ints, floats, strings, lists, dicts)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "config": config.to_json(), **state},
               buf)
    atomic_write(path, buf.getvalue())


def load(path: Path) -> dict:
    """The checkpoint's contents; a file that is not one, or that holds anything but
    tensors and plain values (a pickle with code in it), is refused with one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: refused: not a plain lnsp checkpoint (it holds objects "
                        f"that loading would have to run: {first[:200]})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
