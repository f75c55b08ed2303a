"""Dataset readers: image folders, video files, MVTec AD and video-anomaly layouts.

Every frame leaves this module as an RGB uint8 array of shape HxWx3, whatever the
source stored (greyscale, BGR, palette, alpha), so callers never guess channel order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import cv2
import numpy as np

from ..errors import DataError
from .video import count_video_frames, iter_video_frames

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
VIDEO_EXTS = ('.avi', '.mp4', '.mkv', '.mov', '.m4v', '.mpg', '.mpeg', '.ts', '.webm')

VideoLayout = Literal['ped2', 'shanghaitech']


# ---------------------------------------------------------------- small helpers

def natural_key(name: str) -> list:
    """Sort key that puts 'frame2' before 'frame10' (folders are often not zero-padded)."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r'(\d+)', name)]


def _path_key(path: Path) -> list:
    return [natural_key(part) for part in path.parts]


def _is_hidden(path: Path) -> bool:
    # macOS '._x.jpg' resource forks and dot-files are never media.
    return path.name.startswith('.')


def _list_files(folder: Path, exts: tuple[str, ...], recursive: bool = False) -> list[Path]:
    pattern = folder.rglob('*') if recursive else folder.iterdir()
    files = [p for p in pattern
             if p.suffix.lower() in exts and not _is_hidden(p) and p.is_file()]
    return sorted(files, key=lambda p: _path_key(p.relative_to(folder)))


def _list_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p)),
                  key=lambda p: natural_key(p.name))


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path} (check the path)")
    if not path.is_dir():
        raise DataError(f"{what} is not a folder: {path}")


def _image_hw(path: Path) -> tuple[int, int]:
    """Height and width from the file header, without decoding the pixels."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # PIL missing or a format it does not know: decode instead
        return read_image(path).shape[:2]


def _read_binary_mask(path: Path) -> np.ndarray:
    """A 0/255 (or 0/1) mask file as uint8 {0,1}."""
    raw = _imread(path, cv2.IMREAD_GRAYSCALE)
    if raw is None:
        raise DataError(f"cannot read mask {path}: not an image or corrupt; re-export it as PNG")
    # 0/1 masks would vanish under a mid-grey threshold; JPEG masks need one against ringing.
    thresh = 0 if raw.max() <= 1 else 127
    return (raw > thresh).astype(np.uint8)


def _fit_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if mask.shape[:2] == tuple(hw):
        return mask
    return cv2.resize(mask, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def _imread(path: Path, flags: int) -> np.ndarray | None:
    # imdecode from bytes copes with non-ASCII paths, which cv2.imread does not on every OS.
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, flags)


# ---------------------------------------------------------------- images and videos

def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 HxWx3."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path} (check the path)")
    bgr = _imread(path, cv2.IMREAD_COLOR)  # IMREAD_COLOR also expands grey and drops alpha
    if bgr is None:
        raise DataError(f"cannot decode image {path}: not an image or corrupt; remove or replace it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def iter_source_frames(path: str | Path, recursive: bool = True) -> Iterator[np.ndarray]:
    """Frames from an image, a video, or a folder of either (natural order, recursive).

    The path is checked here so that a typo fails at the call, not mid-way through a bank.
    """
    return _iter_files(list_source_files(path, recursive))


def list_source_files(path: str | Path, recursive: bool = True) -> list[Path]:
    """The image and video files a source names: itself, or a folder's (natural order)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"source not found: {path} (pass an image folder or a video file)")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTS + VIDEO_EXTS:
            raise DataError(f"unsupported file type {path}: expected an image "
                            f"({', '.join(IMAGE_EXTS)}) or a video ({', '.join(VIDEO_EXTS)})")
        return [path]
    files = _list_files(path, IMAGE_EXTS + VIDEO_EXTS, recursive=recursive)
    if not files:
        raise DataError(f"no images or videos in {path}: expected files ending in "
                        f"{', '.join(IMAGE_EXTS + VIDEO_EXTS)}")
    return files


