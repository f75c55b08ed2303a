"""Sinks for results, events and status: Redis streams, a plain directory, or both.

All publishers share the method names publish_result / publish_events /
publish_status / close, so the service can fan out with MultiPublisher.
"""
from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, cast

import numpy as np

from engine.errors import ConfigError, SpadeError
from engine.preprocess import encode_jpeg
from engine.visualize import heatmap_overlay
from monitor.events import Event
from monitor.frames import NAME_RULE, is_safe_name
from monitor.results import FrameResult, Stills
from monitor.timelines import ScoreTimelines
from monitor.urls import redact_url, scrub

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

STATUS_MAXLEN = 1000  # status messages are a heartbeat log; a short tail is enough


def _entry(fields: dict[str, str]) -> dict[FieldT, EncodableT]:
    """A stream entry as redis-py's XADD types it (its dict type is invariant)."""
    return cast("dict[FieldT, EncodableT]", fields)


class PublishError(SpadeError):
    """A sink is unreachable or refused a write; the caller keeps the frame unacked and retries."""


class Publisher(Protocol):
    def publish_result(self, result: FrameResult, overlay_jpeg: bytes | None = None,
                       stills: Stills | None = None) -> bool: ...
    def publish_events(self, events: Iterable[Event]) -> None: ...
    def publish_status(self, camera: str, status: str, detail: str = "") -> None: ...
    def open_event(self, camera: str) -> Event | None:
        """The camera's last published event if it never ended (its engine died), else None."""
        ...
    def close(self) -> None: ...


def encode_overlay(frame_rgb: np.ndarray, amap: np.ndarray, theta: float | None, quality: int = 85) -> bytes:
    """JPEG of the anomaly heat map blended over the frame, regions > theta outlined."""
    return encode_jpeg(heatmap_overlay(frame_rgb, amap, threshold=theta), quality)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def _unended(record: dict) -> Event | None:
    """The event a record describes if it is a start or an update (not ended), else None."""
    try:
        event = Event.from_record(record)
    except (KeyError, ValueError, TypeError):
        return None  # an unreadable record: nothing to take over
    return None if event.kind == "end" else event


def _check_name(camera: str) -> None:
    if not is_safe_name(camera):
        raise ValueError(f"camera name {camera!r} is not safe for keys and paths: use {NAME_RULE}")


