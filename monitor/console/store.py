"""The console's in-memory view of an output folder (outputs.dir), kept current by tailing.

`FolderStore` owns reading what monitor/publish.py's DirectoryPublisher writes (results.jsonl,
events.jsonl, status.jsonl and the overlay/frame JPEGs) plus the console's own review labels
(console/labels.jsonl). Files are tailed from kept offsets, so a poll costs a few stat calls
when nothing changed; everything kept is bounded, and what the pages need (tiles, events sorted
by start, each camera's recent results) is precomputed here so that no request scans a file.
"""
from __future__ import annotations

import asyncio
import bisect
import copy
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

from monitor.frames import is_safe_name
from monitor.publish import media_path

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.jsonl"
LABELS_FILE = "console/labels.jsonl"

LABELS = ("not_anomaly", "confirmed")
REVIEW_STATES = ("unreviewed",) + LABELS

RECENT_RESULTS = 5000  # per camera: enough for the timeline and filmstrip of a recent event
FPS_WINDOW_S = 10.0
STALE_AFTER_S = 10.0  # a camera with no result for this long is shown as down
MAX_EVENTS = 50_000  # oldest (by start) forgotten beyond this: about 1 KB each
# Where a long-running engine's results.jsonl is read from at start: its last 64 MiB, about
# 100,000 results, more than the recent rings hold; older results only ever fed those rings.
RESULTS_BACKLOG_BYTES = 64 << 20
LABELS_PER_EVENT = 50
RUNS_REMEMBERED = 16  # per camera, for the drop count; older runs are folded into a sum
CHANGES_KEPT = 512  # change log entries an SSE client can catch up from
READ_CHUNK = 4 << 20  # bytes per read: a huge file is loaded without holding the lock for long

# A media ref as the publisher writes it: overlays/<camera>/[<run8>-]<seq>[-prev].jpg


class _JsonTail:
    """Reads the complete new lines of one JSON Lines file from a kept offset.

    A last line without its newline is kept back until the writer finishes it; a file that
    does not exist yet reads as empty; a file that shrank or was replaced is read again. With
    `backlog`, a file first seen larger than that is read from its last `backlog` bytes."""

    def __init__(self, path: Path, backlog: int | None = None):
        self.path = path
        self.backlog = backlog
        self.offset = 0
        self.inode: int | None = None
        self.partial = b""
        self.mid_line = False  # started inside a line: drop up to the first newline

    def read(self, max_bytes: int = READ_CHUNK) -> tuple[list[dict], bool]:
        """(records of the complete lines read, whether more bytes are waiting)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return [], False
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            first_sight = self.inode is None
            self.inode, self.offset, self.partial, self.mid_line = stat.st_ino, 0, b"", False
            if first_sight and self.backlog is not None and stat.st_size > self.backlog:
                self.offset, self.mid_line = stat.st_size - self.backlog, True
        if stat.st_size == self.offset:
            return [], False
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(min(max_bytes, stat.st_size - self.offset))
        self.offset += len(data)
        if self.mid_line:
            newline = data.find(b"\n")
            if newline < 0:
                return [], self.offset < stat.st_size
            data, self.mid_line = data[newline + 1:], False
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # b"" after a complete line, else the unfinished one
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # half a line an interrupted writer left, now followed by a newline
            if isinstance(record, dict):
                records.append(record)
        return records, self.offset < stat.st_size


class _Point:
    """One result in a camera's recent ring; the full record only where a page can show it."""

    __slots__ = ("seq", "run_id", "ts", "score", "tau", "flagged", "record")

    def __init__(self, seq, run_id, ts, score, tau, flagged, record):
        self.seq, self.run_id, self.ts, self.score = seq, run_id, ts, score
        self.tau, self.flagged, self.record = tau, flagged, record


class _Camera:
    __slots__ = ("camera", "scene", "configured", "latest", "last_result_ts", "first_result_ts", "rate_times",
                 "drops_by_run", "drops_retired", "status", "detail", "status_since", "last_event_id", "ring",
                 "flagged_overlay_ref", "image_ref")

    def __init__(self, camera: str):
        self.camera = camera
        self.scene: str | None = None
        self.configured = False
        self.latest: dict | None = None
        self.last_result_ts: float | None = None  # wall clock of the latest result
        self.first_result_ts: float | None = None
        self.rate_times: deque = deque(maxlen=4096)
        self.drops_by_run: OrderedDict[str, int] = OrderedDict()
        self.drops_retired = 0
        self.status: str | None = None
        self.detail = ""
        self.status_since: float | None = None
        self.last_event_id: str | None = None
        self.ring: deque[_Point] = deque(maxlen=RECENT_RESULTS)
        self.flagged_overlay_ref: str | None = None  # overlay of the latest flagged result that has one
        self.image_ref: str | None = None  # latest frame or overlay of any result

    @property
    def drops(self) -> int:
        return self.drops_retired + sum(self.drops_by_run.values())

    def fps(self) -> float:
        times = self.rate_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])


