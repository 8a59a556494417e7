"""The query tower: a learned blend of the context vectors plus a GRU's correction,
L2-normalised. The document tower is the identity over the unit-norm bank, so it
has no module.

Why this shape (measured on real text, see docs/results.md): consecutive sentences are
neighbours, so a fixed blend of the context already beats most trained towers; the
tower starts AS that blend (weights decaying toward the past) and the GRU's output
projection starts at zero, so training can only move away from the baseline where
the gradient says it helps. Dropout on the GRU state keeps a small data set from
being memorised within an epoch or two."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnsp.config import ConfigError


MAX_CTX = 64  # positions the blend has a weight for (the last MAX_CTX of a longer window)
DECAY = 0.5  # initial blend: each step back weighs half as much
DROPOUT = 0.3


class QueryTower(nn.Module):
    def __init__(self, dim: int, hidden: int, decay: float = DECAY, dropout: float = DROPOUT,
                 bf16: bool = False):
        super().__init__()
        # logits[a] weighs the vector a steps before the end: a log-linear decay.
        age = torch.arange(MAX_CTX, dtype=torch.float32)
        self.blend_logits = nn.Parameter(age * float(torch.log(torch.tensor(max(decay, 1e-4)))))
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, dim)
        nn.init.zeros_(self.proj.weight)  # the correction starts at zero: the blend alone
        nn.init.zeros_(self.proj.bias)
        self.bf16 = bf16  # the GRU's matrix products in bfloat16 (lnsp.model.precision)

    def blend(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the context weighted by softmax over the last T logits."""
        t = context.shape[1]
        weights = torch.softmax(self.blend_logits[:min(t, MAX_CTX)].flip(0), dim=0)
        return torch.einsum("t,btd->bd", weights, context[:, -min(t, MAX_CTX):])

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) context vectors -> (B, D) unit queries."""
        if self.bf16:
            with torch.autocast(context.device.type, dtype=torch.bfloat16):
                last = _gru_last(self.gru, context)
        else:
            last = self.gru(context)[1][-1]  # the final hidden state
        return F.normalize(self.blend(context) + self.proj(self.drop(last.float())), dim=-1)


def _gru_last(gru: nn.GRU, x: torch.Tensor) -> torch.Tensor:
    """nn.GRU's last hidden state, step by step with its own parameters: autocast
    reaches these matrix products (bf16), not those inside torch's fused CPU GRU. The
    input projection of the whole window is one product, as in torch's; the hidden
    state stays float32."""
    gi = F.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)  # (B, T, 3H)
    h = x.new_zeros(x.shape[0], gru.hidden_size, dtype=torch.float32)
    for t in range(x.shape[1]):
        gh = F.linear(h, gru.weight_hh_l0, gru.bias_hh_l0)
        i_r, i_z, i_n = gi[:, t].chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = n + z * (h - n)
    return h


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
