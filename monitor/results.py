"""What the engine says about one frame, and its wire formats (stream fields, JSON)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import cv2
import numpy as np

from engine.visualize import resize_map

MAX_BOXES = 10  # a frame with more regions is a scene-wide change; ten boxes are enough to show it


@dataclass(frozen=True)
class Stills:
    """JPEGs of a flagged frame as scored (model-input size) and of the frame before it, which
    its temporal channels compared against: what a reviewer sees and "not an anomaly" adds."""

    frame: bytes
    previous: bytes | None = None


@dataclass(frozen=True)
class Media:
    """What goes out with a result besides its numbers (flagged, escalated frames only)."""

    overlay: bytes | None = None
    stills: Stills | None = None
    evidence: dict | None = None


def json_safe(record: dict) -> dict:
    """Non-finite floats become None, so the output is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


@dataclass(kw_only=True)  # kw_only: the field list is long and will grow; positional calls would break
class FrameResult:
    camera: str
    run_id: str
    seq: int
    source_ts: float
    capture_ts: float
    published_ts: float | None = None  # set by the publisher
    scene: str
    image_score: float
    tau: float  # image-level threshold: flagged = image_score > tau
    flagged: bool
    escalated: bool
    max_pixel_score: float | None = None
    theta: float | None = None  # pixel-level threshold
    anomalous_area: float | None = None  # fraction of pixels > theta
    boxes: list[list[int]] = field(default_factory=list)  # [x, y, w, h], source pixels, largest first
    overlay_ref: str | None = None
    # Claimed from a dead engine after later frames: scored without its predecessor (temporal
    # and motion channels zero, no smoothing) and kept out of event state.
    late: bool = False
    dropped: int = 0  # frames of this camera's run dropped (and counted) before this one
    engine: str = ""  # the engine that scored it (its bus consumer name)
    # Flagged frames only: the frame as scored and the one before it (Stills), and the nearest
    # normal patch to the map's peak (engine/evidence.py), for review and "not an anomaly".
    frame_ref: str | None = None
    previous_ref: str | None = None
    evidence: dict | None = None

    def __post_init__(self) -> None:
        # Engine values are often numpy scalars, which json and redis-py reject or mangle.
        self.seq = int(self.seq)
        for name in ("source_ts", "capture_ts", "image_score", "tau"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("published_ts", "max_pixel_score", "theta", "anomalous_area"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else float(value))
        self.flagged = bool(self.flagged)
        self.escalated = bool(self.escalated)
        self.late = bool(self.late)
        self.boxes = [[int(v) for v in box] for box in self.boxes]

    @property
    def key(self) -> tuple[str, str, int]:
        return self.camera, self.run_id, self.seq

    def to_fields(self) -> dict[str, str]:
        """Flat string map for XADD: None -> '', bool -> '1'/'0', boxes as JSON."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = ""
            elif isinstance(value, bool):
                out[f.name] = "1" if value else "0"
            elif isinstance(value, float):
                out[f.name] = repr(value)  # repr round-trips a float exactly
            elif f.name in ("boxes", "evidence"):
                out[f.name] = json.dumps(value, separators=(",", ":"))
            else:
                out[f.name] = str(value)
        return out

    @classmethod
    def from_fields(cls, data: dict) -> FrameResult:
        """Inverse of to_fields; accepts the bytes keys/values redis-py returns."""
        flat = {_text(k): _text(v) for k, v in data.items()}
        kwargs: dict = {}
        for f in fields(cls):
            if f.name not in flat:
                continue
            raw = flat[f.name]
            if f.name in ("camera", "run_id", "scene", "engine"):
                kwargs[f.name] = raw
            elif f.name in ("overlay_ref", "frame_ref", "previous_ref"):
                kwargs[f.name] = raw or None
            elif f.name in ("seq", "dropped"):
                kwargs[f.name] = int(raw)
            elif f.name in ("flagged", "escalated"):
                kwargs[f.name] = raw == "1"
            elif f.name == "boxes":
                kwargs[f.name] = json.loads(raw) if raw else []
            elif f.name == "evidence":
                kwargs[f.name] = json.loads(raw) if raw else None
            else:
                kwargs[f.name] = float(raw) if raw != "" else None
        return cls(**kwargs)

    def to_json(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> FrameResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def regions_from_map(amap: np.ndarray, theta: float, frame_hw: tuple[int, int],
                     min_area_frac: float = 0.0005) -> tuple[float, list[list[int]]]:
    """Anomalous area and boxes of the connected regions where ``amap > theta``.

    The map is resized bilinearly to ``frame_hw`` (as heatmap_overlay does), so the
    boxes are in source-frame pixels and match the drawn outlines. Returns
    (fraction of frame pixels > theta, up to MAX_BOXES [x, y, w, h] boxes, largest
    first); regions smaller than ``min_area_frac`` of the frame are dropped from the
    boxes (speckle) but still counted in the area.
    """
    height, width = int(frame_hw[0]), int(frame_hw[1])
    amap = resize_map(amap, height, width)
    mask = (amap > theta).astype(np.uint8)
    total = height * width
    area_fraction = float(mask.sum()) / total if total else 0.0
    if area_fraction == 0.0:
        return 0.0, []
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_pixels = min_area_frac * total
    regions = [stats[i] for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_pixels]  # 0 = background
    regions.sort(key=lambda s: int(s[cv2.CC_STAT_AREA]), reverse=True)
    boxes = [[int(s[cv2.CC_STAT_LEFT]), int(s[cv2.CC_STAT_TOP]), int(s[cv2.CC_STAT_WIDTH]),
              int(s[cv2.CC_STAT_HEIGHT])] for s in regions[:MAX_BOXES]]
    return area_fraction, boxes


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
