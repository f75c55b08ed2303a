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

from .backbones import Features
from .bank import ReferenceBank
from .features import resolve_precision
from .matcher import match_dtype
from .progress import Progress
from .spade import SpadeConfig, score_features

SINGLE_GROUP_FOLDS = 5


def holdout_folds(groups: torch.Tensor) -> torch.Tensor:
    """A fold id per bank frame: its clip, or contiguous fifths when there is only one clip."""
    groups = groups.long()
    if groups.unique().numel() >= 2:
        return groups
    n = groups.numel()
    return torch.arange(n) * SINGLE_GROUP_FOLDS // max(n, 1)


def holdout_scores(bank: ReferenceBank, config: SpadeConfig, max_eval: int = 240,
                   pixel_samples: int = 2_000_000, seed: int = 0,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image scores, gate scores, sampled pixel scores) of bank frames scored against the other
    folds, through the same scoring chain as every other frame (engine.spade.score_features)."""
    folds = holdout_folds(bank.groups)
    n = len(bank)
    if folds.unique().numel() < 2:
        raise ValueError("calibration needs at least two reference frames")
    eval_idx = torch.linspace(0, n - 1, min(max_eval, n)).round().long().unique()
    rng = np.random.default_rng(seed)
    image_scores, gate_scores, pixel_values = [], [], []
    per_frame_pixels = max(1, pixel_samples // len(eval_idx))
    device = bank.global_feats.device
    search_dtype = match_dtype(resolve_precision(config.precision, device), device)  # as the scoring path
    bar = Progress("calibration, held-out frames", len(eval_idx), enabled=progress)
    for fold in folds.unique().tolist():
        q = eval_idx[folds[eval_idx] == fold]
        ref = torch.nonzero(folds != fold).flatten()
        for start in range(0, q.numel(), config.batch_size):
            qb = q[start : start + config.batch_size]
            bar.update(len(qb))
            feats = Features(global_=bank.global_feats[qb].float(),
                             pyramid={lv: bank.pyramid[lv][qb].float() for lv in config.levels})
            res = score_features(config, feats, bank, maps="all", search_dtype=search_dtype, candidates=ref)
            flat = res.maps.reshape(len(qb), -1)
            image_scores.append(res.image_scores)
            gate_scores.append(res.gate_scores)
            take = rng.integers(0, flat.shape[1], size=(len(qb), min(per_frame_pixels, flat.shape[1])))
            pixel_values.append(np.take_along_axis(flat, take, 1).ravel())
    bar.close()
    return np.concatenate(image_scores), np.concatenate(gate_scores), np.concatenate(pixel_values)


def calibrate(bank: ReferenceBank, config: SpadeConfig, image_quantile: float | None = None,
              pixel_quantile: float | None = None, gate_quantile: float | None = None,
              progress: bool = False) -> dict:
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
    image, gate, pixel = holdout_scores(bank, config, progress=progress)
    thresholds = {
        "tau": float(np.quantile(image, iq)),
        "gate_tau": float(np.quantile(gate, gq)),
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