# Dedupe guard and publication in one atomic step: a re-processed frame (engine
# crashed before its ack) finds the guard set and adds nothing. A MULTI cannot
# branch on SET NX's answer, hence a script.
# Overlays of a camera are also listed, oldest first, so that only the newest few are kept.
#   KEYS: dedupe, results stream, [overlay, overlay list]
#   ARGV: dedupe ttl, maxlen, overlay ttl, jpeg, overlays kept per camera, field, value, ...
_PUBLISH_RESULT_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return false
end
if #KEYS >= 4 then
  redis.call('SETEX', KEYS[3], ARGV[3], ARGV[4])
  redis.call('RPUSH', KEYS[4], KEYS[3])
  while redis.call('LLEN', KEYS[4]) > tonumber(ARGV[5]) do
    redis.call('DEL', redis.call('LPOP', KEYS[4]))
  end
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
local cmd = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
for i = 6, #ARGV do
  cmd[#cmd + 1] = ARGV[i]
end
return redis.call(unpack(cmd))
"""


class RedisPublisher:
    """Streams results:<camera>, events:<camera>, status:<camera>; overlays as expiring keys.

    Every Redis failure surfaces as a one-line PublishError naming the server
    without credentials. Connections are re-made on the next call after an outage.
    """

    def __init__(self, url: str, *, stream_maxlen: int = 10000, overlay_ttl_s: int = 3600,
                 overlays_per_camera: int = 500, dedupe_ttl_s: int = 3600, connect_timeout_s: float = 2.0,
                 op_timeout_s: float = 5.0):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = redact_url(url)
        self._url_with_secret = url  # only to scrub it out of error messages
        self.stream_maxlen = int(stream_maxlen)
        self.overlay_ttl_s = int(overlay_ttl_s)
        self.overlays_per_camera = int(overlays_per_camera)
        self.dedupe_ttl_s = int(dedupe_ttl_s)
        try:
            # Few, short retries: the caller keeps the frame unacked and retries anyway,
            # and redis-py's default (10 retries) would stall the pipeline during an outage.
            self._client = redis.Redis.from_url(
                url, socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))
        except ValueError as exc:
            raise ConfigError(f"bad redis URL {self.url}: {self._scrub(str(exc))}") from None
        self._publish_script = self._client.register_script(_PUBLISH_RESULT_LUA)
        self._closed = False

    def publish_result(self, result: FrameResult, overlay_jpeg: bytes | None = None,
                       stills: Stills | None = None) -> bool:
        """Add the result (and overlay) once per (camera, run_id, seq); False if already published.
        Stills stay in outputs.dir: the console reads them there."""
        import redis

        camera = result.camera
        _check_name(camera)
        tag = f"{camera}:{result.run_id}:{result.seq}"
        keys = [f"dedupe:{tag}", f"results:{camera}"]
        if overlay_jpeg is not None:
            keys += [f"overlay:{tag}", f"overlays:{camera}"]
            result.overlay_ref = keys[2]
        result.published_ts = time.time()
        args: list = [self.dedupe_ttl_s, self.stream_maxlen, self.overlay_ttl_s, overlay_jpeg or b"",
                      self.overlays_per_camera]
        for name, value in result.to_fields().items():
            args.extend((name, value))
        try:
            entry_id = self._publish_script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise self._error(f"publishing result {tag}", exc) from None
        return entry_id is not None

    def open_event(self, camera: str) -> Event | None:
        import redis

        _check_name(camera)
        try:
            last = self._client.xrevrange(f"events:{camera}", count=1)
        except redis.RedisError as exc:
            raise self._error(f"reading the last event of {camera}", exc) from None
        if not last:
            return None
        entry = cast("dict[bytes, bytes]", last[0][1])  # the client returns bytes (no decode_responses)
        fields = {k.decode(): v.decode(errors="replace") for k, v in entry.items()}
        return _unended(fields)

    def publish_events(self, events: Iterable[Event]) -> None:
        import redis

        events = list(events)
        if not events:
            return
        pipe = self._client.pipeline(transaction=True)
        for event in events:
            _check_name(event.camera)
            pipe.xadd(f"events:{event.camera}", _entry(event.to_fields()), maxlen=self.stream_maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise self._error(f"publishing {len(events)} event(s)", exc) from None

    def publish_status(self, camera: str, status: str, detail: str = "") -> None:
        import redis

        _check_name(camera)
        fields = {"camera": camera, "status": status, "detail": detail, "ts": repr(time.time())}
        try:
            self._client.xadd(f"status:{camera}", _entry(fields), maxlen=min(STATUS_MAXLEN, self.stream_maxlen),
                              approximate=True)
        except redis.RedisError as exc:
            raise self._error(f"publishing status of {camera}", exc) from None

    def ping(self) -> bool:
        import redis

        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def wait_until_up(self, timeout: float, interval: float = 0.2) -> bool:
        """Poll until the server answers PING or ``timeout`` seconds pass; True if it is up."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ping():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    def _scrub(self, text: str) -> str:
        return scrub(text, self._url_with_secret)

    def _error(self, action: str, exc: Exception) -> PublishError:
        return PublishError(f"redis at {self.url}: {action} failed ({type(exc).__name__}: "
                            f"{self._scrub(str(exc))}); check that redis is running and reachable")


def _json_lines(path: Path) -> Iterable[dict]:
    """The JSON objects of a JSON Lines file, skipping a line an interrupted run left truncated."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


class RecentKeys:
    """Membership of the last `maxlen` keys added: a dedupe window of bounded size."""

    def __init__(self, maxlen: int):
        self._order: deque = deque()
        self._keys: set = set()
        self.maxlen = maxlen

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.maxlen:
            self._keys.discard(self._order.popleft())


class StatusFile:
    """The writer of status.jsonl: DirectoryPublisher's, and on its own the sink of ingest
    processes, whose engine owns the rest of outputs.dir. Each line is one O_APPEND write, so
    several processes can share the file."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "status.jsonl"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PublishError(f"cannot write to output folder {self.path.parent}: {exc.strerror or exc}") from None

    def publish_status(self, camera: str, status: str, detail: str = "") -> None:
        line = json.dumps({"camera": camera, "status": status, "detail": detail, "ts": time.time()}) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError as exc:
            raise PublishError(f"cannot write status to {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


# The run prefix is optional: folders written before it was added name files by seq alone.
_MEDIA_REF = re.compile(r"(overlays|frames)/([^/]+)/((?:[0-9A-Za-z]+-)?[0-9]+(?:-prev)?)\.jpg", re.ASCII)


def media_path(out_dir: str | Path, ref: str) -> Path | None:
    """The file of a media ref DirectoryPublisher writes (overlays/<camera>/<run>-<seq>.jpg,
    frames/<camera>/<run>-<seq>[-prev].jpg), or None for anything else: refs come back from
    browsers and streams, so they are never used as paths unchecked."""
    match = _MEDIA_REF.fullmatch(ref or "")
    if match is None or not is_safe_name(match.group(2)):
        return None
    base = Path(out_dir).resolve()
    path = (base / ref).resolve()
    return path if path.is_relative_to(base) else None


class DirectoryPublisher:
    """Offline sink: results.jsonl, events.jsonl, status.jsonl, overlays/<camera>/<run>-<seq>.jpg,
    frames/<camera>/<run>-<seq>[-prev].jpg (stills of flagged frames),
    and timeline_<camera>.png at close() (monitor/timelines.py draws them).

    Files are appended to and flushed per line, so an interrupted replay keeps what it
    wrote; results already in results.jsonl are not written again (same dedupe as Redis).
    """

    # Bounds that keep a long-running engine's memory flat: re-deliveries come within minutes
    # (claim_idle_s), and a timeline of more points than this is unreadable anyway.
    DEDUPE_WINDOW = 50_000  # most recent results remembered for the dedupe, all cameras
    TIMELINE_POINTS = 20_000  # most recent scores per camera drawn in its timeline

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._seen = RecentKeys(self.DEDUPE_WINDOW)
        self._last_event: dict[str, dict] = {}  # camera -> its last event record
        self._timelines = ScoreTimelines(self.TIMELINE_POINTS)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._load_existing(self.out_dir / "results.jsonl")
            self._load_last_events(self.out_dir / "events.jsonl")
            self._results = self._open("results.jsonl")
            self._events = self._open("events.jsonl")
            self._status = StatusFile(self.out_dir)
        except OSError as exc:
            raise PublishError(f"cannot write to output folder {self.out_dir}: {exc.strerror or exc}") from None
        self._closed = False

    def publish_result(self, result: FrameResult, overlay_jpeg: bytes | None = None,
                       stills: Stills | None = None) -> bool:
        _check_name(result.camera)
        if result.key in self._seen:
            return False
        # Files before the line, so no line points at a missing file. The run is in the name:
        # a restarted camera counts its frames from 0 again.
        name = f"{result.run_id[:8] or 'run'}-{result.seq}"
        try:
            if overlay_jpeg is not None:
                result.overlay_ref = self._write_file(f"overlays/{result.camera}/{name}.jpg", overlay_jpeg)
            if stills is not None:
                result.frame_ref = self._write_file(f"frames/{result.camera}/{name}.jpg", stills.frame)
                if stills.previous is not None:
                    result.previous_ref = self._write_file(f"frames/{result.camera}/{name}-prev.jpg", stills.previous)
            result.published_ts = time.time()
            self._write(self._results, result.to_json())
        except OSError as exc:
            raise PublishError(f"cannot write result {result.camera}/{result.seq} to {self.out_dir}: "
                               f"{exc.strerror or exc}") from None
        self._seen.add(result.key)
        self._timelines.add(result.camera, result.run_id, result.seq, result.image_score, result.flagged, result.tau)
        return True

    def open_event(self, camera: str) -> Event | None:
        record = self._last_event.get(camera)
        return None if record is None else _unended(record)

    def publish_events(self, events: Iterable[Event]) -> None:
        try:
            for event in events:
                record = event.to_json()
                self._write(self._events, record)
                self._last_event[event.camera] = record
        except OSError as exc:
            raise PublishError(f"cannot write events to {self.out_dir}: {exc.strerror or exc}") from None

    def publish_status(self, camera: str, status: str, detail: str = "") -> None:
        self._status.publish_status(camera, status, detail)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._results, self._events):
            handle.close()
        self._timelines.save(self.out_dir)

    def _write_file(self, ref: str, data: bytes) -> str:
        path = self.out_dir / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return ref

    def _open(self, name: str) -> IO[str]:
        path = self.out_dir / name
        handle = path.open("a", encoding="utf-8")
        if path.stat().st_size and not _ends_with_newline(path):
            handle.write("\n")  # an interrupted write left half a line; keep the next one whole
            handle.flush()
        return handle

    @staticmethod
    def _write(handle: IO[str], record: dict) -> None:
        handle.write(json.dumps(record, allow_nan=False) + "\n")
        handle.flush()

    def _load_last_events(self, path: Path) -> None:
        for record in _json_lines(path):
            if "camera" in record:
                self._last_event[str(record["camera"])] = record

    def _load_existing(self, path: Path) -> None:
        for rec in _json_lines(path):
            try:
                key = (rec["camera"], rec["run_id"], int(rec["seq"]))
                score = rec["image_score"]
                sample = (float("nan") if score is None else float(score), bool(rec["flagged"]),
                          float("nan") if rec["tau"] is None else float(rec["tau"]))
            except (ValueError, KeyError, TypeError):
                continue
            if key not in self._seen:
                self._seen.add(key)
                self._timelines.add(key[0], key[1], key[2], *sample)

class MultiPublisher:
    """Fans every call out to several publishers, in order; the first one's overlay_ref is kept."""

    def __init__(self, publishers: Sequence[Publisher]):
        if not publishers:
            raise ValueError("MultiPublisher needs at least one publisher")
        self.publishers = list(publishers)

    def publish_result(self, result: FrameResult, overlay_jpeg: bytes | None = None,
                       stills: Stills | None = None) -> bool:
        published = False
        primary_ref = None
        for i, publisher in enumerate(self.publishers):
            published = publisher.publish_result(result, overlay_jpeg, stills) or published
            if i == 0:
                primary_ref = result.overlay_ref
        result.overlay_ref = primary_ref
        return published

    def publish_events(self, events: Iterable[Event]) -> None:
        events = list(events)
        for publisher in self.publishers:
            publisher.publish_events(events)

    def publish_status(self, camera: str, status: str, detail: str = "") -> None:
        for publisher in self.publishers:
            publisher.publish_status(camera, status, detail)

    def open_event(self, camera: str) -> Event | None:
        return next((e for p in self.publishers if (e := p.open_event(camera)) is not None), None)

    def close(self) -> None:
        # Close every sink even if one fails, then report the first failure.
        first_error: Exception | None = None
        for publisher in self.publishers:
            try:
                publisher.close()
            except Exception as exc:  # noqa: BLE001 - re-raised below
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
