"""Metrics against hand-computed values; each expected number is derived in a comment."""

import math

import numpy as np
import pytest
from scipy import ndimage

from engine.accuracy import per_region_overlap_curve, pixel_rocauc, pro_score, rocauc

# ---------------------------------------------------------------- rocauc


def test_rocauc_hand_ranking():
    # Positive scores 0.9, 0.7, 0.4 vs negatives 0.8, 0.3, 0.2:
    # 0.9 beats 3, 0.7 beats 2, 0.4 beats 2 -> 7 of 9 pairs ranked right.
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.7, 0.4, 0.8, 0.3, 0.2]
    assert rocauc(labels, scores) == pytest.approx(7 / 9)


def test_rocauc_counts_ties_as_half():
    # Pairs (pos, neg): (0.5, 0.5) tie -> 0.5, (0.5, 0.1), (0.9, 0.5), (0.9, 0.1) -> 1 each.
    assert rocauc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_rocauc_single_class_is_nan(labels):
    assert math.isnan(rocauc(labels, [0.1, 0.2, 0.3]))


def test_rocauc_length_mismatch_raises():
    with pytest.raises(ValueError):
        rocauc([0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------- pixel_rocauc


def _block_masks() -> np.ndarray:
    masks = np.zeros((3, 8, 8), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1
    masks[2, 6:8, 0:3] = 1
    return masks


def test_pixel_rocauc_perfect_and_inverted():
    masks = _block_masks()
    assert pixel_rocauc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pixel_rocauc(masks, 1.0 - masks.astype(np.float32)) == pytest.approx(0.0)


def test_pixel_rocauc_hand_case_with_255_masks():
    # Pooled over both images: positives 0.9, 0.3; negatives 0.2, 0.4.
    # 0.9 beats both, 0.3 beats only 0.2 -> 3 of 4 pairs.
    masks = np.array([[[255, 0]], [[0, 255]]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.2]], [[0.4, 0.3]]])
    assert pixel_rocauc(masks, maps) == pytest.approx(0.75)


def test_pixel_rocauc_all_normal_is_nan():
    assert math.isnan(pixel_rocauc(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4)))


def test_pixel_rocauc_shape_mismatch_raises():
    with pytest.raises(ValueError):
        pixel_rocauc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


# ---------------------------------------------------------------- PRO


def test_pro_perfect_map_is_one():
    rng = np.random.default_rng(0)
    masks = _block_masks()
    # Every anomalous pixel (>= 1.0) outscores every normal one (< 0.4).
    maps = masks + rng.uniform(0.0, 0.4, size=masks.shape)
    assert pro_score(masks, maps) == pytest.approx(1.0)


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """9x13 image (117 px): a 1-px region and a 4x4 region, 100 normal pixels."""
    mask = np.zeros((9, 13), dtype=np.uint8)
    mask[0, 0] = 1  # small region
    mask[4:8, 4:8] = 1  # big region, 16 px, not touching the small one
    amap = np.zeros((9, 13))
    amap[4:8, 4:8] = 1.0
    return mask, amap


def test_pro_weights_regions_equally_not_by_pixels():
    # Small region scores 0 (the minimum), big region 1, normals 0.5. For every
    # threshold in [0.5, 1) only the big region fires: FPR 0, PRO = mean(0, 1) = 0.5.
    # Below 0.5 FPR jumps to 1. Area over [0, 0.3] = 0.3 * 0.5 -> normalised 0.5.
    # A pixel-weighted overlap would give 16/17 = 0.94.
    mask, amap = _two_region_case()
    amap[mask == 0] = 0.5
    assert pro_score(mask, amap) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("spacing", ["linspace", "quantile"])
def test_pro_hand_curve_with_false_positives(spacing):
    # Big region 1.0, ten normals 0.9, small region 0.8, other 90 normals 0.0.
    # t in [0.9, 1): big only        -> (FPR 0,   PRO 0.5)
    # t in [0.8, 0.9): + 10 normals  -> (FPR 0.1, PRO 0.5)
    # t in [0, 0.8): + small region  -> (FPR 0.1, PRO 1.0), then (1, 1) at t = -inf.
    # Area over [0, 0.3] = 0.1 * 0.5 + 0.2 * 1.0 = 0.25 -> normalised 0.25 / 0.3 = 5/6.
    mask, amap = _two_region_case()
    amap[8, :10] = 0.9
    amap[0, 0] = 0.8
    assert pro_score(mask, amap, spacing=spacing) == pytest.approx(5 / 6, abs=1e-9)


