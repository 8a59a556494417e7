"""InfoNCE whose positive is the TRUE next vector; negatives are the mined top-K
(the positive removed) and the other samples' positives in the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, positive: torch.Tensor, mined: torch.Tensor,
             mined_ok: torch.Tensor, positive_ids: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """query, positive: (B, D); mined: (B, K, D) with mined_ok (B, K) False where a
    candidate is the positive itself or padding; positive_ids: (B,)."""
    pos = (query * positive).sum(-1, keepdim=True)
    hard = torch.bmm(mined, query.unsqueeze(-1)).squeeze(-1).masked_fill(~mined_ok, float("-inf"))
    # Another sample's positive is a negative unless it is the same bank row.
    in_batch = (query @ positive.T).masked_fill(positive_ids[None, :] == positive_ids[:, None],
                                                float("-inf"))
    logits = torch.cat([pos, hard, in_batch], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))
