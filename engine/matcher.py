"""Pixel matching: each pyramid cell against every cell of the frame's K nearest reference frames.

Two paths give the same maps within a documented tolerance:

- exact (fp32): |q|^2 + |g|^2 - 2 q.g as fp32 matrix products, chunked over the gallery.
- reduced precision (bf16 on CPUs with native bf16 dot products and on CUDA GPUs from Ampere on):
  the same expansion as one bf16 matrix product, several times faster on such CPUs. It measures
  distances between the bf16-rounded features exactly (fp32 accumulation), then rounds -d^2
  to bf16 (tests bound the change at 2% of a cell and 0.5% of a map). Centring on the gallery's mean keeps the rounding of the features small.
  Never fp16, even under fp16 autocast: its range ends at 65504, and the squared distance of
  an anomalous cell can pass that (it came out NaN).

Frames of a batch with the same K nearest frames (a camera's consecutive frames usually do)
share one gallery and one matrix product.
"""
from __future__ import annotations

import math
from collections import defaultdict

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


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x as hi + lo in `dtype`: twice the mantissa bits of one rounding."""
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


def nearest_cell_distance_lowp(query: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype,
                               chunk: int = 4096) -> torch.Tensor:
    """nearest_cell_distance with the search's matrix product in `dtype` (bf16).

    One product gives -d^2 = 2 q.g - |q|^2 - |g|^2 directly, by augmenting q with
    [1, 1, -|q|^2 (hi, lo)] and 2g with [-|g|^2 (hi, lo), 1, 1]; the norms are split in two
    so their rounding does not swamp the small distances we look for. What remains is the
    rounding of the features themselves and of the product's output (0.4% of d^2). Only a max is taken
    (no argmax: indexed reductions over low-precision outputs cost more than the product).
    Chunks of the gallery keep the product's output in cache for the max.
    """
    if dtype != torch.bfloat16:
        raise ValueError(f"the low-precision search needs bf16's range, not {dtype}")
    centre = gallery.mean(0)
    # The norms are those of the rounded vectors, so the product is the distance between the
    # rounded vectors (exact bf16 products, fp32 accumulation): rounding moves a distance by at
    # most |q - q_r| + |g - g_r|, instead of cancelling away the small distances.
    g = (gallery - centre).to(dtype)
    q = (query - centre).to(dtype)
    q_hi, q_lo = _split(q.float().square().sum(1, keepdim=True), dtype)
    g_hi, g_lo = _split(-g.float().square().sum(1, keepdim=True), dtype)
    ones_q, ones_g = torch.ones_like(q_hi), torch.ones_like(g_hi)
    q_aug = torch.cat([q, ones_q, ones_q, -q_hi, -q_lo], 1)
    g_aug = torch.cat([2 * g, g_hi, g_lo, ones_g, ones_g], 1)  # doubling is exact in bf16
    best: torch.Tensor | None = None
    for start in range(0, g_aug.shape[0], chunk):
        neg_d2 = (q_aug @ g_aug[start : start + chunk].T).amax(1)
        best = neg_d2 if best is None else torch.maximum(best, neg_d2)
    assert best is not None, "empty gallery"
    return (-best.float()).clamp_min_(0.0).sqrt_()


def match_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The search dtype for a model's resolved precision; None means the exact fp32 path."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        # bf16 whatever the autocast dtype (see the module docstring); GPUs before Ampere have no
        # bf16 matrix units, so they search in fp32.
        return torch.bfloat16 if _cuda_has_bf16(device) else None
    return torch.bfloat16 if precision == "bf16" else None  # CPU fp16 products are slow


def _cuda_has_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return True  # what a GPU would get; lets a CPU-only machine check the choice
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _gaussian_kernel(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, H, W) maps: torchvision's kernel and reflect padding, applied as two
    1-D passes (2 x 33 instead of 33 x 33 taps per pixel at sigma 4)."""
    if sigma <= 0:
        return maps
    radius = int(math.ceil(4 * sigma))
    kernel = _gaussian_kernel(sigma, radius, maps.device)
    x = maps[:, None].float()
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"  # reflect needs pad < size
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_maps(query_pyramid: dict[str, torch.Tensor], bank_pyramid: dict[str, torch.Tensor],
                 neighbours: torch.Tensor, out_size: tuple[int, int], sigma: float = 4.0,
                 chunk: int = 16384, search_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Anomaly maps (B, H, W) for the frames of a batch.

    query_pyramid: level -> (B, C, h, w) fp32; bank_pyramid: level -> (N, C, h, w), any float
    dtype, on any device; neighbours: (B, K) bank indices of each frame's nearest frames.
    Each level's distances are upsampled to out_size, the levels summed, then smoothed.
    search_dtype: None for the exact fp32 search, else bf16 (see the module docstring).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)  # frames with the same K nearest frames
    for b, row in enumerate(neighbours.tolist()):
        groups[tuple(row)].append(b)
    total: torch.Tensor | None = None
    for level, q in query_pyramid.items():
        _, c, h, w = q.shape
        level_map = torch.empty(q.shape[0], h * w, device=q.device)
        for row, members in groups.items():
            idx = torch.tensor(row, device=bank_pyramid[level].device)
            gallery = bank_pyramid[level][idx].to(q.device, torch.float32)
            gallery = gallery.permute(0, 2, 3, 1).reshape(-1, c)
            cells = q[members].permute(0, 2, 3, 1).reshape(-1, c)
            if search_dtype is None:
                dist = nearest_cell_distance(cells, gallery, chunk)
            else:
                dist = nearest_cell_distance_lowp(cells, gallery, search_dtype)
            level_map[members] = dist.view(len(members), h * w)
        level_map = F.interpolate(level_map.view(-1, 1, h, w), size=out_size, mode="bilinear",
                                  align_corners=False)[:, 0]
        total = level_map if total is None else total + level_map
    assert total is not None, "no pyramid level"
    return gaussian_smooth(total, sigma)


def anomaly_maps_bruteforce(query_pyramid, bank_pyramid, neighbours, out_size, sigma=4.0):
    """Reference implementation: torch.cdist per frame and torchvision's 2-D Gaussian blur, for
    tests and the benchmark's baseline."""
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
    if sigma <= 0:
        return total
    radius = int(math.ceil(4 * sigma))
    return gaussian_blur(total[:, None], [2 * radius + 1] * 2, [sigma, sigma])[:, 0]
