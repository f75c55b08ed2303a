"""EventTracker: hysteresis, peaks, closing, flush, idempotence."""
from __future__ import annotations

import pytest

from monitor.events import Event, EventTracker
from monitor.results import FrameResult

RUN = "0123456789abcdef"
FPS = 10.0


def result(seq: int, flagged: bool, score: float | None = None, camera: str = "cam1",
           run_id: str = RUN) -> FrameResult:
    return FrameResult(camera=camera, run_id=run_id, seq=seq, source_ts=seq / FPS, capture_ts=1000.0 + seq,
                       scene="lobby", image_score=score if score is not None else (2.0 if flagged else 0.5),
                       tau=1.0, flagged=flagged, escalated=False)


def feed(tracker: EventTracker, pattern: str, start: int = 0, **kw) -> list:
    """pattern: one char per frame, 'x' flagged, '.' normal."""
    events = []
    for i, ch in enumerate(pattern):
        events += tracker.update(result(start + i, ch == "x", **kw), f"ref{start + i}")
    return events


def test_short_flagged_run_opens_nothing():
    tracker = EventTracker(open_after=3, window=5, close_after=10)
    assert feed(tracker, "..xx.....x...x....x.x...") == []
    assert not tracker.is_open("cam1")
    assert tracker.flush() == []


def test_three_of_five_opens_at_first_flagged_frame():
    tracker = EventTracker(open_after=3, window=5, close_after=10)
    events = feed(tracker, "...x.x.x")  # flags at 3, 5, 7: three within the last five frames
    assert [e.kind for e in events] == ["start"]
    start = events[0]
    assert start.start_seq == 3
    assert start.start_ts == pytest.approx(0.3)
    assert start.frames_flagged == 3
    assert start.end_seq is None and start.end_ts is None
    assert start.event_id == f"cam1-{RUN[:8]}-3"


def test_flags_spread_wider_than_window_do_not_open():
    tracker = EventTracker(open_after=3, window=5, close_after=10)
    assert feed(tracker, "x..x..x..x..x") == []


def test_peak_updates_only_when_peak_rises():
    tracker = EventTracker(open_after=3, window=5, close_after=10)
    scores = [2.0, 3.0, 2.5, 5.0, 4.0, 5.0, 6.0]
    events = []
    for seq, score in enumerate(scores):
        events += tracker.update(result(seq, True, score), f"ref{seq}")
    kinds = [e.kind for e in events]
    assert kinds == ["start", "update", "update"]  # opened at seq 2 with peak 3.0; then 5.0 (seq 3), 6.0 (seq 6)
    assert events[0].peak_score == 3.0 and events[0].peak_seq == 1 and events[0].best_overlay_ref == "ref1"
    assert events[1].peak_score == 5.0 and events[1].peak_seq == 3
    assert events[2].peak_score == 6.0 and events[2].peak_seq == 6 and events[2].best_overlay_ref == "ref6"
    assert len({e.event_id for e in events}) == 1


def test_best_overlay_skips_frames_without_overlay():
    tracker = EventTracker(open_after=1, window=1, close_after=1)
    tracker.update(result(0, True, 2.0), "ref0")
    events = tracker.update(result(1, True, 3.0), None)  # peak rises, but this frame has no overlay
    assert events[0].peak_seq == 1 and events[0].best_overlay_ref == "ref0"


def test_ten_normal_frames_close_with_duration():
    tracker = EventTracker(open_after=3, window=5, close_after=10)
    events = feed(tracker, "..xxxx.xx" + "." * 9)  # flagged 2..8 with one gap; 9 normals: still open
    assert [e.kind for e in events] == ["start"]
    assert tracker.is_open("cam1")
    events = tracker.update(result(18, False), None)  # the 10th consecutive normal frame
    assert [e.kind for e in events] == ["end"]
    end = events[0]
    assert (end.start_seq, end.end_seq) == (2, 8)
    assert end.end_ts == pytest.approx(0.8)
    assert end.duration_s == pytest.approx(0.6)
    assert end.frames_flagged == 6
    assert not tracker.is_open("cam1")
    # A later incident is a new event with its own id.
    later = feed(tracker, "xxx", start=30)
    assert [e.kind for e in later] == ["start"] and later[0].event_id == f"cam1-{RUN[:8]}-30"


def test_flush_closes_open_event():
    tracker = EventTracker()
    feed(tracker, "xxxx")
    events = tracker.flush()
    assert [(e.kind, e.start_seq, e.end_seq) for e in events] == [("end", 0, 3)]
    assert tracker.flush() == []


def test_duplicates_and_out_of_order_are_ignored():
    tracker = EventTracker(open_after=3, window=5, close_after=10)
    assert feed(tracker, "xx") == []
    assert tracker.update(result(1, True), "dup") == []  # re-delivered seq 1 must not count as a third flag
    assert tracker.update(result(0, True), "old") == []
    events = tracker.update(result(2, True), "ref2")
    assert [e.kind for e in events] == ["start"] and events[0].frames_flagged == 3
    assert tracker.update(result(2, True, 9.0), "dup") == []  # a duplicate cannot raise the peak
    assert tracker.flush()[0].peak_score == 2.0


def test_event_id_is_deterministic_across_trackers():
    ids = []
    for _ in range(2):
        tracker = EventTracker()
        ids.append([e.event_id for e in feed(tracker, "..xxx" + "." * 10)])
    assert ids[0] == ids[1] == [f"cam1-{RUN[:8]}-2"] * 2


def test_cameras_are_independent_and_new_run_closes_old_event():
    tracker = EventTracker()
    feed(tracker, "xxx", camera="a")
    assert feed(tracker, "x.x", camera="b") == []
    assert tracker.is_open("a") and not tracker.is_open("b")
    # Ingest restarted: seq starts again at 0 under a new run_id.
    events = tracker.update(result(0, False, camera="a", run_id="ffffffff0000"), None)
    assert [(e.kind, e.event_id) for e in events] == [("end", f"a-{RUN[:8]}-0")]
    # A late re-delivery from the replaced run is ignored.
    assert tracker.update(result(5, True, camera="a"), None) == []


def test_record_round_trips_and_an_unknown_kind_is_malformed():
    event = feed(EventTracker(), "xxx")[0]
    assert Event.from_record(event.to_fields()) == event
    with pytest.raises(ValueError, match="unknown event kind"):  # not an open event for the next engine to take over
        Event.from_record({**event.to_fields(), "kind": "bogus"})
