"""The unit that travels from a camera to the engine, and its wire format on a frame bus."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np

from engine.errors import DataError
from engine.preprocess import decode_jpeg, encode_jpeg

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, without '..'"


def is_safe_name(name: object) -> TypeGuard[str]:
    """Camera and scene ids become Redis key parts and file names: the one rule for them."""
    return isinstance(name, str) and NAME_RE.match(name) is not None and ".." not in name


@dataclass
class Frame:
    camera: str
    seq: int  # per camera, starts at 0 and never repeats within one ingest run
    source_ts: float  # presentation time in the source, seconds
    capture_ts: float  # wall clock when the ingest worker decoded it (time.time())
    image: np.ndarray  # HxWx3 RGB uint8
    run_id: str = ""  # distinguishes ingest restarts, so (camera, run_id, seq) is unique
    # Frames of this run the bus dropped, and counted, before this one was queued: what lets the
    # engine tell a counted drop from a lost frame (monitor/ledger.py). Set by the bus.
    dropped_before: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int]:
        return self.camera, self.run_id, self.seq


def encode_frame(frame: Frame, codec: str = "jpeg", quality: int = 90) -> dict[bytes, bytes]:
    """Frame -> flat field map, as stored in a Redis stream entry."""
    if codec == "jpeg":
        try:
            payload = encode_jpeg(frame.image, quality)
        except ValueError:
            raise DataError(f"camera {frame.camera}: frame {frame.seq} could not be JPEG-encoded") from None
    elif codec == "raw":
        payload = np.ascontiguousarray(frame.image).tobytes()
    else:
        raise ValueError(f"unknown frame codec {codec}")
    h, w = frame.image.shape[:2]
    return {
        b"camera": frame.camera.encode(),
        b"run": frame.run_id.encode(),
        b"seq": str(frame.seq).encode(),
        b"source_ts": repr(frame.source_ts).encode(),
        b"capture_ts": repr(frame.capture_ts).encode(),
        b"dropped": str(frame.dropped_before).encode(),
        b"codec": codec.encode(),
        b"shape": f"{h}x{w}".encode(),
        b"data": payload,
    }


def decode_frame(fields: dict[bytes, bytes]) -> Frame:
    """Field map -> Frame. Raises DataError for a corrupt or incomplete entry."""
    try:
        camera = fields[b"camera"].decode()
        seq = int(fields[b"seq"])
        codec = fields[b"codec"].decode()
        h, w = (int(v) for v in fields[b"shape"].decode().split("x"))
        data = fields[b"data"]
        if codec == "jpeg":
            image = decode_jpeg(data)
            if image is None or image.shape[:2] != (h, w):
                raise ValueError("undecodable JPEG")
        elif codec == "raw":
            image = np.frombuffer(data, np.uint8).reshape(h, w, 3)
        else:
            raise ValueError(f"codec {codec}")
        return Frame(camera=camera, seq=seq, source_ts=float(fields[b"source_ts"]),
                     capture_ts=float(fields[b"capture_ts"]), image=image,
                     run_id=fields.get(b"run", b"").decode(), dropped_before=int(fields.get(b"dropped", b"0")))
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        cam = fields.get(b"camera", b"?").decode(errors="replace")
        raise DataError(f"camera {cam}: corrupt frame on the bus ({exc})") from None


def now() -> float:
    return time.time()