def test_pro_constant_map_is_chance_level():
    # No threshold separates anything: the curve is (0, 0) -> (1, 1), the diagonal,
    # whose area over [0, L] is L^2 / 2, i.e. L / 2 once normalised.
    masks = _block_masks()
    constant = np.full(masks.shape, 0.7)
    assert pro_score(masks, constant) == pytest.approx(0.15)
    assert pro_score(masks, constant, fpr_limit=0.1) == pytest.approx(0.05)


def test_pro_uses_8_connectivity():
    # A diagonal chain of 3 px is ONE region under 8-connectivity; only its first
    # pixel is detected -> overlap 1/3. A separate 2x2 region is fully detected.
    # Missed pixels score 0, below the normals' 0.5, so FPR stays 0 down to t = 0.5.
    # 8-conn: mean(1/3, 1) = 2/3.  4-conn would see 4 regions: mean(1, 0, 0, 1) = 0.5.
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1
    mask[5:7, 5:7] = 1
    amap = np.where(mask > 0, 0.0, 0.5)
    amap[0, 0] = 1.0
    amap[5:7, 5:7] = 1.0
    assert pro_score(mask, amap) == pytest.approx(2 / 3)


def test_pro_does_not_merge_regions_across_images():
    # Image 0: a 1-px region, detected. Image 1: a 4-px region at the same place, missed.
    # Normals (0.5) outscore the missed region (0), so FPR stays 0 down to t = 0.5.
    # Separate regions: mean(1, 0) = 0.5. Merged into one: 1/5 = 0.2.
    masks = np.zeros((2, 6, 6), dtype=np.uint8)
    masks[0, 1, 1] = 1
    masks[1, 1:3, 1:3] = 1
    maps = np.where(masks > 0, 0.0, 0.5)
    maps[0, 1, 1] = 1.0
    assert pro_score(masks, maps) == pytest.approx(0.5)


def test_pro_no_regions_is_nan():
    assert math.isnan(pro_score(np.zeros((2, 5, 5)), np.random.rand(2, 5, 5)))


def test_pro_rejects_nan_maps():
    maps = np.zeros((4, 4))
    maps[0, 0] = np.nan
    with pytest.raises(ValueError):
        pro_score(np.eye(4), maps)


def _naive_curve(masks, maps, thresholds):
    """Direct loop over thresholds x images x regions, as the definition reads."""
    fprs, pros = [], []
    normal = masks == 0
    for t in thresholds:
        predicted = maps > t
        overlaps = []
        for mask, pred in zip(masks, predicted):
            labelled, n = ndimage.label(mask > 0, structure=np.ones((3, 3)))
            for region in range(1, n + 1):
                pixels = labelled == region
                overlaps.append(pred[pixels].sum() / pixels.sum())
        fprs.append(predicted[normal].sum() / normal.sum())
        pros.append(np.mean(overlaps))
    return np.array(fprs), np.array(pros)


def test_curve_matches_naive_definition_on_random_data():
    rng = np.random.default_rng(1)
    masks = (ndimage.uniform_filter(rng.random((4, 16, 16)), size=(1, 3, 3)) > 0.6).astype(np.uint8)
    maps = rng.random((4, 16, 16)) + 0.5 * masks
    fprs, pros, thresholds = per_region_overlap_curve(masks, maps, num_thresholds=25)
    assert thresholds[-1] == -np.inf and (fprs[-1], pros[-1]) == (1.0, 1.0)
    assert (fprs[0], pros[0]) == (0.0, 0.0)  # t = max: nothing predicted
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)
    naive_fprs, naive_pros = _naive_curve(masks, maps, thresholds[:-1])
    np.testing.assert_allclose(fprs[:-1], naive_fprs)
    np.testing.assert_allclose(pros[:-1], naive_pros)
