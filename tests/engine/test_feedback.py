""""Not an anomaly" on a real bank: the marked frame becomes normal, the rest stays as it was,
and every change is a version that can be listed and undone."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine.bank import ReferenceBank
from engine.datasets import iter_video_frames
from engine.feedback import FeedbackFrame, add_normal_frames, raw_scores
from engine.spade import Spade
from engine.versions import BankHistory


@pytest.fixture(scope="module")
def marked(scene, scene_bank):
    """The bank, its model, and the most anomalous frame of a test clip with its predecessor."""
    bank = ReferenceBank.load(scene_bank)
    model = Spade.for_bank(bank, device="cpu")
    clip = scene.test_clips[0]
    event = next(e for e in scene.events if e.clip == clip)
    frames = list(iter_video_frames(scene.test_videos[0]))
    middle = (event.first_frame + event.last_frame) // 2
    prep = bank.preprocess
    still = FeedbackFrame(prep.frame(frames[middle]), prep.frame(frames[middle - 1]))
    normal = FeedbackFrame(prep.frame(frames[2]), prep.frame(frames[1]))
    return bank, model, still, normal


def test_a_frame_marked_normal_scores_below_tau_and_the_rest_barely_moves(marked):
    bank, model, still, normal = marked
    tau = bank.calibration.tau
    [before] = raw_scores(model, bank, [still])
    assert before > tau  # flagged: worth marking
    new = add_normal_frames(model, bank, [still])
    [after] = raw_scores(model, new, [still])
    assert after < new.calibration.tau and after < 0.5 * before
    assert len(new) == min(len(bank) + 1, model.config.max_frames)
    # The marked frame is reference only: the thresholds, calibrated on the other frames, hold.
    assert new.calibration.tau == pytest.approx(tau, rel=0.1)
    assert raw_scores(model, new, [normal])[0] == pytest.approx(raw_scores(model, bank, [normal])[0], rel=0.1)
    assert new.image(len(new) - 1)[:2] == b"\xff\xd8"  # its JPEG, for reviews of what matches it


def test_every_change_is_a_version_that_can_be_reverted(marked, tmp_path, scene_bank):
    bank, model, still, _ = marked
    live = tmp_path / "plaza.bank"
    shutil.copyfile(scene_bank, live)
    history = BankHistory(live)
    assert history.current() == 1
    new = add_normal_frames(model, bank, [still], recalibrate=False)
    assert history.commit(new, "not_anomaly", "ana", {"event_id": "cam-1-5"}) == 2
    loaded = ReferenceBank.load(live)
    assert loaded.version == 2 and np.array_equal(loaded.global_feats.numpy(), new.global_feats.numpy())
    assert history.revert(1, "ben") == 3
    reverted = ReferenceBank.load(live)
    assert reverted.version == 3 and np.array_equal(reverted.global_feats.numpy(), bank.global_feats.numpy())
    assert [(v.number, v.action, v.user) for v in history.versions()] == [
        (1, "built", ""), (2, "not_anomaly", "ana"), (3, "revert", "ben")]
    assert history.versions()[2].detail == {"to": 1}
