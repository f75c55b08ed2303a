"""The engine worker: the loop that takes batches off the bus, has them scored (scoring.py),
delivers the results (delivery.py) and only then acks them.

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

import redis
import torch

from .delivery import Abandoned, ResultDelivery
from .ledger import SeqLedger
from .results import FrameResult
from .scenes import SceneSet
from .scoring import BatchScorer
from .telemetry import EngineMetrics

log = logging.getLogger(__name__)

RELOAD_EVERY_S = 5.0
STATS_EVERY_S = 30.0


def _camera_of(msg) -> str:
    """The camera of a bus message, also for a corrupt one (Redis ids are '<camera>/<entry id>')."""
    if msg.frame is not None:
        return msg.frame.camera
    return msg.id.split("/", 1)[0] if "/" in msg.id else "unknown"


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
    def __init__(self, config, bus, publisher, metrics: EngineMetrics | None = None, leases=None):
        """leases: a CameraLeases (monitor/ownership.py) when several engines share the cameras."""
        if config.engine.threads:
            torch.set_num_threads(config.engine.threads)
        self.config = config
        self.bus = bus
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.stats = EngineStats()
        self.scenes = SceneSet(config, self.metrics)
        camera_scene = {cid: cam.scene for cid, cam in config.cameras.items() if cam.enabled}
        self.scorer = BatchScorer(self.scenes, camera_scene, self.stats, config.engine.escalate,
                                  config.outputs.overlays)
        # Frames a Redis data loss took are counted once a dead engine's frames had time to be claimed.
        self.ledger = SeqLedger(grace_s=2 * config.engine.claim_idle_s)
        self.delivery = ResultDelivery(publisher, config.events, self.metrics, self.stats, self.ledger)
        self._data_losses = 0  # the bus's count of Redis data losses, as last seen
        self.engine_id = getattr(bus, "consumer", "local")
        self.leases = leases
        if leases is not None:
            bus.set_cameras([])  # nothing until the first leases are taken
        now = time.monotonic()
        self._next_claim = now  # claim at once: a previous engine may have died with frames pending
        self._next_reload = now + RELOAD_EVERY_S
        self._next_stats = now + STATS_EVERY_S
        self._stats_mark = (now, 0)
        self.scenes.load()

    @property
    def publisher(self):
        return self.delivery.publisher

    @property
    def stopping(self):
        """An Event: set by run(); a stop during a sink outage abandons the batch unacked."""
        return self.delivery.stopping

    @stopping.setter
    def stopping(self, event) -> None:
        self.delivery.stopping = event

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
        if self.leases is not None and self.leases.due():
            taken += self._rebalance()
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

    def _rebalance(self) -> int:
        """Renew the camera leases; take over what a gained camera's last owner left pending."""
        try:
            gained, lost = self.leases.renew()
        except redis.RedisError as exc:
            log.warning("engine %s: camera leases not renewed (%s); retrying", self.engine_id, type(exc).__name__)
            return 0
        for camera in gained | lost:
            self.scorer.forget(camera)
            self.delivery.forget(camera)
        if gained or lost:
            self.bus.set_cameras(sorted(self.leases.owned))
        taken = 0
        for camera in sorted(gained):
            msgs = self.bus.claim_camera(camera)
            if msgs:
                log.info("camera %s: took over %d frame(s) its previous engine left unacknowledged", camera, len(msgs))
                self.stats.claimed += len(msgs)
                self._process_safely(msgs)
                taken += len(msgs)
        return taken

    def _count_lost(self, now: float, final: bool = False) -> None:
        losses = self.bus.data_losses
        if losses != self._data_losses:
            self._data_losses = losses
            if self.ledger.note_data_loss(self.bus.intact_until, now):
                log.warning("frame bus: Redis lost data (restarted or flushed) %.0fs ago; frames missing since "
                            "then are counted as lost in %.0fs, once pending ones had time to be claimed",
                            time.monotonic() - self.bus.intact_until, self.ledger.grace_s)
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
        if claim_idle_s is not None and self.leases is not None:
            # The final drain runs when every camera has ended and this is the only engine left:
            # what a dead engine still holds the lease of is ours to finish.
            self.bus.set_cameras(list(self.scorer.camera_scene))
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
        except Abandoned:
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
            elif not self.scorer.knows(m.frame.camera):
                self.stats.unknown_camera += 1
                ack_now.append(m.id)
            else:
                good.append(m)
        frames = [m.frame for m in good]
        results = self.scorer.score(frames, late) if good else []
        for result, _ in results:
            result.engine = self.engine_id
        t0 = time.perf_counter()
        self.delivery.deliver(results, frames)
        self.stats.stage_seconds["publish"] += time.perf_counter() - t0
        self.bus.ack(ack_now + [m.id for m in good])
        self.stats.batches += 1
        self.stats.frames += len(good)
        self.stats.stage_seconds["batch"] += time.perf_counter() - t_start
        stages = {k: v - stages_before.get(k, 0.0) for k, v in self.stats.stage_seconds.items()
                  if k != "batch" and v != stages_before.get(k, 0.0)}
        self.metrics.observe_batch(len(good), stages, [max(0.0, wall_start - f.capture_ts) for f in frames])
        return [r for r, _ in results]

    def close(self) -> None:
        """End open events (a stopped engine cannot see them end), unless other engines live on
        to take the cameras over, with their events; then give the cameras up at once."""
        if self.leases is None or not self.leases.others_alive():
            self.delivery.close()
        if self.leases is not None:
            self.leases.release_all()
