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


def rng_state() -> dict:
    """The random generators' states: the CPU's, and on a Mac with Metal the MPS
    device's own generator (dropout on device mps draws from it, not the CPU's); absent
    where there is no MPS device."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.backends.mps.is_available():
        state["mps_rng"] = torch.mps.get_rng_state()
    return state


def restore_rng(saved: dict) -> None:
    """Put back what rng_state() saved; an MPS state is restored only where there is
    an MPS device (a Mac's checkpoint resumed on Linux keeps the CPU's)."""
    torch.set_rng_state(saved["torch_rng"])
    if "mps_rng" in saved and torch.backends.mps.is_available():
        torch.mps.set_rng_state(saved["mps_rng"])


def save(path: Path, model, optimizer, config, **state) -> None:
    """`state`: plain values only (ints, floats, strings, lists, dicts)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                **rng_state(), "config": config.to_json(), **state}, buf)
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
