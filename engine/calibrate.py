"""Thresholds from normal data only: quantiles of held-out scores, never an F1 optimum.

F1-optimal thresholds need anomalies; fitted on normal frames alone they collapse to "flag
everything". A quantile of scores on held-out normal frames bounds the false-alarm rate instead.
Held-out scores come straight from the bank's stored features: each clip (or, for a single
folder, each contiguous fifth) is scored against the rest of the bank, so no frame matches itself
or its near-duplicate neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .backbones import Features
from .bank import Calibration, ReferenceBank
from .decision import CausalMean
from .features import resolve_precision
from .matcher import match_dtype
from .progress import Progress
from .spade import SpadeConfig, score_features

SINGLE_GROUP_FOLDS = 5


REFERENCE_ONLY = -1  # the group of rows never held out (engine/feedback.py): they only widen normal


def holdout_folds(groups: torch.Tensor) -> torch.Tensor:
    """A fold id per bank frame: its clip, or contiguous fifths when there is only one clip;
    REFERENCE_ONLY rows stay in the reference of every fold."""
    groups = groups.long()
    held = groups != REFERENCE_ONLY
    folds = torch.full_like(groups, REFERENCE_ONLY)
    if groups[held].unique().numel() >= 2:
        folds[held] = groups[held]
    else:
        n = int(held.sum())
        folds[held] = torch.arange(n) * SINGLE_GROUP_FOLDS // max(n, 1)
    return folds


@dataclass
class Holdout:
    """Scores of bank frames matched against the other folds, frame by frame."""

    image: np.ndarray  # raw image scores
    run: np.ndarray  # the run of consecutive frames each score belongs to
    gate: np.ndarray  # gate scores
    pixel: np.ndarray  # a sample of pixel scores

    def smoothed(self, window: int) -> np.ndarray:
        """Image scores smoothed along each run as a camera's stream is (engine.decision)."""
        mean = CausalMean(window)
        return np.array([mean(r, v) for r, v in zip(self.run.tolist(), self.image.tolist())])


def holdout_runs(folds: torch.Tensor, max_eval: int, length: int) -> list[torch.Tensor]:
    """Runs of `length` consecutive bank frames spread over every fold, about max_eval in all.

    Runs, not scattered frames, so that held-out scores can be smoothed over time as live
    scores are: tau then bounds the false alarms of the smoothed score that is flagged.
    """
    ids = [f for f in folds.unique().tolist() if f != REFERENCE_ONLY]
    per_fold = max(length, max_eval // len(ids))
    runs = []
    for fold in ids:
        idx = torch.nonzero(folds == fold).flatten()
        count = max(1, min(per_fold, idx.numel()) // length)
        starts = torch.linspace(0, max(idx.numel() - length, 0), count).round().long().unique()
        runs += [idx[s : s + length] for s in starts.tolist()]
    return runs


def holdout_scores(bank: ReferenceBank, config: SpadeConfig, max_eval: int = 240,
                   pixel_samples: int = 2_000_000, seed: int = 0, progress: bool = False) -> Holdout:
    """Runs of bank frames scored against the other folds, through the same scoring chain as
    every other frame (engine.spade.score_features)."""
    folds = holdout_folds(bank.groups)
    if (folds.unique() != REFERENCE_ONLY).sum() < 2:
        raise ValueError("calibration needs at least two reference frames")
    runs = holdout_runs(folds, max_eval, length=max(8, 3 * config.temporal_window))
    total = sum(r.numel() for r in runs)
    rng = np.random.default_rng(seed)
    image: list[np.ndarray] = []
    run_of: list[np.ndarray] = []
    gate: list[np.ndarray] = []
    pixel: list[np.ndarray] = []
    per_frame_pixels = max(1, pixel_samples // total)
    device = bank.global_feats.device
    search_dtype = match_dtype(resolve_precision(config.precision, device), device)  # as the scoring path
    bar = Progress("calibration, held-out frames", total, enabled=progress)
    for r, frames in enumerate(runs):
        ref = torch.nonzero(folds != folds[frames[0]]).flatten()
        for start in range(0, frames.numel(), config.batch_size):
            qb = frames[start : start + config.batch_size]
            bar.update(len(qb))
            feats = Features(global_=bank.global_feats[qb].float(),
                             pyramid={lv: bank.pyramid[lv][qb].float() for lv in config.levels})
            res = score_features(config, feats, bank, maps="all", search_dtype=search_dtype, candidates=ref)
            assert res.maps is not None and res.gate_scores is not None  # maps="all"
            flat = res.maps.reshape(len(qb), -1)
            image.append(res.image_scores)
            run_of.append(np.full(len(qb), r))
            gate.append(res.gate_scores)
            take = rng.integers(0, flat.shape[1], size=(len(qb), min(per_frame_pixels, flat.shape[1])))
            pixel.append(np.take_along_axis(flat, take, 1).ravel())
    bar.close()
    return Holdout(np.concatenate(image), np.concatenate(run_of), np.concatenate(gate), np.concatenate(pixel))


def calibrate(bank: ReferenceBank, config: SpadeConfig, image_quantile: float | None = None,
              pixel_quantile: float | None = None, gate_quantile: float | None = None,
              progress: bool = False) -> Calibration:
    """Set the bank's calibration from held-out normal scores and return it.

    tau: the threshold of the smoothed image score (frame flagged); gate_tau: the gate score
    above which a frame is escalated to pixel matching. They differ when the image score comes
    from the map: the gate then runs below tau's quantile so that it lets through what the map
    may flag. image_median is the raw score an unescalated frame is given (engine.decision).
    """
    iq = config.image_quantile if image_quantile is None else image_quantile
    pq = config.pixel_quantile if pixel_quantile is None else pixel_quantile
    gq = config.gate_quantile if gate_quantile is None else gate_quantile
    if config.image_score == "dn2":
        gq = iq
    held = holdout_scores(bank, config, progress=progress)
    image = held.image
    calibration = Calibration(
        tau=float(np.quantile(held.smoothed(config.temporal_window), iq)),
        gate_tau=float(np.quantile(held.gate, gq)),
        gate_quantile=float(gq),
        theta=float(np.quantile(held.pixel, pq)),
        image_quantile=float(iq),
        pixel_quantile=float(pq),
        image_score=config.image_score,
        k_image=int(config.k_image),
        k_pixel=int(config.k_pixel),
        holdout_frames=int(image.size),
        # Robust spread of normal scores, so a consumer can express scores in normal units.
        image_median=float(np.median(image)),
        image_iqr=float(np.subtract(*np.quantile(image, [0.75, 0.25]))),
    )
    bank.calibration = calibration
    return calibration