def _iter_files(files: list[Path]) -> Iterator[np.ndarray]:
    for file in files:
        if file.suffix.lower() in VIDEO_EXTS:
            yield from iter_video_frames(file)
        else:
            yield read_image(file)


# ---------------------------------------------------------------- MVTec AD layout

@dataclass
class ImageSample:
    path: Path
    label: int          # 0 good, 1 defect
    defect: str         # 'good' or the defect folder name
    mask_path: Path | None  # None: no mask file, i.e. an empty mask


class MvtecCategory:
    """One MVTec AD category: train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.name = self.root.name
        train_dir = self.root / 'train' / 'good'
        _require_dir(train_dir, 'MVTec train/good folder')
        self.train_paths: list[Path] = _list_files(train_dir, IMAGE_EXTS)
        if not self.train_paths:
            raise DataError(f"no images in {train_dir}: put the defect-free training images there")
        self.test_samples: list[ImageSample] = self._scan_test()

    def _scan_test(self) -> list[ImageSample]:
        test_dir = self.root / 'test'
        if not test_dir.is_dir():
            return []  # a training-only category is still usable for building a bank
        samples = []
        for defect_dir in _list_dirs(test_dir):
            defect = defect_dir.name
            label = 0 if defect == 'good' else 1
            for img in _list_files(defect_dir, IMAGE_EXTS):
                mask = None if label == 0 else self._find_mask(defect, img.stem)
                samples.append(ImageSample(img, label, defect, mask))
        return samples

    def _find_mask(self, defect: str, stem: str) -> Path | None:
        gt_dir = self.root / 'ground_truth' / defect
        for name in (f'{stem}_mask', stem):
            for ext in IMAGE_EXTS:
                candidate = gt_dir / f'{name}{ext}'
                if candidate.is_file():
                    return candidate
        return None

    def load_mask(self, sample: ImageSample) -> np.ndarray:
        """uint8 {0,1} HxW at the image's own size; zeros when there is no defect mask."""
        hw = _image_hw(sample.path)
        if sample.label == 0 or sample.mask_path is None:
            return np.zeros(hw, np.uint8)
        return _fit_mask(_read_binary_mask(sample.mask_path), hw)

    def __repr__(self) -> str:
        return (f"MvtecCategory(name={self.name!r}, train={len(self.train_paths)}, "
                f"test={len(self.test_samples)})")


def find_mvtec_categories(root: str | Path) -> list[MvtecCategory]:
    """The root itself when it is a category, else every subfolder with train/good."""
    root = Path(root)
    _require_dir(root, 'MVTec dataset folder')
    if (root / 'train').is_dir() and (root / 'test').is_dir():
        return [MvtecCategory(root)]
    cats = [MvtecCategory(d) for d in _list_dirs(root) if (d / 'train' / 'good').is_dir()]
    if not cats:
        raise DataError(f"no MVTec AD category in {root}: expected <root>/train/good and "
                        "<root>/test/<defect>, or <root>/<category>/train/good")
    return cats


# ---------------------------------------------------------------- video anomaly layouts

@dataclass
class Clip:
    name: str
    scene: str
    frame_paths: list[Path] | None
    video_path: Path | None
    _n_frames: int | None = field(default=None, init=False, repr=False, compare=False)

    def frames(self) -> Iterator[np.ndarray]:
        if self.frame_paths is not None:
            return (read_image(p) for p in self.frame_paths)
        if self.video_path is None:
            raise DataError(f"clip {self.name} has neither frames nor a video")
        return iter_video_frames(self.video_path)

    @property
    def source(self) -> Path:
        """The clip's video file, or its folder of frames."""
        if self.video_path is not None:
            return self.video_path
        if not self.frame_paths:
            raise DataError(f"clip {self.name} has neither frames nor a video")
        return self.frame_paths[0].parent

    def __len__(self) -> int:
        if self.frame_paths is not None:
            return len(self.frame_paths)
        if self._n_frames is None:
            if self.video_path is None:
                raise DataError(f"clip {self.name} has neither frames nor a video")
            self._n_frames = count_video_frames(self.video_path)
        return self._n_frames


