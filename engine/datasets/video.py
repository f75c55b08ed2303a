"""Video files in and out: decoding to RGB frames (sampled at a camera's rate) and the one writer."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError


@dataclass
class DecodeStats:
    """Pass one to iter_video_frames to learn how many packets were damaged."""
    decoded: int = 0
    skipped: int = 0


def _open_video(path: Path):
    import av

    if not path.is_file():
        raise DataError(f"video not found: {path} (check the path)")
    try:
        container = av.open(str(path))
    except Exception as exc:  # av.error.* for unknown formats, truncated headers, ...
        raise DataError(f"cannot open video {path}: {exc.__class__.__name__}; "
                        "check that it is a video file PyAV/FFmpeg can read") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"no video stream in {path}; pass a video file")
    return container


def iter_video_frames(path: str | Path, stats: DecodeStats | None = None,
                      fps: float | None = None) -> Iterator[np.ndarray]:
    """Decode a video file to RGB frames; damaged packets are skipped, not fatal.

    With fps, frames are sampled by presentation time as an ingest worker samples a camera, so
    a bank's temporal features match the camera's. The file is opened here, not on the first
    next(), so a bad path fails at the call.
    """
    container = _open_video(Path(path))
    frames = _decode(container, stats if stats is not None else DecodeStats(), with_time=fps is not None)
    return frames if fps is None else _sample(frames, fps)


def _sample(timed_frames, fps: float) -> Iterator[np.ndarray]:
    period, due = 1.0 / fps, None
    for ts, frame in timed_frames:
        if due is None or ts >= due - 1e-6:
            due = (ts if due is None else due) + period
            yield frame


def _decode(container, stats: DecodeStats, with_time: bool = False) -> Iterator:
    import av

    try:
        stream = container.streams.video[0]
        stream.thread_type = 'AUTO'
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except (av.error.FFmpegError, ValueError):
                    stats.skipped += 1  # a damaged packet: the decoder resyncs on the next one
                    continue
                for frame in frames:
                    stats.decoded += 1
                    image = frame.to_ndarray(format='rgb24')
                    if with_time:
                        rate = float(stream.average_rate or 25)
                        ts = frame.time if frame.time is not None else stats.decoded / rate
                        yield ts, image
                    else:
                        yield image
        except av.error.FFmpegError:
            stats.skipped += 1  # a truncated container: keep what decoded so far
    finally:
        container.close()


def count_video_frames(path: str | Path) -> int:
    """Frame count from the header when it is there, else by decoding."""
    container = _open_video(Path(path))
    try:
        n = container.streams.video[0].frames
    finally:
        container.close()
    if n > 0:
        return int(n)
    return sum(1 for _ in iter_video_frames(path))


def _video_codec() -> str:
    import av
    for name in ('libx264', 'h264', 'mpeg4'):
        try:
            av.codec.Codec(name, 'w')
            return name
        except Exception:  # not built into this FFmpeg
            continue
    raise DataError("PyAV has no H.264 or MPEG-4 encoder; pass write_videos=False or install a full PyAV")


class VideoWriter:
    """H.264 (MPEG-4 part 2 where FFmpeg lacks it), without B-frames as IP cameras send: decode
    order is display order. gop: a keyframe every that many frames (None: the encoder's choice)."""

    def __init__(self, path: Path, size: tuple[int, int], fps: float, gop: int | None = None):
        import av
        from av.video.stream import VideoStream
        self.av = av
        self.container = av.open(str(path), 'w')
        rate = Fraction(fps).limit_denominator(1001)
        codec = _video_codec()
        stream = self.container.add_stream(codec, rate=rate)
        assert isinstance(stream, VideoStream)  # a video codec's stream
        self.stream = stream
        self.stream.height, self.stream.width = size
        self.stream.pix_fmt = 'yuv420p'
        self.stream.codec_context.time_base = 1 / rate
        self.stream.codec_context.max_b_frames = 0
        if gop is not None:
            self.stream.codec_context.gop_size = gop
        if codec == 'mpeg4':
            self.stream.bit_rate = 8_000_000
            self.stream.options = {'qscale': '2'}
        else:
            self.stream.options = {'crf': '18', 'preset': 'veryfast'}
        self.pts = 0

    def write(self, rgb: np.ndarray) -> None:
        frame = self.av.VideoFrame.from_ndarray(rgb, format='rgb24')
        frame.pts = self.pts
        self.pts += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def write_video(frames: list[np.ndarray], path: Path, fps: float, gop: int | None = None) -> Path:
    """RGB frames to a video file (see VideoWriter)."""
    writer = VideoWriter(Path(path), frames[0].shape[:2], fps, gop)
    for rgb in frames:
        writer.write(rgb)
    writer.close()
    return Path(path)
