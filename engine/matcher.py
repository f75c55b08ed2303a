"""Pixel matching: each pyramid cell against every cell of the frame's K nearest reference frames."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur


def nearest_cell_distance(query: torch.Tensor, gallery: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """L2 distance from each query row (Q, C) to its nearest gallery row (G, C), in chunks of G.

    Peak memory is Q x chunk whatever K is; the expansion |q|^2 + |g|^2 - 2 q.g turns the
    search into matrix products, which is where CPUs and GPUs are fast.
    """
    q_sq = (query * query).sum(1, keepdim=True)
    best = torch.full((query.shape[0],), float("inf"), device=query.device)
    for start in range(0, gallery.shape[0], chunk):
        g = gallery[start : start + chunk]
        d = torch.addmm(q_sq + (g * g).sum(1)[None], query, g.T, beta=1.0, alpha=-2.0)
        best = torch.minimum(best, d.min(1).values)
    return best.clamp_min_(0.0).sqrt_()


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return maps
    radius = int(math.ceil(4 * sigma))
    return gaussian_blur(maps[:, None], [2 * radius + 1] * 2, [sigma, sigma])[:, 0]


def anomaly_maps(query_pyramid: dict[str, torch.Tensor], bank_pyramid: dict[str, torch.Tensor],
                 neighbours: torch.Tensor, out_size: tuple[int, int], sigma: float = 4.0,
                 chunk: int = 16384) -> torch.Tensor:
    """Anomaly maps (B, H, W) for the frames of a batch.

    query_pyramid: level -> (B, C, h, w) fp32; bank_pyramid: level -> (N, C, h, w), any float
    dtype, on any device; neighbours: (B, K) bank indices of each frame's nearest frames.
    Each level's distances are upsampled to out_size, the levels summed, then smoothed.
    """
    batch = neighbours.shape[0]
    total = None
    for level, q in query_pyramid.items():
        _, c, h, w = q.shape
        per_frame = []
        for b in range(batch):
            idx = neighbours[b].to(bank_pyramid[level].device)
            gallery = bank_pyramid[level][idx].to(q.device, torch.float32)
            gallery = gallery.permute(0, 2, 3, 1).reshape(-1, c)
            cells = q[b].permute(1, 2, 0).reshape(-1, c)
            per_frame.append(nearest_cell_distance(cells, gallery, chunk).view(h, w))
        level_map = torch.stack(per_frame)[:, None]
        level_map = F.interpolate(level_map, size=out_size, mode="bilinear", align_corners=False)[:, 0]
        total = level_map if total is None else total + level_map
    return gaussian_smooth(total, sigma)


def anomaly_maps_bruteforce(query_pyramid, bank_pyramid, neighbours, out_size, sigma=4.0):
    """Reference implementation with torch.cdist, for tests and the benchmark's baseline."""
    total = None
    for level, q in query_pyramid.items():
        c = q.shape[1]
        maps = []
        for b in range(neighbours.shape[0]):
            gallery = bank_pyramid[level][neighbours[b]].float().permute(0, 2, 3, 1).reshape(-1, c)
            cells = q[b].permute(1, 2, 0).reshape(-1, c)
            maps.append(torch.cdist(cells, gallery).min(1).values.view(q.shape[2], q.shape[3]))
        m = F.interpolate(torch.stack(maps)[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
        total = m if total is None else total + m
    return gaussian_smooth(total, sigma)