@dataclass(eq=False)  # numpy labels make field-wise == ambiguous
class TestClip(Clip):
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    # ped2: a folder of NNN.png; shanghaitech: a frames x H x W .npy; None: no pixel masks
    mask_source: Path | None = field(default=None, repr=False)
    _mask_array: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _frame_hw: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    __test__ = False  # keep pytest from collecting this class as a test

    @property
    def has_masks(self) -> bool:
        return self.mask_source is not None

    def mask(self, i: int) -> np.ndarray | None:
        """uint8 {0,1} HxW mask of frame i, or None when the dataset has no pixel masks."""
        if self.mask_source is None:
            return None
        n = len(self.labels)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for clip {self.name} ({n} frames)")
        if self.mask_source.suffix.lower() == '.npy':
            return self._mask_from_npy(i)
        return self._mask_from_folder(i)

    def _mask_from_npy(self, i: int) -> np.ndarray:
        assert self.mask_source is not None  # mask() checked it
        if self._mask_array is None:
            try:
                arr = np.load(self.mask_source, mmap_mode='r')
            except Exception as exc:
                raise DataError(f"cannot read pixel masks {self.mask_source}: "
                                f"{exc.__class__.__name__}; re-create the .npy file") from None
            if arr.ndim != 3 or arr.shape[0] != len(self.labels):
                raise DataError(f"pixel masks {self.mask_source} have shape {arr.shape}, expected "
                                f"({len(self.labels)}, H, W) for clip {self.name}")
            self._mask_array = arr
        return (np.asarray(self._mask_array[i]) > 0).astype(np.uint8)

    def _mask_from_folder(self, i: int) -> np.ndarray:
        assert self.mask_source is not None and self.frame_paths is not None  # a ped2 test clip: frames
        if self._frame_hw is None:
            self._frame_hw = _image_hw(self.frame_paths[0])
        stem = self.frame_paths[i].stem
        for ext in IMAGE_EXTS:
            candidate = self.mask_source / f'{stem}{ext}'
            if candidate.is_file():
                return _fit_mask(_read_binary_mask(candidate), self._frame_hw)
        return np.zeros(self._frame_hw, np.uint8)  # ped2 convention: no file, nothing anomalous


def _sanitise(name: str) -> str:
    return re.sub(r'[^A-Za-z0-9_-]+', '_', name).strip('_') or 'scene'


def detect_video_layout(root: str | Path) -> VideoLayout:
    root = Path(root)
    _require_dir(root, 'video dataset folder')
    # ShanghaiTech first: both layouts have testing/frames, only it has these two.
    if (root / 'testing' / 'test_frame_mask').is_dir() or (root / 'training' / 'videos').is_dir():
        return 'shanghaitech'
    if (root / 'training' / 'frames').is_dir() or (root / 'testing' / 'frame_labels').is_dir():
        return 'ped2'
    raise DataError(f"unknown video dataset layout in {root}: expected training/frames/<clip>/ + "
                    "testing/frame_labels/<clip>.npy (ped2), or training/videos/SS_VVV.avi + "
                    "testing/test_frame_mask/SS_VVVV.npy (ShanghaiTech)")


def _load_labels(path: Path, clip: str, n_frames: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"frame labels missing for clip {clip}: {path} (one .npy per test clip)")
    try:
        raw = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read frame labels {path}: {exc.__class__.__name__}; "
                        "re-create it with numpy.save") from None
    labels = (np.asarray(raw).reshape(-1) > 0).astype(np.uint8)
    if len(labels) != n_frames:
        raise DataError(f"clip {clip}: {path} has {len(labels)} labels but the clip has "
                        f"{n_frames} frames; fix the labels file or the frames folder")
    return labels


def _frame_folder_clips(parent: Path, scene: str, name_filter=None) -> list[tuple[str, list[Path]]]:
    clips = []
    for d in _list_dirs(parent):
        if name_filter is not None and not name_filter(d.name):
            continue
        frames = _list_files(d, IMAGE_EXTS)
        if frames:  # stray empty folders are not clips
            clips.append((d.name, frames))
    return clips


