"""Result delivery on its own, against an in-memory sink that records what it was given."""
from __future__ import annotations

import threading

import pytest

from monitor.config import EventsConfig
from monitor.delivery import Abandoned, ResultDelivery
from monitor.frames import Frame
from monitor.ledger import SeqLedger
from monitor.publish import PublishError
from monitor.results import FrameResult, Media
from monitor.telemetry import EngineMetrics
from monitor.worker import EngineStats


class _Sink:
    """Keeps results and events in order; refuses a result it has, as the real publishers do."""

    def __init__(self, fail_first: int = 0):
        self.log: list[tuple] = []
        self.keys: set = set()
        self.fail_first = fail_first

    def publish_result(self, result, overlay=None, stills=None):
        if self.fail_first:
            self.fail_first -= 1
            raise PublishError("redis at redis://127.0.0.1:1/0: publish failed (ConnectionError)")
        if result.key in self.keys:
            return False
        self.keys.add(result.key)
        self.log.append(("result", result.seq))
        return True

    def publish_events(self, events):
        self.log.extend(("event", e.kind, e.start_seq) for e in events)

    def open_event(self, camera):
        return None


def _delivery(sink, **events):
    stats = EngineStats()
    config = EventsConfig(**({"open_after": 2, "window": 3, "close_after": 2} | events))
    return ResultDelivery(sink, config, EngineMetrics(), stats, SeqLedger(grace_s=1.0)), stats


def _pair(seq: int, flagged: bool):
    result = FrameResult(camera="cam", run_id="r" * 32, seq=seq, source_ts=seq / 5, capture_ts=0.0, scene="s",
                         image_score=2.0 if flagged else 0.1, tau=1.0, flagged=flagged, escalated=flagged)
    frame = Frame(camera="cam", seq=seq, source_ts=seq / 5, capture_ts=0.0, image=None, run_id="r" * 32)
    return (result, Media()), frame


def _deliver(delivery, flags, start=0):
    pairs = [_pair(start + i, f) for i, f in enumerate(flags)]
    delivery.deliver([p for p, _ in pairs], [f for _, f in pairs])


def test_an_event_goes_out_before_the_result_after_the_frame_that_opened_it():
    sink = _Sink()
    delivery, stats = _delivery(sink)
    _deliver(delivery, [False, True, True, False, False, False])
    assert sink.log == [("result", 0), ("result", 1), ("result", 2), ("event", "start", 1),
                        ("result", 3), ("result", 4), ("event", "end", 1), ("result", 5)]
    assert stats.events_started == 1


def test_a_redelivered_result_is_counted_as_duplicate_and_opens_nothing():
    sink = _Sink()
    delivery, stats = _delivery(sink)
    _deliver(delivery, [True, True])
    again, _ = _delivery(sink)  # a new engine, given the same frames again
    _deliver(again, [True, True])
    assert sink.log.count(("event", "start", 0)) == 1
    assert stats.duplicates == 0 and again.stats.duplicates == 2


def test_results_are_retried_in_order_while_the_sink_is_down(monkeypatch):
    monkeypatch.setattr("monitor.delivery.BACKOFF_START_S", 0.001)
    sink = _Sink(fail_first=3)
    delivery, stats = _delivery(sink)
    _deliver(delivery, [False, False, False])
    assert [x[1] for x in sink.log] == [0, 1, 2] and stats.publish_retries == 3


def test_a_stop_during_an_outage_abandons_the_batch():
    delivery, _ = _delivery(_Sink(fail_first=10**6))
    delivery.stopping = threading.Event()
    delivery.stopping.set()
    with pytest.raises(Abandoned):
        _deliver(delivery, [False])


def test_close_ends_what_is_open():
    sink = _Sink()
    delivery, _ = _delivery(sink)
    _deliver(delivery, [True, True])
    delivery.close()
    assert sink.log[-1] == ("event", "end", 0)
