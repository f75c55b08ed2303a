"""Motion features: a fast object among slow ones is found, where it looks like them; scores are
causal, so a live camera computes what evaluate reports."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engine.calibrate import calibrate
from engine.decision import Thresholds
from engine.evaluate import score_clip
from engine.motion import FlowEstimator, cell_velocity
from engine.spade import Spade, preset

H, W = 96, 128
rng = np.random.default_rng(7)
# Smooth textures, as a camera sees them: pixel noise has no motion a flow can follow.
BACKGROUND = cv2.GaussianBlur((rng.random((H, W)) * 60 + 70).astype(np.uint8), (0, 0), 1.5)
WALKER = cv2.GaussianBlur((rng.random((20, 12)) * 100 + 140).astype(np.uint8), (0, 0), 1.0)  # every object's look


def clip(objects: list[tuple[int, int, float]], frames: int) -> list[np.ndarray]:
    """Frames of objects (row, start column, columns per frame) moving right and out of view."""
    out = []
    h, w = WALKER.shape
    for t in range(frames):
        f = BACKGROUND.copy()
        for row, col, speed in objects:
            c = int(round(col + speed * t))
            lo, hi = max(c, 0), min(c + w, W)
            if lo < hi:
                f[row : row + h, lo:hi] = WALKER[:, lo - c : hi - c]
        out.append(np.repeat(f[:, :, None], 3, axis=2))
    return out


@pytest.fixture(scope="module")
def walkers_model():
    """A bank of walkers moving 1-2 pixels per frame, anywhere on the path."""
    torch.set_num_threads(1)
    model = Spade(preset("camera", device="cpu", precision="fp32", batch_size=8, max_frames=400))
    assert model.config.motion_weight > 0, "the camera preset scores motion"
    train = [clip([(10 + 15 * (i % 4), 6 * i - 10, 1.0 + 0.25 * (i % 5)), (60 - 12 * (i % 3), 9 * i - 20, 1.5)], 40)
             for i in range(6)]
    pairs = ((i, f) for i, frames in enumerate(train) for f in frames)
    bank = model.build_bank(pairs, ["synthetic walkers"], progress=False)
    calibrate(bank, model.config)
    return model, bank, Thresholds.of_bank(bank, model.config.image_score)


def test_flow_gives_each_cell_its_velocity():
    speeds = []
    for shift in (2, 4, 6):
        a, b = clip([(30, 20, 0)], 1)[0], clip([(30, 20 + shift, 0)], 1)[0]
        v = cell_velocity(FlowEstimator()(a[:, :, 0], b[:, :, 0]), (H // 8, W // 8))
        speeds.append(v[0, 4:6, 3].mean().item())  # cells inside the object, before and after
        assert v[1, 4:6, 3].abs().max().item() < 0.5  # it moves right, not down
        assert v[:, 0].abs().mean().item() < 0.25 * speeds[-1]  # the empty top rows hardly move
    # DIS's fast preset underestimates a little; what matters is that speed orders the cells
    assert speeds[0] < speeds[1] < speeds[2] and speeds[2] > 4.0, speeds


def test_a_fast_object_that_looks_like_a_walker_is_flagged(walkers_model):
    model, bank, th = walkers_model
    fast = score_clip(model, bank, th, clip([(40, -10, 7.0)], 18))
    slow = score_clip(model, bank, th, clip([(40, -10, 1.5)], 18))
    # from the second frame on (the first has no predecessor, hence no motion)
    assert fast.matched_flags[3:].mean() > 0.8, (fast.matched, th)
    assert np.median(fast.matched[3:]) > 1.5 * np.median(slow.matched[3:]), (fast.matched, slow.matched)


def test_a_scene_of_walkers_alone_is_not_flagged(walkers_model):
    model, bank, th = walkers_model
    walkers = score_clip(model, bank, th, clip([(15, 10, 1.0), (45, 70, 1.75), (65, 40, 1.25)], 24))
    assert walkers.matched_flags.mean() <= 0.05, (walkers.matched, th)
    assert walkers.deployed_flags.mean() <= 0.05


def test_a_frame_score_does_not_change_when_later_frames_change(walkers_model):
    model, bank, th = walkers_model
    frames = clip([(15, 10, 1.0), (45, 70, 1.75)], 16)
    later = clip([(40, -60, 9.0)], 16)  # a fast object from frame 9 on
    changed = frames[:9] + later[9:]
    a, b = score_clip(model, bank, th, frames), score_clip(model, bank, th, changed)
    np.testing.assert_allclose(a.matched[:9], b.matched[:9], rtol=1e-6)
    np.testing.assert_allclose(a.deployed[:9], b.deployed[:9], rtol=1e-6)
    assert not np.allclose(a.matched[9:], b.matched[9:])  # the change itself is seen
