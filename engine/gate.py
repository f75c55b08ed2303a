"""DN2 gate: an image's score is the mean squared distance to its K nearest reference features."""
from __future__ import annotations

import torch


def knn(query: torch.Tensor, reference: torch.Tensor, k: int,
        chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distances (B, k) and indices (B, k) of the k nearest rows of `reference`.

    The reference is walked in chunks, keeping a running top-k, so memory stays at
    B x (chunk + k) whatever the bank size.
    """
    query = query.float()
    k = min(k, reference.shape[0])
    q_sq = (query * query).sum(1, keepdim=True)
    best_d = best_i = None
    for start in range(0, reference.shape[0], chunk):
        ref = reference[start : start + chunk].to(query.device, torch.float32, non_blocking=True)
        d = q_sq + (ref * ref).sum(1)[None] - 2.0 * query @ ref.T
        i = torch.arange(start, start + ref.shape[0], device=query.device).expand_as(d)
        if best_d is not None:
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
        best_d, pos = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
        best_i = torch.gather(i, 1, pos)
    return best_d.clamp_min_(0.0), best_i


def dn2_scores(query: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), neighbour indices (B, k)), the indices sorted nearest first."""
    d, idx = knn(query, reference, k)
    return d.mean(1), idx
