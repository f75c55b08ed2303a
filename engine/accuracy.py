"""Detection metrics: image-level ROC AUC, pixel-level ROC AUC and per-region overlap (PRO).

PRO follows the MVTec AD evaluation (Bergmann et al.): each connected ground-truth
region counts equally, however many pixels it has, so a detector cannot score well
by finding only the large anomalies.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import roc_auc_score

# 8-connectivity: diagonal neighbours belong to the same region, as in the MVTec code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Quantile thresholds are estimated on at most this many values, so the sweep stays
# cheap on tens of millions of pixels.
_QUANTILE_SAMPLE = 1_000_000


def rocauc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of per-item scores.

    Parameters
    ----------
    labels : array-like of {0, 1}
        1 marks an anomalous item; any value > 0 counts as anomalous.
    scores : array-like of float
        Higher means more anomalous. Same length as ``labels``.

    Returns
    -------
    float
        ROC AUC, or ``nan`` when only one class is present (AUC is undefined there).
    """
    y_true = np.asarray(labels).reshape(-1) > 0
    y_score = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"labels has {y_true.size} items but scores has {y_score.size}")
    if not _has_both_classes(y_true):
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def pixel_rocauc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC over all pixels of all images, pooled.

    Parameters
    ----------
    masks : array-like, shape (N, H, W) or (H, W)
        Ground truth; any value > 0 (1 or 255) is anomalous.
    maps : array-like of float, same shape
        Anomaly maps at mask resolution.

    Returns
    -------
    float
        ROC AUC, or ``nan`` when every pixel has the same label.

    Notes
    -----
    Scores go to sklearn as float32 to halve the footprint; at ~70M pixels sklearn's
    sort and cumulative sums still need a few GB of RAM.
    """
    masks_arr, maps_arr = _as_stacks(masks, maps)
    # reshape(-1) is a view on contiguous input; only the dtype conversions copy.
    y_true = (masks_arr > 0).reshape(-1)
    y_score = np.asarray(maps_arr, dtype=np.float32).reshape(-1)
    if not _has_both_classes(y_true):
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def per_region_overlap_curve(
    masks: ArrayLike,
    maps: ArrayLike,
    num_thresholds: int = 200,
    spacing: Literal["linspace", "quantile"] = "linspace",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO and FPR for a sweep of thresholds, a pixel being anomalous when ``map > t``.

    Parameters
    ----------
    masks : array-like, shape (N, H, W) or (H, W)
        Ground truth; any value > 0 is anomalous. Regions are 8-connected components
        of each image, so regions in different images are never merged.
    maps : array-like of float, same shape
        Finite anomaly maps.
    num_thresholds : int
        Number of thresholds spread over the map range.
    spacing : {"linspace", "quantile"}
        Evenly over [min, max], or at quantiles of the map values (finer where the
        values are dense, robust to a few extreme pixels).

    Returns
    -------
    fprs, pros, thresholds : np.ndarray
        Ordered by decreasing threshold, so both ``fprs`` and ``pros`` are
        non-decreasing. The first point is ``t = max`` (nothing predicted, (0, 0));
        a final ``t = -inf`` point (everything predicted, (1, 1)) closes the curve.
        ``pros`` is all-nan when there are no regions, ``fprs`` when there are no
        normal pixels.
    """
    masks_arr, maps_arr = _as_stacks(masks, maps)
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    thresholds = _thresholds(maps_arr, num_thresholds, spacing)
    n_bins = thresholds.size + 1

    # Histogram every pixel by how many thresholds lie strictly below its value; the
    # count above threshold j is then a suffix sum, which replaces a loop over
    # thresholds x regions. Looping over images keeps temporaries one image large.
    normal_hist = np.zeros(n_bins, dtype=np.int64)
    region_hists: list[np.ndarray] = []
    for mask, amap in zip(masks_arr, maps_arr):
        anomalous = mask > 0
        bins = np.searchsorted(thresholds, amap, side="left")
        normal_hist += np.bincount(bins[~anomalous], minlength=n_bins)
        labelled, n_regions = ndimage.label(anomalous, structure=_EIGHT_CONNECTED)
        if n_regions == 0:
            continue
        flat_index = (labelled[anomalous].astype(np.int64) - 1) * n_bins + bins[anomalous]
        hist = np.bincount(flat_index, minlength=n_regions * n_bins)
        region_hists.append(hist.reshape(n_regions, n_bins))

    # Suffix sums: column 0 is the total, column j + 1 the count with value > thresholds[j].
    normal_above = np.cumsum(normal_hist[::-1])[::-1]
    n_normal = normal_above[0]
    fprs = normal_above[1:] / n_normal if n_normal else np.full(thresholds.size, np.nan)
    if region_hists:
        region_hist = np.concatenate(region_hists)
        region_above = np.cumsum(region_hist[:, ::-1], axis=1)[:, ::-1]
        pros = (region_above[:, 1:] / region_above[:, :1]).mean(axis=0)
    else:
        pros = np.full(thresholds.size, np.nan)

    # Reverse to decreasing thresholds and close the curve at (1, 1).
    fprs = np.append(fprs[::-1], 1.0 if n_normal else np.nan)
    pros = np.append(pros[::-1], 1.0 if region_hists else np.nan)
    thresholds = np.append(thresholds[::-1], -np.inf)
    return fprs, pros, thresholds


