"""The frame decision shared by evaluate and the live engine: thresholds and causal smoothing."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from engine.bank import Calibration
from engine.decision import FrameScorer, Thresholds
from engine.errors import BankError


def _bank(**thresholds):
    return SimpleNamespace(calibration=Calibration(**thresholds) if thresholds else None)


CALIBRATED = dict(tau=10.0, gate_tau=4.0, theta=7.0, image_median=2.0)


def test_a_scene_override_moves_the_flag_and_for_dn2_scores_the_gate_too():
    peak = Thresholds.of_bank(_bank(**CALIBRATED), "map_max", tau=12.0)
    assert (peak.tau, peak.gate_tau, peak.theta, peak.normal_score) == (12.0, 4.0, 7.0, 2.0)
    dn2 = Thresholds.of_bank(_bank(**CALIBRATED), "dn2", tau=12.0, theta=9.0)
    assert (dn2.tau, dn2.gate_tau, dn2.theta) == (12.0, 12.0, 9.0)


def test_an_uncalibrated_bank_is_one_line_naming_the_fix():
    with pytest.raises(BankError, match="reference calibrate b.bank"):
        Thresholds.of_bank(_bank(), "map_max", where="b.bank")


def test_unescalated_frames_score_as_normal_and_smoothing_is_causal_per_stream():
    th = Thresholds.of_bank(_bank(**CALIBRATED), "map_max")
    scorer = FrameScorer(th, window=2, map_scored=True)
    assert scorer("a", math.nan) == (2.0, False)  # not escalated: the scene's normal score
    assert scorer("a", 20.0) == (11.0, True)  # mean of the last two frames of stream a
    assert scorer("b", 8.0) == (8.0, False)  # streams do not mix
    assert scorer("a", 4.0) == (12.0, True)
    scorer.restart("a")
    assert scorer("a", 4.0) == (4.0, False)
