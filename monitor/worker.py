"""The engine worker: batches frames from every camera, gates them, escalates, publishes, acks.

One backbone pass serves every frame of a batch whose scenes share a model and input size.
A frame is acknowledged on the bus only after its result is published, so a crash between
the two re-delivers it; the publisher's dedupe guard makes the second publication harmless.
While a sink is down, publishing is retried and nothing is acked; a stop during the outage
abandons the batch unacked, so a Redis bus re-delivers it to the next engine.

The loop (step/run) also claims frames a dead engine left pending (every claim_idle_s) and
reloads scene banks whose file changed (every RELOAD_EVERY_S).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from engine.backbones import Features

from .events import EventTracker
from .frames import Frame
from .ledger import SeqLedger
from .metrics import EngineMetrics
from .publish import PublishError, encode_overlay
from .results import FrameResult, regions_from_map
from .retry import Backoff
from .scenes import SceneSet

log = logging.getLogger(__name__)

RELOAD_EVERY_S = 5.0
STATS_EVERY_S = 30.0
PUBLISH_BACKOFF_START_S = 0.2
PUBLISH_BACKOFF_MAX_S = 5.0


def _camera_of(msg) -> str:
    """The camera of a bus message, also for a corrupt one (Redis ids are '<camera>/<entry id>')."""
    if msg.frame is not None:
        return msg.frame.camera
    return msg.id.split("/", 1)[0] if "/" in msg.id else "unknown"


class _Abandoned(Exception):
    """Internal: stop was requested while the sink was down; the batch stays unacked."""


@dataclass
class EngineStats:
    batches: int = 0
    frames: int = 0
    escalated: int = 0
    flagged: int = 0
    corrupt: int = 0
    unknown_camera: int = 0
    failed: int = 0  # frames of batches that raised: acked as skipped so they cannot wedge the stream
    claimed: int = 0  # frames taken over from a dead engine
    abandoned: int = 0  # frames left unacked at a stop during a sink outage
    duplicates: int = 0  # re-delivered frames whose result the publisher already had
    lost: int = 0  # frames missing from their camera's sequence and never counted as dropped
    events_started: int = 0
    publish_retries: int = 0
    stage_seconds: dict = field(default_factory=lambda: defaultdict(float))


class EngineWorker:
    def __init__(self, config, bus, publisher, metrics: EngineMetrics | None = None):
        if config.engine.threads:
            torch.set_num_threads(config.engine.threads)
        self.config = config
        self.bus = bus
        self.publisher = publisher
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.stats = EngineStats()
        self.scenes = SceneSet(config, self.metrics)
        self._trackers: dict[str, EventTracker] = {}
        self._inherited: dict[str, list] = {}  # camera -> the end of an event a dead engine left open
        self._previous: dict = {}  # camera -> pyramid of its last frame, for temporal features
        # Frames a Redis data loss took are counted once a dead engine's frames had time to be claimed.
        self.ledger = SeqLedger(grace_s=2 * config.engine.claim_idle_s)
        self._data_losses = 0  # the bus's count of Redis data losses, as last seen
        self.camera_scene = {cid: cam.scene for cid, cam in config.cameras.items() if cam.enabled}
        self.stopping = None  # an Event; set by run(), checked while publishing is being retried
        now = time.monotonic()
        self._next_claim = now  # claim at once: a previous engine may have died with frames pending
        self._next_reload = now + RELOAD_EVERY_S
        self._next_stats = now + STATS_EVERY_S
        self._stats_mark = (now, 0)
        self.scenes.load()

    @property
    def device(self) -> str:
        """Where the models run ('cpu', 'cuda:0'): the label of the memory metric."""
        return str(next(iter(self.scenes.values())).model.device) if self.scenes else "cpu"

    # -- the loop -------------------------------------------------------------------------------
    def recover_pending(self, min_idle_s: float = 0.0) -> int:
        """Process frames a dead engine left unacknowledged; returns how many."""
        total = 0
        while True:
            msgs = self.bus.claim_stale(min_idle_s)
            if not msgs:
                return total
            log.info("claimed %d frame(s) a previous engine left unacknowledged", len(msgs))
            self.stats.claimed += len(msgs)
            self._process_safely(msgs, late=True)
            total += len(msgs)

    def step(self, max_wait_s: float | None = None) -> int:
        """One batch plus due housekeeping; returns the number of frames taken off the bus."""
        eng = self.config.engine
        now = time.monotonic()
        taken = 0
        self.metrics.update(self.bus, self.device)
        if now >= self._next_claim:
            self._next_claim = now + max(0.5, eng.claim_idle_s)
            taken += self.recover_pending(eng.claim_idle_s)
        if now >= self._next_reload:
            self._next_reload = now + RELOAD_EVERY_S
            self.scenes.reload_changed()  # logs each reload
        wait = eng.max_wait_ms / 1000.0 if max_wait_s is None else max_wait_s
        msgs = self.bus.get_batch(eng.max_batch, wait)
        if msgs:
            self._process_safely(msgs)
            taken += len(msgs)
        self._count_lost(now)
        if now >= self._next_stats:
            self._next_stats = now + STATS_EVERY_S
            self.log_stats()
        return taken

    def _count_lost(self, now: float, final: bool = False) -> None:
        losses = self.bus.data_losses
        if losses != self._data_losses:
            self._data_losses = losses
            self.ledger.note_data_loss(self.bus.intact_until, now)
        for camera, n in self.ledger.settle(now, final):
            self.stats.lost += n
            self.metrics.observe_drop(camera, "lost", n)
            log.warning("camera %s: %d frame(s) never reached the engine and were not counted as dropped "
                        "(lost on the bus, e.g. Redis restarted without them)", camera, n)

    def run(self, stop, drain_s: float | None = 0.0) -> None:
        """Process until stop is set, then drain for up to drain_s seconds (None: until empty)."""
        self.stopping = stop
        while not stop.is_set():
            self.step()
        self.drain(limit_s=drain_s)

    def drain(self, idle_s: float = 0.5, limit_s: float | None = None,
              claim_idle_s: float | None = None) -> int:
        """Process what is still on the bus (ingest has stopped); stop when it stays empty for
        idle_s, or after limit_s. With claim_idle_s, frames other consumers left pending that
        long (a dead engine's) are taken over too. Returns the number of frames processed."""
        eng = self.config.engine
        deadline = None if limit_s is None else time.monotonic() + limit_s
        total = 0
        while deadline is None or time.monotonic() < deadline:
            msgs = self.bus.get_batch(eng.max_batch, idle_s)
            if msgs:
                self._process_safely(msgs)
                total += len(msgs)
            elif claim_idle_s is None or not (claimed := self.recover_pending(claim_idle_s)):
                break
            else:
                total += claimed
        if claim_idle_s is not None:  # nothing is pending anywhere: a noted loss can be counted now
            self._count_lost(time.monotonic(), final=True)
        return total

    def _process_safely(self, msgs, late: bool = False) -> None:
        try:
            self.process(msgs, late=late)
        except _Abandoned:
            self.stats.abandoned += len(msgs)
            log.warning("stopping while results cannot be published: %d frame(s) left unacknowledged "
                        "for the next engine", len(msgs))
        except Exception as exc:  # a bug or a bad frame must not take every camera down
            self.stats.failed += len(msgs)
            for m in msgs:
                self.metrics.observe_drop(_camera_of(m), "failed")
            log.error("a batch of %d frame(s) failed and was skipped: %s: %s", len(msgs),
                      type(exc).__name__, " ".join(str(exc).split())[:300])
            log.debug("batch failure", exc_info=True)
            self.bus.ack([m.id for m in msgs])

    def log_stats(self) -> None:
        s = self.stats
        now = time.monotonic()
        t0, n0 = self._stats_mark
        self._stats_mark = (now, s.frames)
        rate = (s.frames - n0) / (now - t0) if now > t0 else 0.0
        log.info("engine: %d frames (%.1f/s lately), %d flagged, %d escalated, %d events, %d corrupt, "
                 "%d failed, %d claimed, %d lost", s.frames, rate, s.flagged, s.escalated, s.events_started,
                 s.corrupt, s.failed, s.claimed, s.lost)

    def process(self, msgs, late: bool = False) -> list[FrameResult]:
        """Score, publish and ack a batch. late: frames claimed from a dead engine, which later
        frames of their camera may already have passed, so they touch no per-camera state."""
        t_start, wall_start = time.perf_counter(), time.time()
        stages_before = dict(self.stats.stage_seconds)
        good, ack_now = [], []
        for m in msgs:
            if m.frame is None:
                self.stats.corrupt += 1
                log.warning("skipped a corrupt frame: %s", m.error)
                self.metrics.observe_drop(_camera_of(m), "corrupt")
                ack_now.append(m.id)
            elif self.camera_scene.get(m.frame.camera) not in self.scenes:
                self.stats.unknown_camera += 1
                ack_now.append(m.id)
            else:
                good.append(m)
        results = self._score([m.frame for m in good], late) if good else []
        self._publish(results, good)
        self.bus.ack(ack_now + [m.id for m in good])
        self.stats.batches += 1
        self.stats.frames += len(good)
        self.stats.stage_seconds["batch"] += time.perf_counter() - t_start
        stages = {k: v - stages_before.get(k, 0.0) for k, v in self.stats.stage_seconds.items()
                  if k != "batch" and v != stages_before.get(k, 0.0)}
        self.metrics.observe_batch(len(good), stages, [max(0.0, wall_start - m.frame.capture_ts) for m in good])
        return results

    def _score(self, frames: list[Frame], late: bool = False) -> list[tuple[FrameResult, bytes | None]]:
        groups: dict[tuple, list[int]] = defaultdict(list)  # frames by the backbone pass they share
        for i, f in enumerate(frames):
            scene = self.scenes[self.camera_scene[f.camera]]
            groups[scene.model.pass_key(scene.bank)].append(i)
        out: list = [None] * len(frames)
        for idx in groups.values():
            first = self.scenes[self.camera_scene[frames[idx[0]].camera]]
            t0 = time.perf_counter()
            # Late frames find their predecessors in their own batch only, and leave the context alone.
            feats = first.model.features([frames[i].image for i in idx], first.model.bank_preprocess(first.bank),
                                         streams=[frames[i].camera for i in idx],
                                         context={} if late else self._previous)
            self.stats.stage_seconds["backbone"] += time.perf_counter() - t0
            by_scene: dict[str, list[int]] = defaultdict(list)
            for j, i in enumerate(idx):
                by_scene[self.camera_scene[frames[i].camera]].append(j)
            for scene_name, rows in by_scene.items():
                scene = self.scenes[scene_name]
                sel = torch.tensor(rows, device=feats.global_.device)
                sub = Features(global_=feats.global_[sel], pyramid={k: v[sel] for k, v in feats.pyramid.items()})
                for j, res in zip(rows, self._score_scene(scene, [frames[idx[r]] for r in rows], sub, late)):
                    out[idx[j]] = res
        return out

    def _score_scene(self, scene, frames: list[Frame], feats: Features, late: bool = False):
        eng = self.config.engine
        th = scene.thresholds
        res = scene.model.score_features(feats, scene.bank, maps=eng.escalate, tau=th.gate_tau)
        self.stats.stage_seconds["gate"] += res.gate_seconds
        if res.map_rows:  # batches without escalations would pull the stage's quantiles to zero
            self.stats.stage_seconds["pixel_matching"] += res.match_seconds
        maps = dict(zip(res.map_rows, res.maps if res.maps is not None else []))
        results = []
        for i, frame in enumerate(frames):
            amap = maps.get(i)
            raw = float(res.image_scores[i])
            score, flagged = scene.scorer.alone(raw) if late else scene.scorer(frame.camera, raw)
            result = FrameResult(
                camera=frame.camera, run_id=frame.run_id, seq=frame.seq, source_ts=frame.source_ts,
                capture_ts=frame.capture_ts, published_ts=None, scene=scene.name, image_score=score,
                tau=th.tau, flagged=flagged, escalated=amap is not None,
                max_pixel_score=None, theta=th.theta, anomalous_area=None, boxes=[], overlay_ref=None, late=late,
            )
            overlay = None
            if amap is not None:
                result.max_pixel_score = float(amap.max())
                result.anomalous_area, result.boxes = regions_from_map(amap, th.theta, frame.image.shape[:2])
                if result.flagged and self.config.outputs.overlays:
                    t1 = time.perf_counter()
                    image = scene.model.bank_preprocess(scene.bank).frame(frame.image)
                    overlay = encode_overlay(image, amap, th.theta)
                    self.stats.stage_seconds["overlay"] += time.perf_counter() - t1
            self.stats.escalated += amap is not None
            self.stats.flagged += result.flagged
            results.append((result, overlay))
        return results

    def _publish(self, results, msgs) -> None:
        t0 = time.perf_counter()
        i, events = 0, []
        backoff = Backoff(PUBLISH_BACKOFF_START_S, PUBLISH_BACKOFF_MAX_S)
        while i < len(results) or events:
            try:
                if events:  # before the next result: keeps events in order
                    self.publisher.publish_events(events)
                    self.stats.events_started += sum(e.kind == "start" for e in events)
                    self.metrics.observe_events(events)
                    events = []
                if i < len(results):
                    result, overlay = results[i]
                    tracker = self._tracker(result)
                    if self.publisher.publish_result(result, overlay):  # idempotent, so safe to retry
                        self.metrics.observe_result(result)
                        if not result.late:  # a late frame would reopen what its successors closed
                            events = tracker.update(result, result.overlay_ref)
                    else:  # published before a crash: its events went out with it
                        self.stats.duplicates += 1
                        self.metrics.observe_duplicate(result.camera)
                    frame = msgs[i].frame
                    self.ledger.observe(frame.camera, frame.run_id, frame.seq, frame.dropped_before, time.monotonic())
                    events = self._inherited.pop(result.camera, []) + events
                    i += 1
                backoff.reset()
            except PublishError as exc:
                # Keep the frames unacked and retry: nothing accepted is lost while Redis is down.
                self.stats.publish_retries += 1
                if self.stopping is not None and self.stopping.is_set():
                    raise _Abandoned() from None
                delay = backoff.next()
                log.warning("publishing failed, retrying in %.1fs: %s", delay, exc)
                if self.stopping is not None:
                    self.stopping.wait(delay)
                else:
                    time.sleep(delay)
        self.stats.stage_seconds["publish"] += time.perf_counter() - t0

    def _tracker(self, result: FrameResult) -> EventTracker:
        """The camera's event tracker. The first time, an event a dead engine left open on the
        camera is taken over (same ingest run) or ended (its end waits in _inherited)."""
        camera = result.camera
        if camera in self._trackers:
            return self._trackers[camera]
        ev = self.config.events
        tracker = EventTracker(ev.open_after, ev.window, ev.close_after)
        left_open = self.publisher.open_event(camera)  # may raise PublishError: retried with the result
        if left_open is not None:
            self._inherited[camera] = tracker.adopt(left_open, result.run_id)
            log.info("camera %s: %s the event %s a previous engine left open", camera,
                     "ended" if self._inherited[camera] else "took over", left_open.event_id)
        self._trackers[camera] = tracker
        return tracker

    def close(self) -> None:
        """End open events (a stopped engine cannot see them end)."""
        events = [e for tracker in self._trackers.values() for e in tracker.flush()]
        if events:
            try:
                self.publisher.publish_events(events)
                self.metrics.observe_events(events)
            except PublishError as exc:
                log.warning("could not publish the end of %d open event(s): %s", len(events), exc)
