"""Delivering a batch's results: publish each in order with the events it opens or closes,
retrying while the sink is down.

Publishing is idempotent (the publisher refuses a result it already has), so a retry or a
re-delivered frame is harmless. A stop requested during an outage raises Abandoned: the
caller leaves the batch unacknowledged for the next engine.
"""
from __future__ import annotations

import logging
import time

from .events import Event, EventTracker
from .ledger import SeqLedger
from .publish import PublishError
from .results import FrameResult, Media
from .retry import Backoff
from .telemetry import EngineMetrics

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0


class Abandoned(Exception):
    """Stop was requested while the sink was down; the batch stays unacknowledged."""


class ResultDelivery:
    def __init__(self, publisher, events_config, metrics: EngineMetrics, stats, ledger: SeqLedger):
        self.publisher = publisher
        self.events_config = events_config
        self.metrics = metrics
        self.stats = stats  # EngineStats
        self.ledger = ledger  # sees every published frame's sequence number
        self.stopping = None  # an Event: while it is set, an outage abandons the batch
        self._trackers: dict[str, EventTracker] = {}
        self._inherited: dict[str, list] = {}  # camera -> the end of an event a dead engine left open

    def deliver(self, results: list[tuple[FrameResult, Media]], frames) -> None:
        """Publish results[i] (with its overlay and stills) for frames[i], in order."""
        i, events = 0, list[Event]()
        backoff = Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        while i < len(results) or events:
            try:
                if events:  # before the next result: keeps events in order
                    self.publisher.publish_events(events)
                    self.stats.events_started += sum(e.kind == "start" for e in events)
                    self.metrics.observe_events(events)
                    events = []
                if i < len(results):
                    result, media = results[i]
                    tracker = self._tracker(result)
                    if self.publisher.publish_result(result, media.overlay, media.stills):
                        self.metrics.observe_result(result)
                        if not result.late:  # a late frame would reopen what its successors closed
                            events = tracker.update(result, result.overlay_ref)
                    else:  # published before a crash: its events went out with it
                        self.stats.duplicates += 1
                        self.metrics.observe_duplicate(result.camera)
                    frame = frames[i]
                    self.ledger.observe(frame.camera, frame.run_id, frame.seq, frame.dropped_before, time.monotonic())
                    events = self._inherited.pop(result.camera, []) + events
                    i += 1
                backoff.reset()
            except PublishError as exc:
                # Keep the frames unacked and retry: nothing accepted is lost while the sink is down.
                self.stats.publish_retries += 1
                if self.stopping is not None and self.stopping.is_set():
                    raise Abandoned() from None
                delay = backoff.next()
                log.warning("publishing failed, retrying in %.1fs: %s", delay, exc)
                if self.stopping is not None:
                    self.stopping.wait(delay)
                else:
                    time.sleep(delay)

    def _tracker(self, result: FrameResult) -> EventTracker:
        """The camera's event tracker. The first time, an event a dead engine left open on the
        camera is taken over (same ingest run) or ended (its end waits in _inherited)."""
        camera = result.camera
        if camera in self._trackers:
            return self._trackers[camera]
        ev = self.events_config
        tracker = EventTracker(ev.open_after, ev.window, ev.close_after)
        left_open = self.publisher.open_event(camera)  # may raise PublishError: retried with the result
        if left_open is not None:
            self._inherited[camera] = tracker.adopt(left_open, result.run_id)
            log.info("camera %s: %s the event %s a previous engine left open", camera,
                     "ended" if self._inherited[camera] else "took over", left_open.event_id)
        self._trackers[camera] = tracker
        return tracker

    def forget(self, camera: str) -> None:
        """Drop the camera's event state without ending its event: the camera's new engine takes
        the event over from what was published."""
        self._trackers.pop(camera, None)
        self._inherited.pop(camera, None)

    def close(self) -> None:
        """End open events (a stopped engine cannot see them end)."""
        events = [e for tracker in self._trackers.values() for e in tracker.flush()]
        if events:
            try:
                self.publisher.publish_events(events)
                self.metrics.observe_events(events)
            except PublishError as exc:
                log.warning("could not publish the end of %d open event(s): %s", len(events), exc)