class VideoDataset:
    """A video anomaly dataset in our ped2 layout or the official ShanghaiTech one."""

    def __init__(self, root: str | Path, layout: VideoLayout | None = None):
        self.root = Path(root)
        if layout is None:
            layout = detect_video_layout(self.root)
        elif layout not in ('ped2', 'shanghaitech'):
            raise DataError(f"unknown layout {layout!r} for {self.root}: use 'ped2' or 'shanghaitech'")
        else:
            _require_dir(self.root, 'video dataset folder')
        self.layout: VideoLayout = layout

    def __repr__(self) -> str:
        return f"VideoDataset(root={str(self.root)!r}, layout={self.layout!r})"

    # -- scenes
    @staticmethod
    def _scene_of(clip_name: str) -> str:
        return clip_name.split('_', 1)[0]

    def scenes(self) -> list[str]:
        if self.layout == 'ped2':
            return [_sanitise(self.root.resolve().name)]
        names: set[str] = set()
        videos = self.root / 'training' / 'videos'
        if videos.is_dir():
            names.update(self._scene_of(p.stem) for p in _list_files(videos, VIDEO_EXTS))
        for sub in (self.root / 'training' / 'frames', self.root / 'testing' / 'frames'):
            if sub.is_dir():
                names.update(self._scene_of(d.name) for d in _list_dirs(sub))
        return sorted(names, key=natural_key)

    def _check_scene(self, scene: str) -> None:
        known = self.scenes()
        if scene not in known:
            raise DataError(f"scene {scene!r} not in {self.root}: available scenes are "
                            f"{', '.join(known) or 'none'}")

    # -- clips
    def train_clips(self, scene: str) -> list[Clip]:
        self._check_scene(scene)
        if self.layout == 'ped2':
            folder = self.root / 'training' / 'frames'
            _require_dir(folder, 'training frames folder')
            clips = [Clip(n, scene, f, None) for n, f in _frame_folder_clips(folder, scene)]
        else:
            clips = self._shanghaitech_train(scene)
        if not clips:
            raise DataError(f"no training clips for scene {scene} in {self.root}/training")
        return clips

    def _shanghaitech_train(self, scene: str) -> list[Clip]:
        in_scene = lambda name: self._scene_of(name) == scene  # noqa: E731
        videos = self.root / 'training' / 'videos'
        if videos.is_dir():
            return [Clip(p.stem, scene, None, p)
                    for p in _list_files(videos, VIDEO_EXTS) if in_scene(p.stem)]
        # some copies ship the training videos already extracted to frames
        frames = self.root / 'training' / 'frames'
        if frames.is_dir():
            return [Clip(n, scene, f, None) for n, f in _frame_folder_clips(frames, scene, in_scene)]
        return []

    def test_clips(self, scene: str) -> list[TestClip]:
        self._check_scene(scene)
        testing = self.root / 'testing'
        frames_dir = testing / 'frames'
        _require_dir(frames_dir, 'test frames folder')
        if self.layout == 'ped2':
            found = _frame_folder_clips(frames_dir, scene)
            labels_dir, masks_dir = testing / 'frame_labels', testing / 'pixel_masks'
        else:
            found = _frame_folder_clips(frames_dir, scene, lambda n: self._scene_of(n) == scene)
            labels_dir, masks_dir = testing / 'test_frame_mask', testing / 'test_pixel_mask'
        clips = []
        for name, frames in found:
            labels = _load_labels(labels_dir / f'{name}.npy', name, len(frames))
            mask_source: Path | None
            if self.layout == 'ped2':
                mask_source = masks_dir / name
                mask_source = mask_source if mask_source.is_dir() else None
            else:
                mask_source = masks_dir / f'{name}.npy'
                mask_source = mask_source if mask_source.is_file() else None
            clips.append(TestClip(name, scene, frames, None, labels=labels, mask_source=mask_source))
        if not clips:
            raise DataError(f"no test clips for scene {scene} in {frames_dir}")
        return clips
