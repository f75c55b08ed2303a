"""The small synthetic scene and bank the measuring scripts share (the tests' scene, longer clips)."""
from __future__ import annotations

from pathlib import Path

from engine.datasets.synthetic import make_scene
from engine.reference import build_reference
from engine.spade import Spade, preset


def scene_and_bank(work: Path, test_len: int):
    """(scene, bank path): 120x160 frames, two test clips of test_len frames, a camera-preset bank."""
    scene = make_scene(work / "scene", seed=3, size=(120, 160), n_train_clips=3, train_len=40, n_test_clips=2,
                       test_len=test_len)
    bank = work / "plaza.bank"
    spade = Spade(preset("camera", device="cpu", batch_size=8, max_frames=60))
    build_reference(spade, [scene.root / "training" / "frames"], "plaza", progress=False).save(bank)
    return scene, bank