def pro_score(
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
    spacing: Literal["linspace", "quantile"] = "linspace",
) -> float:
    """Normalised area under the PRO-vs-FPR curve for FPR in [0, ``fpr_limit``].

    Parameters
    ----------
    masks, maps, num_thresholds, spacing
        As in :func:`per_region_overlap_curve`.
    fpr_limit : float
        Upper FPR bound of the integral, in (0, 1]. MVTec AD uses 0.3.

    Returns
    -------
    float
        Area divided by ``fpr_limit``: 1.0 for a perfect map, ``fpr_limit / 2`` for a
        map with no information (constant). ``nan`` when there are no ground-truth
        regions or no normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros, _ = per_region_overlap_curve(masks, maps, num_thresholds, spacing)
    if np.isnan(fprs).any() or np.isnan(pros).any():
        return float("nan")
    return _partial_area(fprs, pros, fpr_limit) / fpr_limit


def _partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a curve with non-decreasing ``x`` from x[0] to ``x_max``.

    The curve is cut at ``x_max`` by linear interpolation, so the result does not
    depend on where the sampled points happen to fall.
    """
    n_inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_inside], y[:n_inside]
    if n_inside < x.size and xs[-1] < x_max:
        # x[n_inside] > x_max strictly, so the slope is well defined.
        x0, x1, y0, y1 = x[n_inside - 1], x[n_inside], y[n_inside - 1], y[n_inside]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_cut)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def _thresholds(maps: np.ndarray, num: int, spacing: str) -> np.ndarray:
    """Ascending, unique thresholds whose largest is the map maximum."""
    lo, hi = float(maps.min()), float(maps.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("anomaly maps contain NaN or infinite values")
    if spacing == "linspace":
        return np.unique(np.linspace(lo, hi, num))
    if spacing == "quantile":
        flat = maps.reshape(-1)
        sample = flat[:: max(1, flat.size // _QUANTILE_SAMPLE)]
        quantiles = np.quantile(sample, np.linspace(0.0, 1.0, num))
        # The sample may miss the true maximum; without it the curve would not start at (0, 0).
        return np.unique(np.append(quantiles, hi))
    raise ValueError(f"spacing must be 'linspace' or 'quantile', got {spacing!r}")


def _as_stacks(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes match and promote a single (H, W) image to (1, H, W)."""
    masks_arr, maps_arr = np.asarray(masks), np.asarray(maps)
    if masks_arr.shape != maps_arr.shape:
        raise ValueError(f"masks shape {masks_arr.shape} differs from maps shape {maps_arr.shape}")
    if masks_arr.ndim == 2:
        masks_arr, maps_arr = masks_arr[None], maps_arr[None]
    if masks_arr.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (H, W) arrays, got shape {masks_arr.shape}")
    return masks_arr, maps_arr


def _has_both_classes(y_true: np.ndarray) -> bool:
    return bool(y_true.any()) and not bool(y_true.all())


class StreamingPixelAUC:
    """Pixel ROC AUC accumulated image by image in constant memory.

    Each score is counted in a bin of its float16 value (an order-preserving key of its bits),
    so the AUC is exact up to float16 resolution (3 significant digits, ties within a bin count
    half) instead of needing every pixel of every frame at once.
    """

    _BINS = 1 << 16

    def __init__(self):
        self._pos = np.zeros(self._BINS, dtype=np.int64)
        self._neg = np.zeros(self._BINS, dtype=np.int64)

    @staticmethod
    def _keys(scores: np.ndarray) -> np.ndarray:
        bits = np.asarray(scores, dtype=np.float16).reshape(-1).view(np.uint16)
        negative = bits >= 0x8000
        return np.where(negative, 0xFFFF - bits, bits + 0x8000).astype(np.int64)

    def add(self, mask: ArrayLike, scores: ArrayLike) -> None:
        y = (np.asarray(mask) > 0).reshape(-1)
        keys = self._keys(np.asarray(scores))
        if keys.size != y.size:
            raise ValueError(f"mask has {y.size} pixels but the map has {keys.size}")
        self._pos += np.bincount(keys[y], minlength=self._BINS)
        self._neg += np.bincount(keys[~y], minlength=self._BINS)

    def value(self) -> float:
        """ROC AUC, or nan when every pixel so far has the same label."""
        n_pos, n_neg = self._pos.sum(), self._neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self._neg) - self._neg  # negatives in strictly lower bins
        wins = (self._pos * (neg_below + 0.5 * self._neg)).sum()
        return float(wins / (n_pos * n_neg))


def stretches(labels: ArrayLike) -> list[tuple[int, int]]:
    """(start, end) index pairs, end exclusive, of the runs of anomalous items."""
    y = np.concatenate([[0], (np.asarray(labels).reshape(-1) > 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(y))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def operating_point(clips: list[tuple[ArrayLike, ArrayLike]]) -> dict:
    """What an operator sees at a fixed threshold, from (labels, flags) per clip.

    recall: anomalous frames flagged; false_alarm_rate: normal frames flagged; a stretch (a run
    of anomalous frames) counts as flagged when any of its frames is, after
    frames_to_flag = index of its first flagged frame from the stretch's start.
    """
    tp = fp = pos = neg = 0
    delays: list[int] = []
    total = 0
    for labels, flags in clips:
        y = np.asarray(labels).reshape(-1) > 0
        f = np.asarray(flags).reshape(-1).astype(bool)
        tp += int((y & f).sum())
        fp += int((~y & f).sum())
        pos += int(y.sum())
        neg += int((~y).sum())
        for start, end in stretches(y):
            total += 1
            hit = np.flatnonzero(f[start:end])
            if hit.size:
                delays.append(int(hit[0]))
    return {
        "recall": tp / pos if pos else float("nan"),
        "false_alarm_rate": fp / neg if neg else float("nan"),
        "stretches_flagged": len(delays),
        "stretches_total": total,
        "median_frames_to_flag": float(np.median(delays)) if delays else float("nan"),
        "max_frames_to_flag": int(max(delays)) if delays else None,
    }
