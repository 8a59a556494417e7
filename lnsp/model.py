"""The query tower: a GRU over the context window, pooled, LayerNorm, L2-normalised.
The document tower is the identity over the unit-norm bank, so it has no module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnsp.config import ConfigError


class QueryTower(nn.Module):
    def __init__(self, dim: int, hidden: int, bf16: bool = False):
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.bf16 = bf16  # the GRU's matrix products in bfloat16 (lnsp.precision)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) context vectors -> (B, D) unit queries."""
        # Under autocast the GRU's GEMMs run in bf16 while its hidden state stays
        # float32; the head, the norm and everything after run in float32.
        with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            _, last = self.gru(context)  # pooled: the final hidden state
        return F.normalize(self.norm(self.proj(last[-1].float())), dim=-1)


def flops_per_sample(dim: int, hidden: int, ctx_len: int) -> float:
    """Multiply-adds x2 of one forward pass; training is ~3x this."""
    gru = 3 * hidden * (dim + hidden) * ctx_len
    return 2.0 * (gru + hidden * dim)


def resolve_device(name: str) -> torch.device:
    """The device for the towers; a device that is not there is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("device mps requested but MPS is not available on this machine")
    return torch.device(name)
