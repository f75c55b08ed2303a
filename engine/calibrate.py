"""Thresholds from normal data only: quantiles of held-out scores, never an F1 optimum.

F1-optimal thresholds need anomalies; fitted on normal frames alone they collapse to "flag
everything". A quantile of scores on held-out normal frames bounds the false-alarm rate instead.
Held-out scores come straight from the bank's stored features: each clip (or, for a single
folder, each contiguous fifth) is scored against the rest of the bank, so no frame matches itself
or its near-duplicate neighbours.
"""
from __future__ import annotations

import numpy as np
import torch

from .bank import ReferenceBank
from .gate import knn
from .features import resolve_precision
from .matcher import anomaly_maps, match_dtype
from .spade import SpadeConfig, coarse_gate_scores

SINGLE_GROUP_FOLDS = 5


def holdout_folds(groups: torch.Tensor) -> torch.Tensor:
    """A fold id per bank frame: its clip, or contiguous fifths when there is only one clip."""
    groups = groups.long()
    if groups.unique().numel() >= 2:
        return groups
    n = groups.numel()
    return torch.arange(n) * SINGLE_GROUP_FOLDS // max(n, 1)


def holdout_scores(bank: ReferenceBank, config: SpadeConfig, max_eval: int = 240,
                   pixel_samples: int = 2_000_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image scores, gate scores, sampled pixel scores) of bank frames scored against the other folds.

    Gate scores are DN2 scores, or coarse cell-distance peaks with config.gate="coarse".
    """
    folds = holdout_folds(bank.groups)
    n = len(bank)
    if folds.unique().numel() < 2:
        raise ValueError("calibration needs at least two reference frames")
    eval_idx = torch.linspace(0, n - 1, min(max_eval, n)).round().long().unique()
    size = tuple(bank.meta["preprocess"]["size"])
    rng = np.random.default_rng(seed)
    image_scores, dn2_scores, pixel_values = [], [], []
    per_frame_pixels = max(1, pixel_samples // len(eval_idx))
    device = bank.global_feats.device
    search_dtype = match_dtype(resolve_precision(config.precision, device), device)  # as the scoring path
    for fold in folds.unique().tolist():
        q = eval_idx[folds[eval_idx] == fold]
        ref = torch.nonzero(folds != fold).flatten()
        if q.numel() == 0:
            continue
        k = min(max(config.k_image, config.k_pixel), ref.numel())
        for start in range(0, q.numel(), config.batch_size):
            qb = q[start : start + config.batch_size]
            d2, idx = knn(bank.global_feats[qb].float(), bank.global_feats[ref], k)
            neighbours = ref[idx]
            dn2 = d2[:, : config.k_image].mean(1).numpy()
            if config.gate == "coarse":
                gate = coarse_gate_scores({lv: bank.pyramid[lv][qb].float() for lv in config.levels[-1:]},
                                          bank.pyramid, neighbours, config.levels[-1], search_dtype).numpy()
            else:
                gate = dn2
            pyr = {lv: bank.pyramid[lv][qb].float() for lv in config.levels}
            maps = anomaly_maps(pyr, bank.pyramid, neighbours[:, : config.k_pixel], size,
                                sigma=config.sigma, search_dtype=search_dtype).numpy()
            flat = maps.reshape(len(qb), -1)
            image_scores.append(flat.max(1) if config.image_score == "map_max" else dn2)
            dn2_scores.append(gate)
            take = rng.integers(0, flat.shape[1], size=(len(qb), min(per_frame_pixels, flat.shape[1])))
            pixel_values.append(np.take_along_axis(flat, take, 1).ravel())
    return np.concatenate(image_scores), np.concatenate(dn2_scores), np.concatenate(pixel_values)


def calibrate(bank: ReferenceBank, config: SpadeConfig, image_quantile: float | None = None,
              pixel_quantile: float | None = None, gate_quantile: float | None = None) -> dict:
    """Set the thresholds in the bank from held-out normal scores and return them.

    tau: the image-score threshold (frame flagged); gate_tau: the DN2 threshold above which a
    frame is escalated to pixel matching. They differ when the image score is the map's peak:
    the gate then runs below tau's quantile so that it lets through what the map may flag.
    """
    iq = config.image_quantile if image_quantile is None else image_quantile
    pq = config.pixel_quantile if pixel_quantile is None else pixel_quantile
    gq = config.gate_quantile if gate_quantile is None else gate_quantile
    if config.image_score == "dn2":
        gq = iq
    image, dn2, pixel = holdout_scores(bank, config)
    thresholds = {
        "tau": float(np.quantile(image, iq)),
        "gate_tau": float(np.quantile(dn2, gq)),
        "gate_quantile": gq,
        "theta": float(np.quantile(pixel, pq)),
        "image_quantile": iq,
        "pixel_quantile": pq,
        "image_score": config.image_score,
        "k_image": config.k_image,
        "k_pixel": config.k_pixel,
        "holdout_frames": int(image.size),
        # Robust spread of normal scores, so a consumer can express scores in normal units.
        "image_median": float(np.median(image)),
        "image_iqr": float(np.subtract(*np.quantile(image, [0.75, 0.25]))),
    }
    bank.meta["thresholds"] = thresholds
    return thresholds