class _Event:
    __slots__ = ("event_id", "camera", "record", "scene", "tau", "labels")

    def __init__(self, event_id: str, camera: str, record: dict, scene: str | None, tau: float | None):
        self.event_id, self.camera, self.record = event_id, camera, record
        self.scene, self.tau = scene, tau
        self.labels: list[dict] = []

    @property
    def start_ts(self) -> float:
        return _number(self.record.get("start_ts"), 0.0)

    @property
    def is_open(self) -> bool:
        return self.record.get("kind") != "end"

    @property
    def review(self) -> str:
        return self.labels[-1]["label"] if self.labels else "unreviewed"

    @property
    def sort_key(self) -> tuple[float, str]:
        return self.start_ts, self.event_id


def _number(value, default=None):
    """A finite float from a JSON value, else default (old files lack fields; NaN came out as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def _int(value, default=0) -> int:
    number = _number(value)
    return default if number is None else int(number)


def _json_default(value):
    """numpy scalars and arrays in a feedback outcome become plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _finite(value):
    """NaN and infinities (not JSON) become None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def split_event_id(event_id: str, camera: str) -> tuple[str | None, int | None]:
    """(run_id prefix, start seq) from monitor/events.py's f"{camera}-{run_id[:8]}-{start_seq}"."""
    prefix = f"{camera}-"
    if not event_id.startswith(prefix):
        return None, None
    run, _, seq = event_id[len(prefix):].rpartition("-")
    return (run, int(seq)) if seq.isdigit() else (None, None)


