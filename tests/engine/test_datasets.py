"""Readers for image folders, videos, MVTec AD and the two video-anomaly layouts."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.datasets import (
    Clip,
    DecodeStats,
    TestClip,
    VideoDataset,
    detect_video_layout,
    find_mvtec_categories,
    iter_source_frames,
    iter_video_frames,
    read_image,
)
from engine.datasets import video as datasets_video
from engine.errors import DataError

H, W = 24, 32
SHARED_DATA = Path(__file__).resolve().parents[3] / 'shared' / 'data'


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
    return path


def write_mask(path: Path, mask01: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (mask01 > 0).astype(np.uint8) * 255)
    return path


def solid(value: int, h: int = H, w: int = W) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return datasets_video.write_video(frames, path, fps)


# ---------------------------------------------------------------- images, videos, sources

def test_read_image_is_rgb(tmp_path):
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    img = read_image(write_rgb(tmp_path / 'red.png', red))
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert img[..., 0].min() == 255 and img[..., 1:].max() == 0

    grey = tmp_path / 'grey.png'
    cv2.imwrite(str(grey), np.full((H, W), 77, np.uint8))
    assert read_image(grey).shape == (H, W, 3)


def test_read_image_errors(tmp_path):
    with pytest.raises(DataError, match='missing.png'):
        read_image(tmp_path / 'missing.png')
    junk = tmp_path / 'junk.jpg'
    junk.write_text('not an image')
    with pytest.raises(DataError, match='junk.jpg'):
        read_image(junk)


def test_iter_video_frames(tmp_path):
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 220
    video = write_video(tmp_path / 'v.avi', [red] * 5)
    stats = DecodeStats()
    frames = list(iter_video_frames(video, stats))
    assert len(frames) == 5 and stats.decoded == 5 and stats.skipped == 0
    assert frames[0].shape == (H, W, 3) and frames[0].dtype == np.uint8
    assert frames[0][..., 0].mean() > 180 and frames[0][..., 1:].mean() < 40

    with pytest.raises(DataError, match='nope.avi'):
        iter_video_frames(tmp_path / 'nope.avi')  # fails at the call, not on first next()
    junk = tmp_path / 'junk.mp4'
    junk.write_bytes(b'\x00' * 100)
    with pytest.raises(DataError, match='junk.mp4'):
        iter_video_frames(junk)


def test_damaged_video_still_decodes(tmp_path):
    rng = np.random.default_rng(0)
    video = write_video(tmp_path / 'v.avi',
                        [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(20)])
    data = bytearray(video.read_bytes())
    for offset in range(2000, len(data) - 2000, 3000):  # scribble over packet payloads
        data[offset:offset + 400] = rng.integers(0, 255, 400, dtype=np.uint8).tobytes()
    video.write_bytes(bytes(data))
    stats = DecodeStats()
    frames = list(iter_video_frames(video, stats))  # must not raise
    assert len(frames) == stats.decoded > 0


def test_iter_source_frames(tmp_path):
    src = tmp_path / 'src'
    write_rgb(src / '10.png', solid(100))
    write_rgb(src / '2.png', solid(20))   # natural order: 2 before 10
    write_rgb(src / 'sub' / '1.png', solid(200))
    write_video(src / 'sub' / 'clip.avi', [solid(128)] * 3)
    (src / 'notes.txt').write_text('ignored')

    means = [round(f.mean()) for f in iter_source_frames(src)]
    assert means[:3] == [20, 100, 200] and len(means) == 6
    assert len(list(iter_source_frames(src, recursive=False))) == 2
    assert len(list(iter_source_frames(src / 'sub' / 'clip.avi'))) == 3
    assert len(list(iter_source_frames(src / '2.png'))) == 1

    (tmp_path / 'empty').mkdir()
    for bad in (tmp_path / 'empty', tmp_path / 'missing', src / 'notes.txt'):
        with pytest.raises(DataError):
            iter_source_frames(bad)


# ---------------------------------------------------------------- MVTec AD

def make_mvtec_category(root: Path) -> Path:
    for i in range(3):
        write_rgb(root / 'train' / 'good' / f'{i:03d}.png', solid(50 + i))
    write_rgb(root / 'test' / 'good' / '000.png', solid(60))
    for i in range(2):
        write_rgb(root / 'test' / 'scratch' / f'{i:03d}.png', solid(90))
    mask = np.zeros((H // 2, W // 2), np.uint8)  # half size: must come back at the image's size
    mask[2:5, 3:8] = 1
    write_mask(root / 'ground_truth' / 'scratch' / '000_mask.png', mask)
    return root  # test/scratch/001.png has no mask file: an empty mask


def test_mvtec_multi_category(tmp_path):
    make_mvtec_category(tmp_path / 'tile')
    make_mvtec_category(tmp_path / 'wood')
    (tmp_path / 'docs').mkdir()
    cats = find_mvtec_categories(tmp_path)
    assert [c.name for c in cats] == ['tile', 'wood']
    cat = cats[0]
    assert len(cat.train_paths) == 3 and cat.train_paths[0].name == '000.png'
    assert [(s.defect, s.label) for s in cat.test_samples] == [
        ('good', 0), ('scratch', 1), ('scratch', 1)]
    good, with_mask, without_mask = cat.test_samples
    assert with_mask.mask_path.name == '000_mask.png' and without_mask.mask_path is None

    mask = cat.load_mask(with_mask)
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == 3 * 2 * 5 * 2
    assert not cat.load_mask(without_mask).any() and cat.load_mask(without_mask).shape == (H, W)
    assert not cat.load_mask(good).any()


def test_mvtec_category_root_and_errors(tmp_path):
    root = make_mvtec_category(tmp_path / 'tile')
    cats = find_mvtec_categories(root)
    assert len(cats) == 1 and cats[0].name == 'tile' and len(cats[0].test_samples) == 3
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='train/good'):
        find_mvtec_categories(tmp_path / 'empty')
    with pytest.raises(DataError, match='missing'):
        find_mvtec_categories(tmp_path / 'missing')


# ---------------------------------------------------------------- video anomaly layouts

def make_ped2(root: Path) -> Path:
    for clip, n in (('01', 3), ('02', 2)):
        for t in range(n):
            write_rgb(root / 'training' / 'frames' / clip / f'{t:03d}.jpg', solid(100))
    labels = {'01': [0, 1, 1, 0], '02': [0, 0, 1]}
    for clip, lab in labels.items():
        for t in range(len(lab)):
            write_rgb(root / 'testing' / 'frames' / clip / f'{t:03d}.jpg', solid(100))
        (root / 'testing' / 'frame_labels').mkdir(parents=True, exist_ok=True)
        np.save(root / 'testing' / 'frame_labels' / f'{clip}.npy', np.array(lab, np.uint8))
    for t in (1, 2):  # clip 01 has masks, only for its anomalous frames; clip 02 has none
        mask = np.zeros((H, W), np.uint8)
        mask[4:10, 5:9] = 1
        write_mask(root / 'testing' / 'pixel_masks' / '01' / f'{t:03d}.png', mask)
    return root


def test_ped2_layout(tmp_path):
    root = make_ped2(tmp_path / 'my ped2!')
    assert detect_video_layout(root) == 'ped2'
    ds = VideoDataset(root)
    assert ds.layout == 'ped2' and ds.scenes() == ['my_ped2']
    train = ds.train_clips('my_ped2')
    assert [(c.name, len(c)) for c in train] == [('01', 3), ('02', 2)]
    frames = list(train[0].frames())
    assert len(frames) == 3 and frames[0].shape == (H, W, 3)

    test = ds.test_clips('my_ped2')
    assert [c.name for c in test] == ['01', '02'] and all(isinstance(c, TestClip) for c in test)
    c1, c2 = test
    assert c1.labels.dtype == np.uint8 and c1.labels.tolist() == [0, 1, 1, 0]
    assert c1.mask(0).shape == (H, W) and not c1.mask(0).any()  # no png: empty
    assert c1.mask(1).sum() == 24 and set(np.unique(c1.mask(1))) == {0, 1}
    assert c2.mask(0) is None and len(c2) == 3
    with pytest.raises(DataError, match='nope'):
        ds.train_clips('nope')


def make_shanghaitech(root: Path) -> Path:
    write_video(root / 'training' / 'videos' / '01_001.avi', [solid(80)] * 5)
    write_video(root / 'training' / 'videos' / '01_002.avi', [solid(80)] * 4)
    write_video(root / 'training' / 'videos' / '02_001.avi', [solid(80)] * 3)
    labels = {'01_0014': [0, 1, 1, 0], '02_0001': [1, 0, 0]}
    testing = root / 'testing'
    (testing / 'test_frame_mask').mkdir(parents=True)
    (testing / 'test_pixel_mask').mkdir(parents=True)
    for clip, lab in labels.items():
        for t in range(len(lab)):
            write_rgb(testing / 'frames' / clip / f'{t:03d}.jpg', solid(80))
        np.save(testing / 'test_frame_mask' / f'{clip}.npy', np.array(lab, np.int64))
    masks = np.zeros((4, H, W), np.uint8)
    masks[1:3, 0:3, 0:4] = 1
    np.save(testing / 'test_pixel_mask' / '01_0014.npy', masks)  # 02_0001 has no pixel masks
    return root


def test_shanghaitech_layout(tmp_path):
    root = make_shanghaitech(tmp_path / 'shanghaitech')
    ds = VideoDataset(root)
    assert ds.layout == 'shanghaitech' and ds.scenes() == ['01', '02']
    train = ds.train_clips('01')
    assert [c.name for c in train] == ['01_001', '01_002'] and all(isinstance(c, Clip) for c in train)
    assert train[0].video_path is not None and train[0].frame_paths is None
    assert len(train[0]) == 5 and len(list(train[0].frames())) == 5
    assert next(iter(train[0].frames())).shape == (H, W, 3)

    (clip,) = ds.test_clips('01')
    assert clip.name == '01_0014' and clip.scene == '01' and len(clip) == 4
    assert clip.labels.dtype == np.uint8 and clip.labels.tolist() == [0, 1, 1, 0]
    assert clip.mask(1).shape == (H, W) and clip.mask(1).sum() == 12 and not clip.mask(0).any()
    (other,) = ds.test_clips('02')
    assert other.labels.tolist() == [1, 0, 0] and other.mask(0) is None


def test_video_dataset_errors(tmp_path):
    with pytest.raises(DataError, match='missing'):
        VideoDataset(tmp_path / 'missing')
    (tmp_path / 'plain').mkdir()
    with pytest.raises(DataError, match='layout'):
        VideoDataset(tmp_path / 'plain')

    root = make_ped2(tmp_path / 'ped2')
    np.save(root / 'testing' / 'frame_labels' / '02.npy', np.zeros(7, np.uint8))
    with pytest.raises(DataError, match='clip 02'):
        VideoDataset(root).test_clips('ped2')

    st = make_shanghaitech(tmp_path / 'st')
    (st / 'testing' / 'test_frame_mask' / '02_0001.npy').unlink()
    with pytest.raises(DataError, match='02_0001'):
        VideoDataset(st).test_clips('02')


# ---------------------------------------------------------------- the real data, when present

@pytest.mark.shared_data
def test_shared_data_counts():
    ped2, tile = SHARED_DATA / 'ucsd_ped2', SHARED_DATA / 'magnetic_tile'
    if not (ped2.is_dir() and tile.is_dir()):
        pytest.skip(f'shared data not found at {SHARED_DATA}')
    ds = VideoDataset(ped2)
    assert ds.layout == 'ped2'
    (scene,) = ds.scenes()
    assert len(ds.train_clips(scene)) == 16
    test = ds.test_clips(scene)
    assert len(test) == 6
    assert sum(len(c) for c in test) == 1020
    assert sum(int(c.labels.sum()) for c in test) == 790
    labelled = int(np.flatnonzero(test[0].labels)[0])
    assert test[0].mask(labelled).any() and test[0].mask(labelled).shape == (240, 360)

    (cat,) = find_mvtec_categories(tile)
    assert len(cat.train_paths) == 600 and len(cat.test_samples) == 348
    defect = next(s for s in cat.test_samples if s.label == 1)
    assert cat.load_mask(defect).shape == read_image(defect.path).shape[:2]
