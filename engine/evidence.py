"""Why a frame is anomalous: the nearest normal patch to its most anomalous place.

Pixel matching already searched, for every cell, the cells of the frame's K nearest
reference frames, but kept only the distance. For the map's peak, one cell, the search is
repeated with the argmin: one query against K frames' cells, negligible next to the map.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .backbones import LEVEL_STRIDES


@dataclass(frozen=True)
class Evidence:
    ref_index: int  # the bank row of the nearest reference frame
    box: list[int]  # [x, y, w, h] the peak cell, in model-input pixels of the frame
    ref_box: list[int]  # [x, y, w, h] the cell it matched, in the reference frame's
    distance: float  # feature distance between the two cells
    level: str

    def to_json(self) -> dict:
        return asdict(self)


def _cell_box(y: int, x: int, stride: int, size: tuple[int, int]) -> list[int]:
    """A cell's receptive centre as a box of two strides, clipped to the image."""
    half = stride
    cy, cx = y * stride + stride // 2, x * stride + stride // 2
    x0, y0 = max(0, cx - half), max(0, cy - half)
    x1, y1 = min(size[1], cx + half), min(size[0], cy + half)
    return [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]


def peak_evidence(amap: np.ndarray, pyramid: dict[str, torch.Tensor], bank_pyramid: dict[str, torch.Tensor],
                  neighbours: np.ndarray, level: str) -> Evidence:
    """The evidence of one frame: amap (H, W) at model-input size, pyramid level -> (C, h, w) of
    the frame, neighbours its K nearest bank rows, level the pyramid level to match at."""
    size = amap.shape[:2]
    py, px = np.unravel_index(int(np.argmax(amap)), size)
    q = pyramid[level].float()
    c, h, w = q.shape
    y, x = min(h - 1, int(py * h / size[0])), min(w - 1, int(px * w / size[1]))
    rows = torch.as_tensor(np.asarray(neighbours), dtype=torch.long, device=bank_pyramid[level].device)
    gallery = bank_pyramid[level][rows].to(q.device, torch.float32)  # (K, C, h, w)
    dist = ((gallery - q[:, y, x][None, :, None, None]) ** 2).sum(1)  # (K, h, w)
    flat = int(torch.argmin(dist))
    k, rest = divmod(flat, h * w)
    ry, rx = divmod(rest, w)
    stride = LEVEL_STRIDES[level]
    return Evidence(ref_index=int(rows[k]), box=_cell_box(y, x, stride, size), ref_box=_cell_box(ry, rx, stride, size),
                    distance=float(dist.view(-1)[flat].clamp_min(0).sqrt()), level=level)
