"""Calibration on its own, on banks of made-up features: which frames are held out, and how
the thresholds follow the held-out scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.bank import ReferenceBank
from engine.calibrate import REFERENCE_ONLY, calibrate, holdout_folds, holdout_runs, holdout_scores
from engine.spade import preset

SIZE = (32, 48)


def _bank(groups: list[int], seed: int = 0) -> ReferenceBank:
    """Features of a camera-preset bank (s8 and s16 levels), random but fixed by the seed."""
    gen = torch.Generator().manual_seed(seed)
    n = len(groups)
    shape = {"s8": (8, SIZE[0] // 8, SIZE[1] // 8), "s16": (8, SIZE[0] // 16, SIZE[1] // 16)}
    return ReferenceBank(global_feats=torch.randn(n, 16, generator=gen).half(),
                         pyramid={lv: torch.randn(n, *s, generator=gen).half() for lv, s in shape.items()},
                         groups=torch.tensor(groups, dtype=torch.int32),
                         meta={"preprocess": {"size": list(SIZE), "resize": None}, "levels": ["s8", "s16"]})


def _config(**overrides):
    return preset("camera", device="cpu", precision="fp32", levels=("s8", "s16"), k_image=3, k_pixel=3,
                  batch_size=8, **overrides)


def test_each_clip_is_a_fold_and_a_single_clip_is_cut_in_fifths():
    assert holdout_folds(torch.tensor([0, 0, 1, 1, 2])).tolist() == [0, 0, 1, 1, 2]
    assert holdout_folds(torch.zeros(10, dtype=torch.int32)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_reference_only_rows_are_never_held_out():
    groups = torch.tensor([0] * 10 + [REFERENCE_ONLY] * 3)
    folds = holdout_folds(groups)
    assert folds[-3:].tolist() == [REFERENCE_ONLY] * 3 and folds[:10].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    runs = holdout_runs(folds, max_eval=100, length=2)
    held = torch.cat(runs).tolist()
    assert held and not set(held) & {10, 11, 12}
    assert {int(folds[i]) for i in held} == {0, 1, 2, 3, 4}  # every fold contributes


def test_runs_are_consecutive_frames_of_one_fold():
    folds = torch.tensor([0] * 30 + [1] * 30)
    for run in holdout_runs(folds, max_eval=40, length=8):
        assert run.numel() == 8 and torch.all(run.diff() == 1) and folds[run].unique().numel() == 1


def test_thresholds_are_quantiles_of_the_held_out_scores():
    bank = _bank([0] * 20 + [1] * 20 + [2] * 20)
    config = _config()
    held = holdout_scores(bank, config)
    low = calibrate(bank, config, image_quantile=0.5, pixel_quantile=0.5)
    assert low.tau == pytest.approx(float(np.quantile(held.smoothed(config.temporal_window), 0.5)), rel=1e-5)
    high = calibrate(bank, config, image_quantile=0.99, pixel_quantile=0.99)
    assert high.tau > low.tau and high.theta > low.theta
    assert bank.calibration == high  # stored in the bank


def test_too_few_frames_to_hold_out_is_one_clear_error():
    with pytest.raises(ValueError, match="at least two"):
        holdout_scores(_bank([REFERENCE_ONLY]), _config())
