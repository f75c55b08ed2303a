""""Not an anomaly": frames an operator marked normal join the scene's reference bank.

The bank is a set of normal frames, so a false alarm is fixed by adding it: the next such
frame finds a near-identical neighbour and scores low. No retraining. The added frames are
reference only (calibrate.REFERENCE_ONLY): calibration never holds them out, so they widen what is
normal without being scored as held-out frames themselves, and the thresholds of everything
else barely move.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bank import ReferenceBank
from .calibrate import REFERENCE_ONLY, calibrate
from .preprocess import encode_jpeg
from .spade import REFERENCE_JPEG_QUALITY, Spade


@dataclass(frozen=True)
class FeedbackFrame:
    """A frame as the engine scored it (model-input size, RGB) and the frame before it, which
    its temporal channels compare against (None: scored as a stream's first frame)."""

    image: np.ndarray
    previous: np.ndarray | None = None


def frame_features(model: Spade, bank: ReferenceBank, frames: list[FeedbackFrame]):
    """Features of each frame with its own predecessor, in one backbone pass."""
    images, streams, rows = [], [], []
    for i, f in enumerate(frames):
        if f.previous is not None:
            images.append(f.previous)
            streams.append(i)
        images.append(f.image)
        streams.append(i)
        rows.append(len(images) - 1)
    feats = model.features(images, model.bank_preprocess(bank), streams=streams, context={})
    sel = torch.tensor(rows, device=feats.global_.device)
    feats.global_ = feats.global_[sel]
    feats.pyramid = {lv: v[sel] for lv, v in feats.pyramid.items()}
    return feats


def raw_scores(model: Spade, bank: ReferenceBank, frames: list[FeedbackFrame]) -> list[float]:
    """Each frame's image score against `bank`, before smoothing (what tau's flag compares)."""
    res = model.score_features(frame_features(model, bank, frames), bank, maps="all")
    return [float(s) for s in res.image_scores]


def add_normal_frames(model: Spade, bank: ReferenceBank, frames: list[FeedbackFrame],
                      recalibrate: bool = True) -> ReferenceBank:
    """A new bank: `bank` plus `frames`, within the bank's max_frames budget, recalibrated.

    Over budget, the oldest reference frames are thinned by the bank's subsampling (k-center
    keeps the rare appearances); the new frames are always kept.
    """
    if not frames:
        raise ValueError("no frames to add")
    feats = frame_features(model, bank, frames)
    budget = max(len(frames), model.config.max_frames)
    keep = torch.arange(len(bank))
    if len(bank) + len(frames) > budget:
        keep = model.subsample(bank.global_feats.float().cpu(), budget - len(frames))
    old = bank.to("cpu").subset(keep)
    new = ReferenceBank(
        global_feats=torch.cat([old.global_feats, feats.global_.half().cpu()]),
        pyramid={lv: torch.cat([old.pyramid[lv], feats.pyramid[lv].half().cpu()]) for lv in old.pyramid},
        groups=torch.cat([old.groups, torch.full((len(frames),), REFERENCE_ONLY, dtype=torch.int32)]),
        meta=old.meta,
        images=(old.images or [b""] * len(old)) + [encode_jpeg(f.image, REFERENCE_JPEG_QUALITY) for f in frames],
    )
    if recalibrate:
        calibrate(new, model.config)
    return new