class FolderStore:
    """What the console knows of one output folder; call poll() (or start()) to catch up."""

    def __init__(self, out_dir: str | Path, *, clock=time.time, results_backlog_bytes: int = RESULTS_BACKLOG_BYTES):
        self.out_dir = Path(out_dir)
        self._root = self.out_dir.resolve()
        self.clock = clock
        self.labels_path = self.out_dir / LABELS_FILE
        # Read in this order: a result is published before the events it opens, so an event
        # seen here has its results already read.
        self._tails = [(_JsonTail(self.out_dir / RESULTS_FILE, results_backlog_bytes), self._add_result),
                       (_JsonTail(self.out_dir / EVENTS_FILE), self._add_event_record),
                       (_JsonTail(self.out_dir / STATUS_FILE), self._add_status),
                       (_JsonTail(self.labels_path), self._add_label_record)]
        self._lock = threading.RLock()
        self._cameras: dict[str, _Camera] = {}
        self._events: dict[str, _Event] = {}
        self._order: list[tuple[float, str]] = []  # (start_ts, event_id), ascending
        self.version = 0
        self._changes: deque[tuple[int, frozenset, frozenset]] = deque(maxlen=CHANGES_KEPT)
        self._changed_cameras: set[str] = set()
        self._changed_events: set[str] = set()
        self._subscribers: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- reading --------------------------------------------------------------------------------

    def configure_cameras(self, cameras: dict[str, str]) -> None:
        """Cameras of the configuration (id -> scene): shown even before they publish anything."""
        with self._lock:
            for camera, scene in cameras.items():
                state = self._camera(camera)
                state.configured = True
                state.scene = state.scene or scene

    def poll(self) -> bool:
        """Read what was appended since the last poll; True if anything changed."""
        for tail, apply in self._tails:
            more = True
            while more:
                with self._lock:  # released between chunks: pages stay served during a big first load
                    records, more = tail.read()
                    for record in records:
                        try:
                            apply(record)
                        except (KeyError, TypeError, ValueError, AttributeError) as exc:
                            log.debug("skipping a malformed record in %s: %s", tail.path.name, exc)
        with self._lock:
            if not (self._changed_cameras or self._changed_events):
                return False
            self.version += 1
            self._changes.append((self.version, frozenset(self._changed_cameras), frozenset(self._changed_events)))
            self._changed_cameras.clear()
            self._changed_events.clear()
        self._notify()
        return True

    def start(self, interval_s: float = 0.2) -> None:
        """Poll in a background thread until stop()."""
        if self.running:
            return
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                try:
                    self.poll()
                except OSError as exc:  # a folder on a flaky disk: say so, keep trying
                    log.warning("console: cannot read %s: %s", self.out_dir, exc.strerror or exc)
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, name="console-store", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # --- change notification (server-sent events) -----------------------------------------------

    def subscribe(self) -> asyncio.Event:
        """An asyncio.Event of the running loop, set (thread-safely) whenever the version moves."""
        wake = asyncio.Event()
        with self._lock:
            self._subscribers[wake] = asyncio.get_running_loop()
        return wake

    def unsubscribe(self, wake: asyncio.Event) -> None:
        with self._lock:
            self._subscribers.pop(wake, None)

    def changes_since(self, version: int) -> tuple[int, set[str] | None, set[str] | None]:
        """(current version, cameras changed, events changed) since `version`; None = too far
        behind to tell, treat everything as changed."""
        with self._lock:
            if version >= self.version:
                return self.version, set(), set()
            if not self._changes or self._changes[0][0] > version + 1:
                return self.version, None, None
            cameras: set[str] = set()
            events: set[str] = set()
            for entry_version, entry_cameras, entry_events in self._changes:
                if entry_version > version:
                    cameras |= entry_cameras
                    events |= entry_events
            return self.version, cameras, events

    def _notify(self) -> None:
        with self._lock:
            subscribers = list(self._subscribers.items())
        for wake, loop in subscribers:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # its loop is closed: the client is gone
                self.unsubscribe(wake)

    # --- applying records -----------------------------------------------------------------------

    def _camera(self, camera: str) -> _Camera:
        state = self._cameras.get(camera)
        if state is None:
            state = self._cameras[camera] = _Camera(camera)
        return state

    def _add_result(self, record: dict) -> None:
        camera = record["camera"]
        if not is_safe_name(camera):
            return
        state = self._camera(camera)
        run_id = str(record.get("run_id") or "")
        seq = int(record["seq"])
        wall = _number(record.get("published_ts")) or _number(record.get("capture_ts")) or self.clock()
        rate_ts = _number(record.get("capture_ts")) or wall
        if state.rate_times and rate_ts < state.rate_times[-1]:
            state.rate_times.clear()  # a new run or a clock step: the old rate says nothing
        state.rate_times.append(rate_ts)
        while state.rate_times[-1] - state.rate_times[0] > FPS_WINDOW_S:
            state.rate_times.popleft()
        dropped = _int(record.get("dropped"))
        if run_id in state.drops_by_run:
            state.drops_by_run[run_id] = max(state.drops_by_run[run_id], dropped)
        else:
            state.drops_by_run[run_id] = dropped
            if len(state.drops_by_run) > RUNS_REMEMBERED:
                state.drops_retired += state.drops_by_run.popitem(last=False)[1]
        state.scene = record.get("scene") or state.scene
        state.latest = record
        state.last_result_ts = wall
        state.first_result_ts = state.first_result_ts or wall
        flagged = bool(record.get("flagged"))
        overlay, frame = record.get("overlay_ref"), record.get("frame_ref")
        if flagged and overlay:
            state.flagged_overlay_ref = overlay
        if frame or overlay:
            state.image_ref = frame or overlay
        keep = flagged or bool(overlay or frame or record.get("evidence"))
        state.ring.append(_Point(seq, run_id, _number(record.get("source_ts"), 0.0),
                                 _number(record.get("image_score"), 0.0), _number(record.get("tau")),
                                 flagged, record if keep else None))
        self._changed_cameras.add(camera)

    def _add_event_record(self, record: dict) -> None:
        event_id, camera = str(record["event_id"]), record["camera"]
        if not is_safe_name(camera):
            return
        float(record["start_ts"])  # a record without a start cannot be placed: KeyError/ValueError skips it
        event = self._events.get(event_id)
        if event is None:
            state = self._camera(camera)
            tau = _number(state.latest.get("tau")) if state.latest else None
            event = self._events[event_id] = _Event(event_id, camera, record, state.scene, tau)
            bisect.insort(self._order, event.sort_key)
            if len(self._order) > MAX_EVENTS:
                _, oldest = self._order.pop(0)
                self._events.pop(oldest, None)
        else:
            old_key = event.sort_key
            event.record = record  # the latest record is the event's state
            if event.sort_key != old_key:
                self._order.pop(bisect.bisect_left(self._order, old_key))
                bisect.insort(self._order, event.sort_key)
        state = self._camera(camera)
        last = self._events.get(state.last_event_id) if state.last_event_id else None
        if last is None or event.sort_key >= last.sort_key:
            state.last_event_id = event_id
        self._changed_events.add(event_id)
        self._changed_cameras.add(camera)

    def _add_status(self, record: dict) -> None:
        camera, status = record["camera"], str(record["status"])
        if not is_safe_name(camera):
            return
        state = self._camera(camera)
        ts = _number(record.get("ts")) or self.clock()
        if status != state.status:  # a repeated status is a heartbeat: "since" stays
            state.status, state.status_since = status, ts
        state.detail = str(record.get("detail") or "")[:500]  # a reason, not a log
        self._changed_cameras.add(camera)

    def _add_label_record(self, record: dict) -> None:
        if record.get("label") not in LABELS:
            return
        event = self._events.get(str(record["event_id"]))
        if event is None:
            return  # an event older than what is kept
        event.labels.append(record)
        del event.labels[:-LABELS_PER_EVENT]
        self._changed_events.add(event.event_id)

    # --- labels -----------------------------------------------------------------------------------

    def add_label(self, record: dict) -> dict:
        """Append a review label to console/labels.jsonl and apply it; returns the record written."""
        if record.get("label") not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}")
        if not isinstance(record.get("event_id"), str):
            raise ValueError("a label needs the event_id it reviews")
        record = _finite({**record, "ts": record.get("ts") or self.clock()})
        line = json.dumps(record, default=_json_default, allow_nan=False) + "\n"
        self.labels_path.parent.mkdir(parents=True, exist_ok=True)
        # One O_APPEND write per line: safe with another console on the same folder.
        fd = os.open(self.labels_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        self.poll()  # the tail applies it, exactly once
        return record

    def label_records(self) -> list[dict]:
        """Every label ever written (for export), oldest first; read from the file."""
        records: list[dict] = []
        tail = _JsonTail(self.labels_path)
        more = True
        while more:
            chunk, more = tail.read()
            records.extend(chunk)
        return records

    # --- queries ----------------------------------------------------------------------------------

    def camera_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._cameras)

    def tile(self, camera: str, now: float | None = None) -> dict | None:
        """What a camera's tile shows, as plain data."""
        now = self.clock() if now is None else now
        with self._lock:
            state = self._cameras.get(camera)
            if state is None:
                return None
            latest = state.latest or {}
            stale = state.last_result_ts is None or now - state.last_result_ts > STALE_AFTER_S
            status, since = state.status, state.status_since
            if status is None:  # no status line (an old folder): say what the results say
                status, since = ("waiting", None) if state.latest is None else ("online", state.first_result_ts)
            last_event = self._events.get(state.last_event_id) if state.last_event_id else None
            event_open = last_event is not None and last_event.is_open
            image = state.flagged_overlay_ref if event_open and state.flagged_overlay_ref else state.image_ref
            return {
                "camera": camera,
                "scene": state.scene,
                "configured": state.configured,
                "status": status,
                "status_since": since,
                "detail": state.detail,
                "fps": 0.0 if stale else state.fps(),
                "drops": state.drops,
                "down": status in ("offline", "reconnecting") or stale,
                "image_ref": image,
                "score": _number(latest.get("image_score")),
                "tau": _number(latest.get("tau")),
                "flagged": bool(latest.get("flagged")),
                "seq": latest.get("seq"),
                "last_result_ts": state.last_result_ts,
                "last_event": None if last_event is None else self._event_view(last_event),
            }

    def tiles(self, now: float | None = None) -> list[dict]:
        now = self.clock() if now is None else now
        with self._lock:
            tiles = (self.tile(camera, now) for camera in sorted(self._cameras))
            return [tile for tile in tiles if tile is not None]  # all are: the lock holds the cameras

    def event(self, event_id: str) -> dict | None:
        with self._lock:
            event = self._events.get(event_id)
            return None if event is None else self._event_view(event, labels=True)

    def events_by_id(self, event_ids) -> list[dict]:
        """Views of the given events that are known, newest start first."""
        with self._lock:
            found = [self._events[i] for i in event_ids if i in self._events]
            found.sort(key=lambda e: e.sort_key, reverse=True)
            return [self._event_view(e) for e in found]

    def query_events(self, *, camera: str | None = None, scene: str | None = None, since: float | None = None,
                     until: float | None = None, review: str | None = None, offset: int = 0,
                     limit: int = 50) -> tuple[int, list[dict]]:
        """(number matching, views of matches[offset:offset+limit]), newest start first."""
        with self._lock:
            lo = 0 if since is None else bisect.bisect_left(self._order, (since, ""))
            hi = len(self._order) if until is None else bisect.bisect_right(self._order, (until, "\uffff"))
            total, page = 0, []
            for i in range(hi - 1, lo - 1, -1):
                event = self._events[self._order[i][1]]
                if camera is not None and event.camera != camera:
                    continue
                if scene is not None and self._scene_of(event) != scene:
                    continue
                if review is not None and event.review != review:
                    continue
                if offset <= total < offset + limit:
                    page.append(event)
                total += 1
            return total, [self._event_view(e) for e in page]

    def event_results(self, event_id: str, *, flagged_only: bool = True) -> list[dict]:
        """Result records of the event's frames still in memory (flagged ones by default), by seq;
        copies, so a caller (the feedback service) cannot change what the store holds."""
        with self._lock:
            event = self._events.get(event_id)
            if event is None:
                return []
            points = self._event_points(event, margin=0)
            return [copy.deepcopy(p.record) for p in points
                    if p.record is not None and (p.flagged or not flagged_only)]

    def timeline(self, event_id: str) -> dict | None:
        """Scores around the event, for its chart: points (seq, score, flagged), span, tau."""
        with self._lock:
            event = self._events.get(event_id)
            if event is None:
                return None
            start, end = self._event_span(event)
            margin = max(25, (end - start) // 2)
            points = self._event_points(event, margin=margin)
            return {"points": [(p.seq, p.score, p.flagged) for p in points], "start_seq": start, "end_seq": end,
                    "tau": self._tau_of(event, points)}

    def media_path(self, ref) -> Path | None:
        """The file of an overlay or frame ref, or None for anything else (served as 404)."""
        path = media_path(self._root, ref) if isinstance(ref, str) else None
        return path if path is not None and path.is_file() else None

    # --- helpers (callers hold the lock) ------------------------------------------------------------

    def _scene_of(self, event: _Event) -> str | None:
        if event.scene is None:
            state = self._cameras.get(event.camera)
            event.scene = state.scene if state else None
        return event.scene

    def _event_span(self, event: _Event) -> tuple[int, int]:
        record = event.record
        start = _int(record.get("start_seq"))
        end = record.get("end_seq")
        if end is None:  # open: up to the camera's latest frame of the same run
            run, _ = split_event_id(event.event_id, event.camera)
            state = self._cameras.get(event.camera)
            end = start
            if state and state.latest and (run is None or str(state.latest.get("run_id", "")).startswith(run)):
                end = max(start, _int(state.latest.get("seq")))
        return start, int(end)

    def _event_points(self, event: _Event, margin: int) -> list[_Point]:
        state = self._cameras.get(event.camera)
        if state is None:
            return []
        run, _ = split_event_id(event.event_id, event.camera)
        start, end = self._event_span(event)
        lo, hi = start - margin, end + margin
        points = [p for p in state.ring if lo <= p.seq <= hi and (run is None or p.run_id.startswith(run))]
        points.sort(key=lambda p: p.seq)
        return points

    def _tau_of(self, event: _Event, points: list[_Point] | None = None) -> float | None:
        peak_seq = event.record.get("peak_seq")
        for point in points or ():
            if point.seq == peak_seq and point.tau is not None:
                return point.tau
        return event.tau

    def _event_view(self, event: _Event, labels: bool = False) -> dict:
        record = event.record
        peak = _number(record.get("peak_score"))
        tau = event.tau
        view = {
            "event_id": event.event_id,
            "camera": event.camera,
            "scene": self._scene_of(event),
            "kind": record.get("kind"),
            "open": event.is_open,
            "start_seq": record.get("start_seq"),
            "start_ts": event.start_ts,
            "end_seq": record.get("end_seq"),
            "end_ts": _number(record.get("end_ts")),
            "peak_score": peak,
            "peak_seq": record.get("peak_seq"),
            "duration_s": _number(record.get("duration_s"), 0.0),
            "frames_flagged": _int(record.get("frames_flagged")),
            "best_overlay_ref": record.get("best_overlay_ref"),
            "tau": tau,
            "peak_over_tau": peak / tau if peak is not None and tau else None,
            "review": event.review,
            "record": record,
        }
        if labels:
            view["labels"] = list(event.labels)
        return view
