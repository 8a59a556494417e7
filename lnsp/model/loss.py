"""InfoNCE whose positive is the TRUE next vector; negatives are the mined top-K
(the positive and the window's own context removed) and the other samples'
positives in the batch (those in this window's context removed too): evaluation
never ranks a context vector, so training must not push the query away from one.
Text repeats sentences: a row identical to the positive (cosine >= 1 - 1e-6, the rule
evaluation counts as a hit) is the positive under another id, a false negative that
would fight it, and one identical to a context vector is excluded as the context is.
An optional cosine term pulls the query toward the true next vector itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SAME = 1 - 1e-6  # cosine above which two bank rows are one vector (a repeated sentence)


def info_nce(query: torch.Tensor, positive: torch.Tensor, mined: torch.Tensor,
             mined_ok: torch.Tensor, positive_ids: torch.Tensor,
             temperature: float, context_ids: torch.Tensor | None = None,
             cosine_weight: float = 0.0, context: torch.Tensor | None = None) -> torch.Tensor:
    """query, positive: (B, D); mined: (B, K, D) with mined_ok (B, K) False where a
    candidate is the positive itself (or a repeat of it), a context vector (or a repeat)
    or padding; positive_ids: (B,); context_ids: (B, T) or None; context: the (B, T, D)
    context vectors or None (then repeats in the batch are found by id alone)."""
    pos = (query * positive).sum(-1, keepdim=True)
    hard = torch.bmm(mined, query.unsqueeze(-1)).squeeze(-1).masked_fill(~mined_ok, float("-inf"))
    # Another sample's positive is a negative unless it is the same bank row (or a
    # repeat of it) or a vector of this window's context (or a repeat of one).
    same = positive_ids[None, :] == positive_ids[:, None]
    if context_ids is not None:
        same = same | (context_ids[:, :, None] == positive_ids[None, None, :]).any(1)
    with torch.no_grad():
        same = same | ((positive @ positive.T) >= SAME)
        if context is not None:
            b, t, d = context.shape
            same = same | ((context.reshape(b * t, d) @ positive.T) >= SAME).view(b, t, -1).any(1)
    in_batch = (query @ positive.T).masked_fill(same, float("-inf"))
    logits = torch.cat([pos, hard, in_batch], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))
    if cosine_weight:
        loss = loss + cosine_weight * (1 - pos.squeeze(-1)).mean()
    return loss
