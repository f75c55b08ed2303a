"""Camera ingest: decode a file or stream, sample it to a frame rate, and hand Frames to a sink.

One IngestWorker per camera. The blocking PyAV calls (open, read) run in a reader thread so
that the worker loop can enforce a wall-clock watchdog and react to stop within ~0.1 s; a
stalled reader is abandoned (it exits on its own once PyAV's read timeout fires).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import urlsplit

import numpy as np

from engine.errors import SpadeError
from monitor import urls
from monitor.frames import Frame
from monitor.retry import Backoff

log = logging.getLogger(__name__)

ONLINE, OFFLINE, RECONNECTING, FINISHED = "online", "offline", "reconnecting", "finished"
STATUSES = (ONLINE, OFFLINE, RECONNECTING, FINISHED)
DECODE_TIMES_KEPT = 2000


StatusCallback = Callable[[str, str, str], None]  # (camera_id, status, detail)
Sink = Callable[[Frame], None]


class SourceError(SpadeError):
    """A source that cannot be opened or read. The message is one line and has no credentials."""


class StopEvent(Protocol):  # threading.Event and multiprocessing.Event both fit
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


# ---------------------------------------------------------------- sources

def _local_path(source: str | Path) -> Path | None:
    s = str(source)
    scheme = urls.scheme(s)
    if scheme == "file":
        return Path(urlsplit(s).path)
    return Path(s) if scheme == "" else None


# ---------------------------------------------------------------- opening

def _error_text(exc: BaseException) -> str:
    """A short reason without the filename/URL that str(FFmpegError) appends."""
    import av

    if isinstance(exc, av.error.ExitError):
        return "timed out"
    reason = getattr(exc, "strerror", None) or exc.__class__.__name__
    return str(reason).rstrip(".")


def open_source(url_or_path: str | Path, *, connect_timeout_s: float = 10.0,
                read_timeout_s: float = 10.0) -> Any:
    """av.open with sane network options; a SourceError (one line, no credentials) on failure.

    The container returned has at least one video stream; the caller closes it.
    """
    import av

    source = str(url_or_path)
    shown = urls.redact_url(source)
    path = _local_path(source)
    if path is not None:
        if not path.exists():
            raise SourceError(f"video file not found: {shown} (check the path)")
        if not path.is_file():
            raise SourceError(f"not a video file: {shown}")
        target = str(path)
        options: dict[str, str] = {}
    else:
        target = source
        options = _network_options(urls.scheme(source), read_timeout_s)
    try:
        container = av.open(target, options=options, timeout=(connect_timeout_s, read_timeout_s))
    except av.error.ExitError:
        raise SourceError(f"cannot open {shown}: no answer within {connect_timeout_s:g}s") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise SourceError(urls.scrub(f"cannot open {shown}: {_error_text(exc)}", source)) from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"no video stream in {shown}")
    return container


def _network_options(scheme: str, read_timeout_s: float) -> dict[str, str]:
    io_us = str(max(1, int(read_timeout_s * 1e6)))
    # Short probing: cameras send SPS/PPS up front, and the default 5 s delays every reconnect.
    opts = {"analyzeduration": "1000000", "probesize": "1000000"}
    if scheme in ("rtsp", "rtsps"):
        # FFmpeg >= 5: 'timeout' is the RTSP socket I/O timeout in microseconds ('stimeout' is gone).
        # TCP interleaving: no UDP ports to open, no packet loss smearing frames.
        opts.update(rtsp_transport="tcp", timeout=io_us)
    elif scheme in ("http", "https"):
        opts.update(timeout=io_us, rw_timeout=io_us)
    else:
        opts.update(rw_timeout=io_us)
    return opts


# ---------------------------------------------------------------- reading

@dataclass
class IngestStats:
    decoded: int = 0        # frames out of the decoder
    sampled: int = 0        # frames kept by the fps sampler and handed on: each gets a seq or a drop
    decode_errors: int = 0  # corrupt packets/frames skipped, and read errors treated as end of file
    reconnects: int = 0     # open attempts after the first
    dropped: int = 0        # live frames discarded because the sink was slower than the camera
    last_frame_wall: float = 0.0  # time.time() of the last frame handed on; 0 before the first
    # Per-frame decode times, drained by the metrics tick; bounded in case nothing drains them.
    decode_seconds: deque = field(default_factory=lambda: deque(maxlen=DECODE_TIMES_KEPT))


class CameraReader:
    """Iterate `(image_rgb_uint8, source_ts_seconds)` from one source, sampled to `fps`.

    `realtime` paces files by their timestamps; `loop` restarts files at the end with
    source_ts continuing. Live sources are neither paced nor looped. Damaged packets are
    counted in `stats.decode_errors` and skipped. A live stream that ends or fails raises
    SourceError from the iterator; a file just ends (a truncated tail counts as one error).
    """

    def __init__(self, source: str | Path, *, fps: float | None = None,
                 resolution: tuple[int, int] | None = None, realtime: bool = False,
                 loop: bool = False, live: bool | None = None, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 10.0, stats: IngestStats | None = None,
                 abort: threading.Event | None = None):
        self.source = str(source)
        self.shown = urls.redact_url(self.source)
        self.live = urls.is_live(str(self.source)) if live is None else bool(live)
        self.fps = float(fps) if fps else None
        self.resolution = tuple(resolution) if resolution else None  # (W, H)
        self.realtime = realtime and not self.live
        self.loop = loop and not self.live
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.stats = stats if stats is not None else IngestStats()
        self.abort = abort if abort is not None else threading.Event()
        self.paced_until = 0.0  # monotonic time the pacer sleeps until: the watchdog waits for it
        self._container: Any = None

    # -- lifecycle

    def open(self) -> None:
        if self._container is None:
            self._container = open_source(self.source, connect_timeout_s=self.connect_timeout_s,
                                          read_timeout_s=self.read_timeout_s)

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # closing a broken stream must not mask the original error
                pass

    def __enter__(self) -> "CameraReader":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        self.open()
        period = 1.0 / self.fps if self.fps else 0.0
        next_due: float | None = None
        offset = 0.0          # added to a pass's timestamps so looping stays monotonic
        last_ts: float | None = None
        anchor: tuple[float, float] | None = None  # (wall monotonic, source ts) for pacing
        try:
            while not self.abort.is_set():
                pass_first: float | None = None
                pass_frames = 0
                for pts_s, frame in self._decode_pass():
                    if self.abort.is_set():
                        return
                    pass_frames += 1
                    if pts_s is None:  # no timestamp: one nominal frame after the previous
                        ts = last_ts + self._nominal_period() if last_ts is not None else offset
                    else:
                        if pass_first is None:
                            pass_first = pts_s
                            if last_ts is not None:  # a loop: continue one frame after the last
                                offset = last_ts + self._nominal_period() - pts_s
                        ts = pts_s + offset
                    last_ts = ts
                    if period:
                        if next_due is not None and ts < next_due - 1e-6:
                            continue
                        # Resync after a gap instead of bursting to catch up.
                        next_due = ts + period if next_due is None or ts > next_due + period \
                            else next_due + period
                    image = self._to_rgb(frame)
                    if self.realtime:
                        anchor = self._pace(ts, anchor)
                        if self.abort.is_set():
                            return
                    yield image, ts
                if not self.loop:
                    return
                if pass_frames == 0:
                    raise SourceError(f"no decodable frames in {self.shown}")
                self.close()
                self.open()
        finally:
            self.close()

    def _nominal_period(self) -> float:
        stream = self._container.streams.video[0] if self._container is not None else None
        rate = (stream.average_rate or stream.guessed_rate) if stream is not None else None
        return 1.0 / float(rate) if rate else 1.0 / 25.0

    def _decode_pass(self) -> Iterator[tuple[float | None, Any]]:
        """One pass over the open container: (pts seconds or None, av.VideoFrame)."""
        import av

        container = self._container
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.ExitError:
                raise SourceError(f"no data from {self.shown} for {self.read_timeout_s:g}s") from None
            except (av.error.FFmpegError, OSError) as exc:
                if self.live:
                    raise SourceError(urls.scrub(f"lost {self.shown}: {_error_text(exc)}",
                                             self.source)) from None
                self.stats.decode_errors += 1  # truncated or damaged file tail: keep what we had
                break
            corrupt = bool(packet.is_corrupt)
            started = time.perf_counter()
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.FFmpegError, ValueError):
                self.stats.decode_errors += 1  # the decoder resyncs on a later packet
                continue
            if corrupt:
                self.stats.decode_errors += 1  # decoded for the reference state, not shown
                continue
            per_frame = (time.perf_counter() - started) / max(1, len(frames))
            for frame in frames:
                if frame.is_corrupt:  # concealed damage: could look like an anomaly
                    self.stats.decode_errors += 1
                    continue
                self.stats.decoded += 1
                self.stats.decode_seconds.append(per_frame)
                yield (float(frame.time) if frame.time is not None else None), frame

    def _to_rgb(self, frame: Any) -> np.ndarray:
        if self.resolution:
            w, h = self.resolution
            img = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
        else:
            img = frame.to_ndarray(format="rgb24")
        return np.ascontiguousarray(img)

    def _pace(self, ts: float, anchor: tuple[float, float] | None) -> tuple[float, float]:
        now = time.monotonic()
        if anchor is None:
            return now, ts
        target = anchor[0] + (ts - anchor[1])
        if target < now - 1.0:  # fell behind (slow sink): re-anchor rather than burst
            return now, ts
        if target > now:
            self.paced_until = target
            self.abort.wait(target - now)
        return anchor


# ---------------------------------------------------------------- worker

class _ReaderThread(threading.Thread):
    """Runs one CameraReader and posts ('open'|'frame'|'end'|'error', payload) to a queue."""

    def __init__(self, reader: CameraReader, out: "queue.Queue[tuple[str, Any]]", drop_old: bool):
        super().__init__(daemon=True, name=f"ingest-reader {reader.shown}")
        self.reader = reader
        self.out = out
        self.drop_old = drop_old

    def run(self) -> None:
        reader = self.reader
        try:
            reader.open()
            self._post(("open", None))
            for item in reader:
                if not self._post(("frame", item), may_drop=self.drop_old):
                    return
            self._post(("end", None))
        except SourceError as exc:
            self._post(("error", str(exc)))
        except Exception as exc:  # never let a reader thread die silently
            self._post(("error", urls.scrub(f"reading {reader.shown} failed: "
                                        f"{exc.__class__.__name__}", reader.source)))
        finally:
            reader.close()

    def _post(self, item: tuple[str, Any], may_drop: bool = False) -> bool:
        while not self.reader.abort.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                if may_drop:  # a live camera cannot wait: drop the oldest waiting frame
                    try:
                        self.out.get_nowait()
                        self.reader.stats.sampled += 1  # it was handed on, and is counted as dropped
                        self.reader.stats.dropped += 1
                    except queue.Empty:
                        pass
        return False


class IngestWorker:
    """Feed one camera's frames to `sink`, reconnecting live sources with exponential backoff.

    Statuses (reported through on_status only when they change): online (frames arrive),
    reconnecting (a working stream was lost or stalled), offline (open failed; files then stop,
    live sources keep retrying), finished (a file ended and loop is off).
    """

    def __init__(self, camera_id: str, source: str | Path, *, fps: float | None = None,
                 resolution: tuple[int, int] | None = None, realtime: bool = True,
                 loop: bool = False, live: bool | None = None, watchdog_s: float = 5.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 5.0,
                 sink: Sink, on_status: StatusCallback | None = None):
        self.camera_id = camera_id
        self.source = str(source)
        self.shown = urls.redact_url(self.source)
        self.live = urls.is_live(str(self.source)) if live is None else bool(live)
        self.fps, self.resolution, self.realtime, self.loop = fps, resolution, realtime, loop
        self.watchdog_s = float(watchdog_s)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = max(float(backoff_max_s), self.backoff_initial_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.sink = sink
        self.on_status = on_status
        self.stats = IngestStats()
        self.status: str | None = None
        self.detail = ""
        self.run_id = uuid.uuid4().hex
        self.seq = 0

    # -- status

    def _set_status(self, status: str, detail: str) -> None:
        detail = urls.scrub(detail, self.source)
        self.detail = detail
        if status == self.status:
            return
        self.status = status
        level = logging.INFO if status in (ONLINE, FINISHED) else logging.WARNING
        log.log(level, "camera %s %s: %s", self.camera_id, status, detail)
        if self.on_status is not None:
            self.on_status(self.camera_id, status, detail)

    # -- main loop

    def run(self, stop_event: StopEvent) -> None:
        """Ingest until the file ends, a file fails, or stop_event is set."""
        self.run_id = uuid.uuid4().hex
        self.seq = 0
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        attempt = 0
        while not stop_event.is_set():
            if attempt:
                self.stats.reconnects += 1
            attempt += 1
            outcome, detail, delivered = self._session(stop_event)
            if outcome == "stopped":
                return
            if outcome == "end" and not self.live:
                self._set_status(FINISHED, detail)
                return
            if not self.live:  # a broken file does not heal: report and give up
                self._set_status(OFFLINE, detail)
                return
            if delivered:
                backoff.reset()  # it worked for a while: retry fast
            delay = backoff.next()
            if delivered:
                self._set_status(RECONNECTING, f"{detail}; reconnecting in {delay:g}s")
            else:
                self._set_status(OFFLINE, f"{detail}; retrying in {delay:g}s")
            if stop_event.wait(delay):
                return

    def _session(self, stop_event: StopEvent) -> tuple[str, str, int]:
        """One open/read cycle: (outcome, detail, frames delivered).

        outcome: 'stopped', 'end' (source ended cleanly), 'error' (open/read failed or stalled).
        """
        reader = CameraReader(self.source, fps=self.fps, resolution=self.resolution,
                              realtime=self.realtime, loop=self.loop, live=self.live,
                              connect_timeout_s=self.connect_timeout_s,
                              read_timeout_s=self.read_timeout_s, stats=self.stats)
        items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
        thread = _ReaderThread(reader, items, drop_old=self.live)
        thread.start()
        opened = False
        delivered = 0
        waiting_since = time.monotonic()
        try:
            while True:
                if stop_event.is_set():
                    return "stopped", "", delivered
                try:
                    kind, payload = items.get(timeout=0.1)
                except queue.Empty:
                    # PyAV's own timeouts should fire first; this catches anything they miss.
                    limit = self.watchdog_s if opened else self.connect_timeout_s + self.watchdog_s
                    since = max(waiting_since, reader.paced_until)
                    if time.monotonic() - since > limit:
                        what = "stalled: no frame" if opened else "no answer"
                        return "error", f"{self.shown} {what} for {limit:g}s", delivered
                    continue
                if kind == "open":
                    opened = True
                    waiting_since = time.monotonic()
                elif kind == "frame":
                    image, source_ts = payload
                    self.stats.sampled += 1
                    frame = Frame(camera=self.camera_id, seq=self.seq, source_ts=float(source_ts),
                                  capture_ts=time.time(), image=image, run_id=self.run_id)
                    self.seq += 1
                    self.stats.last_frame_wall = frame.capture_ts
                    delivered += 1
                    self._set_status(ONLINE, f"receiving {self.shown}")
                    self.sink(frame)  # may block (backpressure); the watchdog restarts after it
                    waiting_since = time.monotonic()
                elif kind == "end":
                    if self.live:
                        return "error", f"{self.shown} ended the stream", delivered
                    errors = self.stats.decode_errors
                    note = f" ({errors} damaged packets/frames skipped)" if errors else ""
                    return "end", f"end of {self.shown}{note}", delivered
                else:  # 'error'
                    return "error", str(payload), delivered
        finally:
            reader.abort.set()  # the thread exits at its next check or PyAV timeout
            thread.join(timeout=0.2)
