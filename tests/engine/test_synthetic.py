"""Synthetic scenes: readable as ped2, exact labels and masks, decodable videos, deterministic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.datasets import VideoDataset, detect_video_layout, iter_video_frames
from engine.datasets.synthetic import ANOMALY_KINDS, make_scene
from engine.errors import ConfigError, DataError

SMALL = dict(size=(120, 160), n_train_clips=2, train_len=12, n_test_clips=3, test_len=40, fps=10)


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp('scene') / 'synth', seed=3, **SMALL)


@pytest.fixture(scope='module')
def dataset(scene):
    ds = VideoDataset(scene.root)
    (name,) = ds.scenes()
    return ds, ds.train_clips(name), ds.test_clips(name)


def test_layout_and_counts(scene, dataset):
    ds, train, test = dataset
    assert detect_video_layout(scene.root) == 'ped2' and ds.layout == 'ped2'
    assert [len(c) for c in train] == [12, 12] and [len(c) for c in test] == [40, 40, 40]
    frame = next(iter(test[0].frames()))
    assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
    assert scene.n_train_frames == 24 and scene.n_test_frames == 120
    assert scene.n_anomalous_frames == sum(int(c.labels.sum()) for c in test)
    assert {e.kind for e in scene.events} == set(ANOMALY_KINDS)


def test_labels_and_masks_agree(dataset):
    _, _, test = dataset
    for clip in test:
        labels = clip.labels
        assert set(np.unique(labels)) == {0, 1}, clip.name
        assert labels[0] == 0 and labels[-1] == 0, 'clips start and end normal'
        for i, label in enumerate(labels):
            mask = clip.mask(i)
            assert mask.shape == (120, 160) and mask.max() <= 1
            assert bool(mask.any()) == bool(label), (clip.name, i)


def test_anomalous_pixels_differ_from_background(dataset):
    _, train, test = dataset
    # walkers move on, so the per-pixel median of normal frames is the empty scene
    background = np.median(np.stack([f for c in train for f in c.frames()]), axis=0)
    for clip in test:
        frames = list(clip.frames())
        for i in np.flatnonzero(clip.labels)[::4]:
            mask = clip.mask(i).astype(bool)
            diff = np.abs(frames[i].astype(np.float32) - background).mean(axis=2)
            assert diff[mask].mean() > 15, (clip.name, i)
            assert diff[mask].mean() > 3 * diff[~mask].mean(), (clip.name, i)


def test_videos_decode(scene, dataset):
    _, train, test = dataset
    assert len(scene.train_videos) == 2 and len(scene.test_videos) == 3
    for video, clip in zip(scene.train_videos + scene.test_videos, train + test):
        assert video.suffix == '.mp4' and video.is_file()
        decoded = list(iter_video_frames(video))
        assert len(decoded) == len(clip) and decoded[0].shape == (120, 160, 3)
        jpeg = next(iter(clip.frames()))
        assert np.abs(decoded[0].astype(np.int16) - jpeg).mean() < 6  # same content, high quality


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file() and p.parent.name != 'videos'
            and p.name != 'scene.json'}


def test_same_seed_same_frames(scene, tmp_path):
    again = make_scene(tmp_path / 'again', seed=3, write_videos=False, **SMALL)
    assert files_of(scene.root) == files_of(again.root)
    other = make_scene(tmp_path / 'other', seed=4, write_videos=False, **SMALL)
    assert files_of(scene.root) != files_of(other.root)


def test_bad_arguments(scene, tmp_path):
    with pytest.raises(DataError, match='already holds'):
        make_scene(scene.root, **SMALL)
    with pytest.raises(ConfigError):
        make_scene(tmp_path / 'odd', size=(121, 160))
    with pytest.raises(ConfigError):
        make_scene(tmp_path / 'short', test_len=5)
