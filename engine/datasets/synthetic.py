"""Synthetic ShanghaiTech-style scenes with exact anomaly labels, for tests and demos.

A fixed camera looks at a building front, a lawn nobody walks on, a paved walkway and a
car park with a zebra crossing. Small figures walk the walkway lanes and the crossing.
Test clips inject three kinds of anomaly in their middle part: a fast cyclist, a vehicle
on the walkway, and a person walking on the lawn. Pixel masks cover only the anomalous
object (after occlusion), and frame labels are derived from those masks, so the two
always agree.

Output uses the ped2 layout read by engine.datasets.VideoDataset, plus optional MP4s.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..errors import ConfigError, DataError
from .video import VideoWriter

ANOMALY_KINDS = ('fast', 'vehicle', 'lawn')

_SHIFT = 4  # cv2 drawing with 1/16 px precision: slow walkers then move smoothly
_ONE = 1 << _SHIFT

# muted clothing so that normal people never look like the saturated vehicles
_SHIRTS = [(92, 92, 96), (52, 60, 92), (104, 78, 58), (66, 86, 62), (112, 52, 56),
           (150, 138, 116), (40, 40, 44), (128, 120, 130), (84, 100, 110)]
_TROUSERS = [(38, 42, 60), (30, 30, 32), (70, 64, 52), (56, 58, 64), (96, 88, 70)]
_HEADS = [(196, 160, 130), (150, 110, 80), (96, 70, 50), (60, 46, 36), (210, 180, 150)]
_VEHICLES = [(220, 30, 30), (240, 200, 20), (30, 80, 225), (235, 120, 10), (200, 30, 200)]


@dataclass
class AnomalyEvent:
    clip: str
    kind: str          # one of ANOMALY_KINDS
    first_frame: int   # first and last frame (inclusive) where its mask is non-empty
    last_frame: int


@dataclass
class SceneInfo:
    root: Path
    fps: float
    size: tuple[int, int]  # (H, W)
    train_clips: list[str]
    test_clips: list[str]
    train_videos: list[Path] = field(default_factory=list)
    test_videos: list[Path] = field(default_factory=list)
    n_train_frames: int = 0
    n_test_frames: int = 0
    n_anomalous_frames: int = 0
    events: list[AnomalyEvent] = field(default_factory=list)

    @property
    def videos(self) -> list[Path]:
        return self.train_videos + self.test_videos


# ---------------------------------------------------------------- scene geometry

@dataclass
class _Layout:
    h: int
    w: int
    s: float            # scale: 1.0 at 240 rows
    wall_end: int
    lawn_end: int       # the lawn (no-walk region) spans rows [wall_end, lawn_end)
    walk_end: int       # the walkway spans rows [lawn_end, walk_end)
    lane_a: float       # feet rows of the two walking lanes
    lane_b: float
    cross_x0: int       # zebra crossing columns [cross_x0, cross_x1) from walkway to bottom
    cross_x1: int

    @classmethod
    def for_size(cls, h: int, w: int) -> '_Layout':
        s = h / 240.0
        wall_end, lawn_end, walk_end = round(0.12 * h), round(0.40 * h), round(0.76 * h)
        walk_h = walk_end - lawn_end
        cross_x0 = round(0.58 * w)
        return cls(h, w, s, wall_end, lawn_end, walk_end,
                   lane_a=lawn_end + 0.36 * walk_h, lane_b=lawn_end + 0.78 * walk_h,
                   cross_x0=cross_x0, cross_x1=cross_x0 + max(6, round(26 * s)))


def _render_background(lay: _Layout, rng: np.random.Generator) -> np.ndarray:
    h, w, s = lay.h, lay.w, lay.s
    low = cv2.resize(rng.standard_normal((h // 8 + 2, w // 8 + 2)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.8)
    img = np.zeros((h, w, 3), np.float32)

    def fill(r0: int, r1: int, rgb, low_amp: float, fine_amp: tuple[float, float, float]) -> None:
        for c in range(3):
            img[r0:r1, :, c] = rgb[c] + low_amp * low[r0:r1] + fine_amp[c] * fine[r0:r1]

    fill(0, lay.wall_end, (158, 146, 132), 6, (5, 5, 5))
    fill(lay.wall_end, lay.lawn_end, (74, 120, 56), 10, (8, 16, 6))
    fill(lay.lawn_end, lay.walk_end, (170, 166, 158), 5, (4, 4, 4))
    fill(lay.walk_end, h, (84, 86, 90), 4, (6, 6, 6))

    # building front: a ledge and a row of windows
    win_w, win_h, step = max(3, round(18 * s)), max(2, round(0.06 * h)), max(8, round(40 * s))
    for x in range(round(10 * s), w - win_w, step):
        img[round(0.03 * h):round(0.03 * h) + win_h, x:x + win_w] = (58, 64, 74)
    img[max(0, lay.wall_end - max(1, round(3 * s))):lay.wall_end] = (120, 112, 104)

    # paving blocks in staggered rows, each a little lighter or darker, with dark grout
    bw, bh = max(4, round(16 * s)), max(3, round(10 * s))
    for row, y in enumerate(range(lay.lawn_end, lay.walk_end, bh)):
        offset = (bw // 2) * (row % 2)
        for x in range(-offset, w, bw):
            img[y:y + bh, max(0, x):x + bw] += rng.normal(0, 5)
        img[y:y + 1, :] -= 22
        for x in range(-offset, w, bw):
            if x >= 0:
                img[y:min(y + bh, lay.walk_end), x:x + 1] -= 22
    kerb = max(1, round(2 * s))
    img[lay.lawn_end:lay.lawn_end + kerb] = (204, 200, 190)
    img[lay.walk_end - kerb:lay.walk_end] = (204, 200, 190)

    # car park stripes, and the zebra crossing that people use
    stripe_w = max(1, round(2 * s))
    for x in range(round(12 * s), w, max(8, round(44 * s))):
        if x + stripe_w < lay.cross_x0 - 4 * s or x > lay.cross_x1 + 4 * s:
            img[lay.walk_end + round(8 * s):h - round(6 * s), x:x + stripe_w] = (214, 214, 206)
    zebra = max(2, round(6 * s))
    for y in range(lay.walk_end, h, 2 * zebra):
        img[y:y + zebra, lay.cross_x0:lay.cross_x1] = (222, 222, 214)

    # bushes on the lawn, and a bench at the walkway edge
    for _ in range(4):
        cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(lay.wall_end + 8 * s, lay.lawn_end - 10 * s)
        axes = (max(2, round(rng.uniform(10, 18) * s)), max(2, round(rng.uniform(5, 9) * s)))
        cv2.ellipse(img, (round(cx), round(cy)), axes, 0, 0, 360, (40, 78, 34), -1)
    bx, by = round(0.18 * w), lay.lawn_end + kerb + max(1, round(2 * s))
    img[by:by + max(2, round(5 * s)), bx:bx + max(6, round(30 * s))] = (112, 80, 52)
    return np.clip(img, 0, 255).astype(np.float32)


# ---------------------------------------------------------------- actors

def _p(v: float) -> int:
    return int(round(v * _ONE))


def _pt(x: float, y: float) -> tuple[int, int]:
    return (_p(x), _p(y))


class _Path:
    """A polyline walked at constant speed; position by arc length."""

    def __init__(self, points: list[tuple[float, float]]):
        self.points = np.asarray(points, np.float64)
        seg = np.diff(self.points, axis=0)
        self.seg_len = np.hypot(seg[:, 0], seg[:, 1])
        self.cum = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.length = float(self.cum[-1])

    def at(self, arc: float) -> tuple[float, float, float]:
        """(x, y, direction of x motion) at this arc length."""
        i = int(np.clip(np.searchsorted(self.cum, arc, side='right') - 1, 0, len(self.seg_len) - 1))
        t = (arc - self.cum[i]) / max(self.seg_len[i], 1e-9)
        p0, p1 = self.points[i], self.points[i + 1]
        x, y = p0 + t * (p1 - p0)
        return float(x), float(y), 1.0 if p1[0] >= p0[0] else -1.0


@dataclass
class _Actor:
    kind: str                # 'person', 'cyclist', 'vehicle'
    path: _Path
    speed: float             # px per frame
    t0: float                # frame at which it is at the path start
    colours: tuple
    anomaly: str | None = None                         # the kind it counts as, if any
    is_anomalous: Callable[[float, float], bool] | None = None  # (x, y) -> bool, for 'lawn'

    def arc(self, t: int) -> float:
        return self.speed * (t - self.t0)

    def on_path(self, t: int) -> bool:
        return 0.0 <= self.arc(t) <= self.path.length

    def anomalous_at(self, x: float, y: float) -> bool:
        if self.anomaly is None:
            return False
        return True if self.is_anomalous is None else self.is_anomalous(x, y)


def _draw_person(canvases, x: float, y: float, arc: float, s: float, colours) -> None:
    shirt, trousers, head = colours
    h, w = 24 * s, 10 * s
    swing = 2.5 * s * math.sin(arc / (3.0 * s))   # legs scissor as it walks
    leg = max(1, round(2 * s))
    for img, value in canvases:
        c = lambda rgb: rgb if value is None else value  # noqa: E731
        hip = _pt(x, y - 0.42 * h)
        cv2.line(img, hip, _pt(x + swing, y), c(trousers), leg, cv2.LINE_8, _SHIFT)
        cv2.line(img, hip, _pt(x - swing, y), c(trousers), leg, cv2.LINE_8, _SHIFT)
        cv2.ellipse(img, _pt(x, y - 0.62 * h), (_p(w / 2), _p(0.24 * h)), 0, 0, 360, c(shirt), -1,
                    cv2.LINE_8, _SHIFT)
        cv2.circle(img, _pt(x, y - 0.9 * h), _p(max(1.0, 0.11 * h)), c(head), -1, cv2.LINE_8, _SHIFT)


def _draw_cyclist(canvases, x: float, y: float, arc: float, s: float, colours, direction: float) -> None:
    shirt, trousers, head = colours
    h = 24 * s
    r = 0.2 * h
    back, front = x - direction * 0.36 * h, x + direction * 0.36 * h
    spoke = max(1, round(1.5 * s))
    for img, value in canvases:
        c = lambda rgb: rgb if value is None else value  # noqa: E731
        for wx in (back, front):
            cv2.circle(img, _pt(wx, y - r), _p(r), c((24, 24, 26)), spoke, cv2.LINE_8, _SHIFT)
        seat = (x - direction * 0.08 * h, y - 0.62 * h)
        cv2.line(img, _pt(back, y - r), _pt(*seat), c((170, 170, 176)), spoke, cv2.LINE_8, _SHIFT)
        cv2.line(img, _pt(*seat), _pt(front, y - r), c((170, 170, 176)), spoke, cv2.LINE_8, _SHIFT)
        cv2.line(img, _pt(*seat), _pt(x, y - r), c(trousers), max(1, round(2 * s)), cv2.LINE_8, _SHIFT)
        cv2.ellipse(img, _pt(seat[0] + direction * 0.08 * h, y - 0.85 * h), (_p(4.5 * s), _p(0.2 * h)),
                    -20 * direction, 0, 360, c(shirt), -1, cv2.LINE_8, _SHIFT)
        cv2.circle(img, _pt(seat[0] + direction * 0.18 * h, y - 1.1 * h), _p(max(1.0, 0.11 * h)),
                   c(head), -1, cv2.LINE_8, _SHIFT)


def _draw_vehicle(canvases, x: float, y: float, s: float, colour, direction: float) -> None:
    h = 24 * s
    half = 1.1 * h
    body_top = y - 0.62 * h
    wheel = 0.15 * h
    for img, value in canvases:
        c = lambda rgb: rgb if value is None else value  # noqa: E731
        cv2.rectangle(img, _pt(x - half, body_top), _pt(x + half, y - wheel), c(colour), -1,
                      cv2.LINE_8, _SHIFT)
        cabin_x0 = x - direction * 0.55 * h
        cabin_x1 = x + direction * 0.35 * h
        cv2.rectangle(img, _pt(min(cabin_x0, cabin_x1), body_top - 0.36 * h),
                      _pt(max(cabin_x0, cabin_x1), body_top), c((58, 76, 104)), -1, cv2.LINE_8, _SHIFT)
        for wx in (x - 0.65 * h, x + 0.65 * h):
            cv2.circle(img, _pt(wx, y - wheel), _p(wheel), c((18, 18, 20)), -1, cv2.LINE_8, _SHIFT)


def _draw(actor: _Actor, img: np.ndarray, label: np.ndarray, t: int, s: float) -> bool:
    """Draw on the frame and write 255/0 into the label map (later actors occlude earlier)."""
    arc = actor.arc(t)
    x, y, direction = actor.path.at(arc)
    anomalous = actor.anomalous_at(x, y)
    canvases = [(img, None), (label, 255 if anomalous else 0)]
    if actor.kind == 'person':
        _draw_person(canvases, x, y, arc, s, actor.colours)
    elif actor.kind == 'cyclist':
        _draw_cyclist(canvases, x, y, arc, s, actor.colours, direction)
    else:
        _draw_vehicle(canvases, x, y, s, actor.colours, direction)
    return anomalous


def _person_colours(rng: np.random.Generator) -> tuple:
    pick = lambda pal: tuple(int(v) for v in pal[rng.integers(len(pal))])  # noqa: E731
    return pick(_SHIRTS), pick(_TROUSERS), pick(_HEADS)


def _normal_paths(lay: _Layout, rng: np.random.Generator) -> _Path:
    margin = 16 * lay.s  # start and end off-screen, so people walk in and out
    w, h = lay.w, lay.h
    jitter = rng.uniform(-4, 4) * lay.s
    xc = (lay.cross_x0 + lay.cross_x1) / 2 + rng.uniform(-5, 5) * lay.s
    choice = rng.integers(6)
    if choice < 4:  # along a lane
        y = (lay.lane_a if choice < 2 else lay.lane_b) + jitter
        pts = [(-margin, y), (w + margin, y)]
    else:  # up or down the zebra crossing, joining the lower lane
        y = lay.lane_b + jitter
        side = -margin if rng.integers(2) == 0 else w + margin
        pts = [(xc, h + 26 * lay.s), (xc, y), (side, y)]
    if rng.integers(2) == 1:
        pts = pts[::-1]
    return _Path(pts)


def _normal_population(lay: _Layout, rng: np.random.Generator, n_frames: int) -> list[_Actor]:
    # arrivals start well before frame 0 so the first frame is already populated
    longest = lay.w + lay.h + 60 * lay.s
    slowest = 1.0 * lay.s
    start = -longest / slowest
    rate = 4.0 / (lay.w / (1.5 * lay.s))  # about four people in view at a time
    n = rng.poisson(rate * (n_frames - start))
    actors = []
    for _ in range(n):
        actors.append(_Actor('person', _normal_paths(lay, rng), rng.uniform(1.0, 2.0) * lay.s,
                             rng.uniform(start, n_frames), _person_colours(rng)))
    return actors


def _anomalous_interval(actor: _Actor, step: float = 0.25) -> tuple[float, float]:
    """Arc-length range over which the actor counts as anomalous."""
    arcs = np.arange(0.0, actor.path.length + step, step)
    hits = [a for a in arcs if actor.anomalous_at(*actor.path.at(a)[:2])]
    return (hits[0], hits[-1]) if hits else (0.0, actor.path.length)


def _make_anomaly(kind: str, lay: _Layout, rng: np.random.Generator, window: tuple[int, int],
                  centre: float) -> _Actor:
    s, w = lay.s, lay.w
    lane = lay.lane_a if rng.integers(2) == 0 else lay.lane_b
    lane += rng.uniform(-3, 3) * s
    left_to_right = rng.integers(2) == 0
    if kind == 'fast':
        reach = 0.6 * 24 * s + 2  # half the bike's length: fully off-screen at both ends
        pts = [(-reach, lane), (w + reach, lane)]
        actor = _Actor('cyclist', _Path(pts if left_to_right else pts[::-1]),
                       rng.uniform(8, 12) * s, 0.0, _person_colours(rng), anomaly=kind)
    elif kind == 'vehicle':
        reach = 1.1 * 24 * s + 2
        pts = [(-reach, lane), (w + reach, lane)]
        # fast enough to cross within the anomaly window when possible, but no faster than a car in a car park
        speed = float(np.clip((w + 2 * reach) / max(1, window[1] - window[0]), 3 * s, 7 * s))
        colour = tuple(int(v) for v in _VEHICLES[rng.integers(len(_VEHICLES))])
        actor = _Actor('vehicle', _Path(pts if left_to_right else pts[::-1]), speed, 0.0, colour,
                       anomaly=kind)
    elif kind == 'lawn':
        # walks the upper lane, detours across the lawn and comes back to the lane
        y, top = lay.lane_a, lay.lawn_end - 22 * s
        x1 = rng.uniform(0.25, 0.55) * w
        dx = 22 * s
        pts = [(-16 * s, y), (x1, y), (x1 + dx, top), (x1 + 2 * dx, y), (w + 16 * s, y)]
        if not left_to_right:
            pts = [(w - px, py) for px, py in pts]
        actor = _Actor('person', _Path(pts), rng.uniform(1.5, 2.0) * s, 0.0, _person_colours(rng),
                       anomaly=kind, is_anomalous=lambda _x, fy: fy < lay.lawn_end)
    else:
        raise ConfigError(f"unknown anomaly kind {kind!r}: use one of {', '.join(ANOMALY_KINDS)}")
    a0, a1 = _anomalous_interval(actor)
    # slide it so the whole anomalous stretch fits the window, if it can
    half = (a1 - a0) / actor.speed / 2
    lo, hi = window[0] + half, window[1] - 1 - half
    centre = float(np.clip(centre, lo, hi)) if lo <= hi else (window[0] + window[1] - 1) / 2
    actor.t0 = centre - (a0 + a1) / 2 / actor.speed
    return actor


def _anomaly_plan(n_clips: int) -> list[list[str]]:
    """Every clip gets at least one kind; all kinds appear when there are enough clips."""
    plan: list[list[str]] = [[] for _ in range(n_clips)]
    for i, kind in enumerate(ANOMALY_KINDS):
        plan[i % n_clips].append(kind)
    return plan


# ---------------------------------------------------------------- rendering and writing

class _ClipRenderer:
    def __init__(self, lay: _Layout, background: np.ndarray, actors: list[_Actor],
                 rng: np.random.Generator, window: tuple[int, int]):
        self.lay, self.bg, self.actors, self.rng, self.window = lay, background, actors, rng, window

    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        img = self.bg.copy()  # float32: cv2 draws on it, noise is added afterwards
        label = np.zeros(img.shape[:2], np.uint8)
        visible = [a for a in self.actors if a.on_path(t)]
        visible.sort(key=lambda a: a.path.at(a.arc(t))[1])  # farther (higher) first
        for actor in visible:
            x, y, _ = actor.path.at(actor.arc(t))
            # anomalies stay inside the window so that clips start and end normal
            if actor.anomalous_at(x, y) and not self.window[0] <= t < self.window[1]:
                continue
            _draw(actor, img, label, t, self.lay.s)
        noise = self.rng.standard_normal(img.shape, dtype=np.float32)
        noise *= 2.0
        noise += self.rng.normal(0, 0.8) + 0.5  # a slight exposure flicker; +0.5 rounds below
        img += noise
        np.clip(img, 0, 255, out=img)
        return img.astype(np.uint8), label


def _check_args(size, n_train_clips, train_len, n_test_clips, test_len, fps) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"scene size must be (height, width), got {size!r}") from None
    if h < 48 or w < 64 or h % 2 or w % 2:
        raise ConfigError(f"scene size {h}x{w} is not usable: need even height >= 48 and even "
                          "width >= 64 (H.264 needs even sizes)")
    if n_train_clips < 1 or n_test_clips < 1:
        raise ConfigError("a scene needs at least one training and one test clip")
    if train_len < 1 or test_len < 20:
        raise ConfigError(f"clips too short (train {train_len}, test {test_len}): test clips need "
                          ">= 20 frames to hold normal stretches around the anomalies")
    if not fps > 0:
        raise ConfigError(f"fps must be positive, got {fps}")
    return h, w


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    ours = [out / 'training', out / 'testing', out / 'videos', out / 'scene.json']
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{out} already holds a scene ({existing[0].name}); choose an empty folder "
                        "or pass overwrite=True")
    for p in existing:  # only what make_scene itself writes, never other files
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_scene(out_dir: str | Path, *, seed: int = 0, size: tuple[int, int] = (240, 320),
               n_train_clips: int = 4, train_len: int = 60, n_test_clips: int = 2,
               test_len: int = 80, fps: float = 10, write_videos: bool = True,
               overwrite: bool = False) -> SceneInfo:
    """Write a synthetic scene in the ped2 layout (and MP4s); deterministic for a seed."""
    h, w = _check_args(size, n_train_clips, train_len, n_test_clips, test_len, fps)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    lay = _Layout.for_size(h, w)
    background = _render_background(lay, np.random.default_rng([seed, 0]))

    n_clips = max(n_train_clips, n_test_clips)
    digits = max(2, len(str(n_clips)))
    name = lambda i: f'{i + 1:0{digits}d}'  # noqa: E731
    info = SceneInfo(out, float(fps), (h, w), [name(i) for i in range(n_train_clips)],
                     [name(i) for i in range(n_test_clips)])
    if write_videos:
        (out / 'videos').mkdir()
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, 95]

    for i, clip in enumerate(info.train_clips):
        rng = np.random.default_rng([seed, 1, i])
        renderer = _ClipRenderer(lay, background, _normal_population(lay, rng, train_len), rng,
                                 (0, 0))
        frame_dir = out / 'training' / 'frames' / clip
        frame_dir.mkdir(parents=True)
        video_path = out / 'videos' / f'train_{clip}.mp4'
        writer = VideoWriter(video_path, (h, w), fps) if write_videos else None
        fdig = max(3, len(str(train_len - 1)))
        for t in range(train_len):
            rgb, _ = renderer.frame(t)
            cv2.imwrite(str(frame_dir / f'{t:0{fdig}d}.jpg'), rgb[:, :, ::-1], jpeg)
            if writer:
                writer.write(rgb)
        if writer:
            writer.close()
            info.train_videos.append(video_path)
        info.n_train_frames += train_len

    plan = _anomaly_plan(n_test_clips)
    margin = max(2, round(0.15 * test_len))
    window = (margin, test_len - margin)
    for i, clip in enumerate(info.test_clips):
        rng = np.random.default_rng([seed, 2, i])
        actors = _normal_population(lay, rng, test_len)
        kinds = plan[i]
        span = (window[1] - window[0]) / len(kinds)
        anomalies = [_make_anomaly(k, lay, rng, window, window[0] + span * (j + 0.5))
                     for j, k in enumerate(kinds)]
        renderer = _ClipRenderer(lay, background, actors + anomalies, rng, window)
        frame_dir = out / 'testing' / 'frames' / clip
        mask_dir = out / 'testing' / 'pixel_masks' / clip
        frame_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        video_path = out / 'videos' / f'test_{clip}.mp4'
        writer = VideoWriter(video_path, (h, w), fps) if write_videos else None
        fdig = max(3, len(str(test_len - 1)))
        labels = np.zeros(test_len, np.uint8)
        for t in range(test_len):
            rgb, mask = renderer.frame(t)
            labels[t] = mask.any()
            cv2.imwrite(str(frame_dir / f'{t:0{fdig}d}.jpg'), rgb[:, :, ::-1], jpeg)
            cv2.imwrite(str(mask_dir / f'{t:0{fdig}d}.png'), mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if writer:
                writer.write(rgb)
        if writer:
            writer.close()
            info.test_videos.append(video_path)
        (out / 'testing' / 'frame_labels').mkdir(exist_ok=True)
        np.save(out / 'testing' / 'frame_labels' / f'{clip}.npy', labels)
        info.n_test_frames += test_len
        info.n_anomalous_frames += int(labels.sum())
        info.events += _events(clip, renderer, anomalies, test_len)

    meta = asdict(info)
    meta.update(seed=seed, root=str(out), train_videos=[str(p) for p in info.train_videos],
                test_videos=[str(p) for p in info.test_videos])
    (out / 'scene.json').write_text(json.dumps(meta, indent=2))
    return info


def _events(clip: str, renderer: _ClipRenderer, anomalies: list[_Actor], n_frames: int) -> list[AnomalyEvent]:
    """Frame range of each injected anomaly, from the same visibility rules as the masks."""
    events = []
    for actor in anomalies:
        assert actor.anomaly is not None  # an injected anomaly has its kind
        frames = []
        for t in range(n_frames):
            if not (actor.on_path(t) and renderer.window[0] <= t < renderer.window[1]):
                continue
            x, y, _ = actor.path.at(actor.arc(t))
            if actor.anomalous_at(x, y) and _on_screen(actor, t, renderer.lay):
                frames.append(t)
        if frames:
            events.append(AnomalyEvent(clip, actor.anomaly, frames[0], frames[-1]))
    return events


def _on_screen(actor: _Actor, t: int, lay: _Layout) -> bool:
    img = np.zeros((lay.h, lay.w, 3), np.float32)
    label = np.zeros((lay.h, lay.w), np.uint8)
    _draw(actor, img, label, t, lay.s)
    return bool(label.any())
