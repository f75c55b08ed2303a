"""The fast pixel-matching paths agree with the brute-force torch.cdist reference."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from engine.matcher import (
    anomaly_maps,
    anomaly_maps_bruteforce,
    gaussian_smooth,
    match_dtype,
    nearest_cell_distance,
    nearest_cell_distance_lowp,
)


def camera_like_bank(frames: int = 12, channels: int = 48, h: int = 12, w: int = 16, seed: int = 0):
    """A static scene's features: one background pattern plus small per-frame changes."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(1, channels, h, w, generator=g) * 3 + 1
    return (background + 0.4 * torch.randn(frames, channels, h, w, generator=g)).half()


def test_low_precision_search_is_within_tolerance_of_exact():
    bank = camera_like_bank()
    gallery = bank[:5].float().permute(0, 2, 3, 1).reshape(-1, bank.shape[1])
    query = bank[7].float().permute(1, 2, 0).reshape(-1, bank.shape[1])
    query[:20] += 4.0  # some anomalous cells: far from everything
    exact = torch.cdist(query, gallery).min(1).values
    assert torch.allclose(nearest_cell_distance(query, gallery), exact, rtol=1e-4, atol=1e-3)
    fast = nearest_cell_distance_lowp(query, gallery, torch.bfloat16, chunk=100)  # several chunks
    rel = (fast - exact).abs() / exact
    assert rel.max() < 0.02 and rel.mean() < 0.005, (rel.max(), rel.mean())


def test_maps_match_the_bruteforce_reference_in_both_paths():
    bank = {"s8": camera_like_bank(), "s16": camera_like_bank(channels=64, h=6, w=8, seed=1)}
    query = {lv: v[[2, 3, 9]].float() + 0.1 for lv, v in bank.items()}
    neighbours = torch.tensor([[0, 1, 4], [0, 1, 4], [5, 6, 7]])  # frames 0 and 1 share a gallery
    reference = anomaly_maps_bruteforce(query, bank, neighbours, (48, 64))
    exact = anomaly_maps(query, bank, neighbours, (48, 64))
    assert torch.allclose(exact, reference, rtol=1e-4, atol=1e-3)
    fast = anomaly_maps(query, bank, neighbours, (48, 64), search_dtype=torch.bfloat16)
    assert ((fast - reference).abs() / reference.abs()).max() < 0.005


def test_separable_smoothing_equals_torchvision_blur():
    maps = torch.rand(2, 40, 50)
    for sigma in (1.0, 4.0):
        radius = int(math.ceil(4 * sigma))
        expected = gaussian_blur(maps[:, None], [2 * radius + 1] * 2, [sigma, sigma])[:, 0]
        assert torch.allclose(gaussian_smooth(maps, sigma), expected, atol=1e-5)
    assert torch.equal(gaussian_smooth(maps, 0.0), maps)
    small = torch.rand(1, 6, 7)  # smaller than the kernel: still smooths, no error
    assert gaussian_smooth(small, 4.0).shape == small.shape


@pytest.mark.parametrize("precision, device, expected", [
    ("fp32", "cpu", None), ("bf16", "cpu", torch.bfloat16), ("fp16", "cpu", None),
    ("fp16", "cuda", torch.bfloat16), ("bf16", "cuda", torch.bfloat16), ("fp32", "cuda", None),
])
def test_search_dtype_follows_the_model_precision(precision, device, expected):
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        expected = None  # no bf16 matrix units before Ampere
    assert match_dtype(precision, torch.device(device)) is expected


def test_far_cells_keep_their_distance_in_the_low_precision_search():
    """An anomalous cell's squared distance can pass fp16's 65504; the search must not overflow."""
    g = torch.Generator().manual_seed(0)
    gallery = 3 * torch.randn(500, 112, generator=g)
    query = 3 * torch.randn(50, 112, generator=g)
    query[:5] += 30.0  # d^2 near 10^5
    exact = torch.cdist(query, gallery).min(1).values
    for precision in ("bf16", "fp16"):
        for device in ("cpu", "cuda"):
            dtype = match_dtype(precision, torch.device(device))
            if dtype is None:
                continue
            fast = nearest_cell_distance_lowp(query, gallery, dtype)
            assert torch.isfinite(fast).all(), (precision, device)
            assert ((fast - exact).abs() / exact).max() < 0.02, (precision, device)
    with pytest.raises(ValueError, match="bf16"):
        nearest_cell_distance_lowp(query, gallery, torch.float16)
