"""Reference banks from user-given sources: folders of frames or images, and video files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .bank import ReferenceBank
from .calibrate import calibrate
from .datasets import VIDEO_EXTS, iter_video_frames, list_source_files, read_image
from .spade import Spade


def group_sources(sources: list[str | Path]) -> list[list[Path]]:
    """Files per calibration group: each video is a clip, and so is each folder of images."""
    groups: dict[Path, list[Path]] = {}
    for source in sources:
        for file in list_source_files(source):
            key = file if file.suffix.lower() in VIDEO_EXTS else file.parent
            groups.setdefault(key, []).append(file)
    return list(groups.values())


def iter_grouped_frames(groups: list[list[Path]], fps: float | None = None) -> Iterator[tuple[int, np.ndarray]]:
    for g, files in enumerate(groups):
        for file in files:
            if file.suffix.lower() in VIDEO_EXTS:
                for frame in iter_video_frames(file, fps=fps):
                    yield g, frame
            else:
                yield g, read_image(file)


def build_reference(spade: Spade, sources: list[str | Path], scene: str,
                    progress: bool = True, fps: float | None = None) -> ReferenceBank:
    """Build and calibrate one scene's bank.

    fps samples video sources at the rate the camera will be sampled at: temporal features
    measure change between consecutive sampled frames, so the bank must see the same spacing.
    """
    groups = group_sources(sources)
    total = sum(len(files) for files in groups if files[0].suffix.lower() not in VIDEO_EXTS) or None
    bank = spade.build_bank(iter_grouped_frames(groups, fps), [str(s) for s in sources], total=total,
                            progress=progress)
    bank.scene = scene
    bank.fps = fps if fps is not None else _common_video_rate(groups)
    calibrate(bank, spade.config, progress=progress)
    return bank


def _common_video_rate(groups: list[list[Path]]) -> float | None:
    """The frame rate shared by all video sources, or None (image folders, mixed rates)."""
    import av

    rates = set()
    for files in groups:
        for file in files:
            if file.suffix.lower() not in VIDEO_EXTS:
                return None
            try:
                with av.open(str(file)) as container:
                    rate = container.streams.video[0].average_rate
            except Exception:
                return None
            if not rate:
                return None
            rates.add(round(float(rate), 3))
    return rates.pop() if len(rates) == 1 else None
