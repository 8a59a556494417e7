"""InfoNCE whose positive is the TRUE next vector; negatives are the mined top-K
(the positive and the window's own context removed) and the other samples'
positives in the batch (those in this window's context removed too): evaluation
never ranks a context vector, so training must not push the query away from one.
An optional cosine term pulls the query toward the true next vector itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, positive: torch.Tensor, mined: torch.Tensor,
             mined_ok: torch.Tensor, positive_ids: torch.Tensor,
             temperature: float, context_ids: torch.Tensor | None = None,
             cosine_weight: float = 0.0) -> torch.Tensor:
    """query, positive: (B, D); mined: (B, K, D) with mined_ok (B, K) False where a
    candidate is the positive itself, a context vector or padding; positive_ids: (B,);
    context_ids: (B, T) or None."""
    pos = (query * positive).sum(-1, keepdim=True)
    hard = torch.bmm(mined, query.unsqueeze(-1)).squeeze(-1).masked_fill(~mined_ok, float("-inf"))
    # Another sample's positive is a negative unless it is the same bank row or a
    # vector of this window's context.
    same = positive_ids[None, :] == positive_ids[:, None]
    if context_ids is not None:
        same = same | (context_ids[:, :, None] == positive_ids[None, None, :]).any(1)
    in_batch = (query @ positive.T).masked_fill(same, float("-inf"))
    logits = torch.cat([pos, hard, in_batch], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))
    if cosine_weight:
        loss = loss + cosine_weight * (1 - pos.squeeze(-1)).mean()
    return loss
