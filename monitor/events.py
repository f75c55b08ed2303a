"""Turn per-frame flags into anomaly events (start / update / end) with hysteresis.

A single flagged frame is noise; an event opens when ``open_after`` of the last
``window`` frames were flagged, and closes after ``close_after`` consecutive
normal frames, so one blip in the middle of an incident does not split it.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from monitor.results import FrameResult, json_safe

EventKind = Literal["start", "update", "end"]
_RETIRED_RUNS_KEPT = 16  # late re-deliveries from an ingest run that has since restarted


@dataclass
class Event:
    event_id: str  # f"{camera}-{run_id[:8]}-{start_seq}": the same for every message of one event
    camera: str
    kind: EventKind
    start_seq: int
    start_ts: float  # source_ts of the first flagged frame
    end_seq: int | None  # last flagged frame; set on 'end' only
    end_ts: float | None
    peak_score: float
    peak_seq: int
    duration_s: float  # source_ts of the last flagged frame so far minus start_ts
    frames_flagged: int
    best_overlay_ref: str | None  # overlay of the highest-scoring frame that has one

    def to_json(self) -> dict:
        return json_safe(asdict(self))

    def to_fields(self) -> dict[str, str]:
        """Flat string map for XADD: None -> ''."""
        return {name: "" if value is None else (repr(value) if isinstance(value, float) else str(value))
                for name, value in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict) -> "Event":
        """An event from to_fields' strings or to_json's values; ValueError/KeyError if malformed."""
        def get(name, kind, optional=False):
            value = record[name]
            if optional and value in ("", None):
                return None
            return kind(value)

        kind = record["kind"]
        if kind not in get_args(EventKind):
            raise ValueError(f"unknown event kind {kind!r}")
        return cls(event_id=str(record["event_id"]), camera=str(record["camera"]), kind=kind,
                   start_seq=get("start_seq", int), start_ts=get("start_ts", float),
                   end_seq=get("end_seq", int, True), end_ts=get("end_ts", float, True),
                   peak_score=get("peak_score", float), peak_seq=get("peak_seq", int),
                   duration_s=get("duration_s", float), frames_flagged=get("frames_flagged", int),
                   best_overlay_ref=get("best_overlay_ref", str, True))


@dataclass
class _Sample:
    seq: int
    ts: float
    score: float
    flagged: bool
    overlay_ref: str | None


@dataclass
class _OpenEvent:
    event_id: str
    start_seq: int
    start_ts: float
    last_seq: int
    last_ts: float
    peak_score: float
    peak_seq: int
    frames_flagged: int
    best_overlay_ref: str | None
    best_overlay_score: float

    def add(self, sample: _Sample) -> bool:
        """Count a flagged frame; True when it raised the peak."""
        self.frames_flagged += 1
        self.last_seq, self.last_ts = sample.seq, sample.ts
        if sample.overlay_ref is not None and sample.score > self.best_overlay_score:
            self.best_overlay_ref, self.best_overlay_score = sample.overlay_ref, sample.score
        if sample.score > self.peak_score:
            self.peak_score, self.peak_seq = sample.score, sample.seq
            return True
        return False


@dataclass
class _CameraState:
    run_id: str
    window: deque
    last_seq: int | None = None
    open: _OpenEvent | None = None
    normal_run: int = 0
    retired_runs: deque = field(default_factory=lambda: deque(maxlen=_RETIRED_RUNS_KEPT))


class EventTracker:
    """Hysteresis event detector; keeps independent state per camera.

    Feed each camera's results in seq order. Results whose seq is not above the last
    one seen for that camera's run are ignored, so re-delivered frames are harmless.
    A new run_id for a camera (ingest restart, seq back to 0) ends the open event of
    the previous run; late results from a replaced run are ignored.
    """

    def __init__(self, open_after: int = 3, window: int = 5, close_after: int = 10):
        if not 1 <= open_after <= window:
            raise ValueError(f"need 1 <= open_after <= window, got open_after={open_after} window={window}")
        if close_after < 1:
            raise ValueError(f"close_after must be >= 1, got {close_after}")
        self.open_after = open_after
        self.window = window
        self.close_after = close_after
        self._states: dict[str, _CameraState] = {}

    def update(self, result: FrameResult, overlay_ref: str | None = None) -> list[Event]:
        camera = result.camera
        events: list[Event] = []
        state = self._states.get(camera)
        if state is None:
            state = self._states[camera] = self._new_state(result.run_id)
        elif result.run_id != state.run_id:
            if result.run_id in state.retired_runs:
                return []
            events.extend(self._close(camera, state))
            retired = state.retired_runs
            retired.append(state.run_id)
            state = self._states[camera] = self._new_state(result.run_id)
            state.retired_runs = retired
        if state.last_seq is not None and result.seq <= state.last_seq:
            return events
        state.last_seq = result.seq

        sample = _Sample(result.seq, result.source_ts, result.image_score, result.flagged,
                         overlay_ref if overlay_ref is not None else result.overlay_ref)
        if state.open is None:
            state.window.append(sample)
            flagged = [s for s in state.window if s.flagged]
            if len(flagged) >= self.open_after:
                state.open = self._open(camera, state.run_id, flagged)
                state.normal_run = 0
                events.append(self._event(camera, state.open, "start"))
        elif sample.flagged:
            state.normal_run = 0
            if state.open.add(sample):
                events.append(self._event(camera, state.open, "update"))
        else:
            state.normal_run += 1
            if state.normal_run >= self.close_after:
                events.extend(self._close(camera, state))
        return events

    def flush(self, camera: str | None = None) -> list[Event]:
        """End the open event of one camera (or of all), e.g. when a replay finishes."""
        cameras = [camera] if camera is not None else list(self._states)
        events: list[Event] = []
        for name in cameras:
            state = self._states.get(name)
            if state is not None:
                events.extend(self._close(name, state))
        return events

    def adopt(self, left_open: Event, run_id: str) -> list[Event]:
        """Take over an event that a dead engine left open on this camera.

        Of the same ingest run, it goes on (later flagged frames update it, normal ones close
        it); of an earlier run, it can never continue, so it ends now, where it was last seen.
        """
        camera = left_open.camera
        last_ts = left_open.start_ts + left_open.duration_s
        last_seq = max(left_open.start_seq, left_open.peak_seq)
        event = _OpenEvent(event_id=left_open.event_id, start_seq=left_open.start_seq, start_ts=left_open.start_ts,
                           last_seq=last_seq, last_ts=last_ts, peak_score=left_open.peak_score,
                           peak_seq=left_open.peak_seq, frames_flagged=left_open.frames_flagged,
                           best_overlay_ref=left_open.best_overlay_ref,
                           best_overlay_score=left_open.peak_score if left_open.best_overlay_ref else -math.inf)
        state = self._states.setdefault(camera, self._new_state(run_id))
        if left_open.event_id == f"{camera}-{run_id[:8]}-{left_open.start_seq}" and state.open is None:
            state.open = event
            return []
        return [self._event(camera, event, "end")]

    def is_open(self, camera: str) -> bool:
        state = self._states.get(camera)
        return state is not None and state.open is not None

    def _new_state(self, run_id: str) -> _CameraState:
        return _CameraState(run_id=run_id, window=deque(maxlen=self.window))

    @staticmethod
    def _open(camera: str, run_id: str, flagged: list[_Sample]) -> _OpenEvent:
        first = flagged[0]
        event = _OpenEvent(event_id=f"{camera}-{run_id[:8]}-{first.seq}", start_seq=first.seq,
                           start_ts=first.ts, last_seq=first.seq, last_ts=first.ts,
                           peak_score=-math.inf, peak_seq=first.seq, frames_flagged=0,
                           best_overlay_ref=None, best_overlay_score=-math.inf)
        for sample in flagged:
            event.add(sample)
        return event

    def _close(self, camera: str, state: _CameraState) -> list[Event]:
        if state.open is None:
            return []
        event = self._event(camera, state.open, "end")
        state.open = None
        state.normal_run = 0
        state.window.clear()  # the next event needs a fresh run of flags
        return [event]

    @staticmethod
    def _event(camera: str, open_event: _OpenEvent, kind: EventKind) -> Event:
        ended = kind == "end"
        return Event(event_id=open_event.event_id, camera=camera, kind=kind,
                     start_seq=open_event.start_seq, start_ts=open_event.start_ts,
                     end_seq=open_event.last_seq if ended else None,
                     end_ts=open_event.last_ts if ended else None,
                     peak_score=open_event.peak_score, peak_seq=open_event.peak_seq,
                     duration_s=open_event.last_ts - open_event.start_ts,
                     frames_flagged=open_event.frames_flagged,
                     best_overlay_ref=open_event.best_overlay_ref)
