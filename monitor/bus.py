"""Frame buses: the queue between camera ingest and the engine.

Two implementations share one interface (FrameBus):
- InProcessBus (here): per-camera deques in memory, for ingest threads and the engine in one process.
- RedisFrameBus (monitor/redis_bus.py): one Redis stream per camera (`frames:<camera>`), read
  through a consumer group, so several engine processes can share cameras and frames of a dead
  consumer can be reclaimed.

Delivery is at-least-once: a frame stays pending until ack(); callers ack only after publishing
results, and must ack corrupt entries too (BusMessage.frame is None) so they never block a stream.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine.errors import ConfigError, SpadeError
from monitor.frames import Frame

if TYPE_CHECKING:
    from monitor.redis_bus import RedisFrameBus

log = logging.getLogger(__name__)

ENGINE_BEHIND = "engine_behind"  # drop reason: the camera's buffer was full, or its frames too old
REDIS_DOWN = "redis_down"  # drop reason: Redis unreachable for a live frame
DEFAULT_MAX_AGE_S = 10.0  # a live frame waiting longer than this is shed: results stay near real time


class BusClosed(SpadeError):
    """put() on a closed bus, or a blocked replay put() woken by close()."""


class BusUnavailable(SpadeError):
    """Redis could not be reached within the time allowed for this call."""


@dataclass
class BusMessage:
    id: str  # opaque: '<camera>/<entry id>' for Redis (entry ids are unique per stream only), a counter in-process
    frame: Frame | None  # None if the entry was corrupt; then `error` says why, in one line
    error: str | None = None


class RunDrops:
    """How many frames of each camera's current ingest run a bus dropped: stamped on the run's
    next frame (Frame.dropped_before), so the engine can tell a counted drop from a lost frame."""

    def __init__(self):
        self._runs: dict[str, tuple[str, int]] = {}

    def add(self, frame: Frame, n: int = 1) -> None:
        self._runs[frame.camera] = (frame.run_id, self.of(frame) + n)

    def of(self, frame: Frame) -> int:
        run, count = self._runs.get(frame.camera, (frame.run_id, 0))
        return count if run == frame.run_id else 0


@dataclass
class BusStats:
    """Counters of one bus object (one process): the producer side sees drops, the consumer side corrupt entries."""

    put: dict[str, int] = field(default_factory=dict)  # frames accepted, per camera
    dropped: dict[str, int] = field(default_factory=dict)  # frames lost, per camera, all reasons
    dropped_by_reason: dict[tuple[str, str], int] = field(default_factory=dict)  # (camera, reason) -> n
    corrupt: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_put(self, camera: str) -> None:
        with self._lock:
            self.put[camera] = self.put.get(camera, 0) + 1

    def count_drop(self, camera: str, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.dropped[camera] = self.dropped.get(camera, 0) + n
            key = (camera, reason)
            self.dropped_by_reason[key] = self.dropped_by_reason.get(key, 0) + n

    def count_corrupt(self, n: int = 1) -> None:
        with self._lock:
            self.corrupt += n

    def snapshot(self) -> BusStats:
        with self._lock:
            return BusStats(dict(self.put), dict(self.dropped), dict(self.dropped_by_reason), self.corrupt)


class FrameBus(Protocol):
    stats: BusStats
    data_losses: int  # times the bus saw its store lose data (monitor/ledger.py)
    intact_until: float  # time.monotonic() before which the last such loss had not happened

    def put(self, frame: Frame, *, live: bool) -> None:
        """live=True: never block, drop the camera's oldest frame when full. live=False: block, never drop."""

    def get_batch(self, max_frames: int, max_wait_s: float) -> list[BusMessage]:
        """Up to max_frames, fair across cameras; returns early when full, else after max_wait_s."""

    def ack(self, ids: list[str]) -> None:
        """Forget delivered frames; call only after their results are published."""

    def claim_stale(self, min_idle_s: float) -> list[BusMessage]:
        """Take over frames delivered to a consumer that died before acking them."""

    def pending(self) -> int:
        """Frames waiting plus frames delivered but not acked."""

    def close(self) -> None:
        ...


def check_max_len(max_len: int) -> int:
    if not isinstance(max_len, int) or max_len < 1:
        raise ConfigError(f"frame bus max_len must be a positive integer, got {max_len!r}")
    return max_len


class InProcessBus:
    """Thread-safe in-memory bus: per-camera deques guarded by one Condition. Frames are not copied."""

    def __init__(self, max_len: int = 256, max_age_s: float = DEFAULT_MAX_AGE_S):
        self.max_len = check_max_len(max_len)
        self.max_age_s = float(max_age_s)
        self.data_losses = 0  # memory cannot lose what the process holds
        self.intact_until = 0.0
        self.stats = BusStats()
        self._run_drops = RunDrops()
        self._cond = threading.Condition()
        self._queues: dict[str, deque[BusMessage]] = {}
        self._inflight: dict[str, BusMessage] = {}
        self._ids = itertools.count()
        self._rr = 0  # rotates which camera goes first, so no camera is favoured
        self._closed = False

    def put(self, frame: Frame, *, live: bool) -> None:
        with self._cond:
            if self._closed:
                raise BusClosed("frame bus is closed")
            queue = self._queues.setdefault(frame.camera, deque())
            if live:  # shed the oldest waiting frames: too many, or too old to matter live
                too_old = frame.capture_ts - self.max_age_s
                while queue:
                    oldest = queue[0].frame  # never None in-process: frames are not decoded here
                    if len(queue) < self.max_len and (oldest is None or oldest.capture_ts >= too_old):
                        break
                    queue.popleft()
                    self.stats.count_drop(frame.camera, ENGINE_BEHIND)
                    if oldest is not None and oldest.run_id == frame.run_id:
                        self._run_drops.add(frame)
                frame.dropped_before = self._run_drops.of(frame)
            else:
                while len(queue) >= self.max_len and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise BusClosed("frame bus closed while a replay frame waited for room")
            queue.append(BusMessage(str(next(self._ids)), frame))
            self.stats.count_put(frame.camera)
            self._cond.notify_all()

    def _queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def get_batch(self, max_frames: int, max_wait_s: float) -> list[BusMessage]:
        if max_frames <= 0:
            return []
        deadline = time.monotonic() + max(0.0, max_wait_s)
        with self._cond:
            while self._queued() < max_frames and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            cameras = list(self._queues)
            if not cameras:
                return []
            start = self._rr % len(cameras)
            self._rr += 1
            order = [self._queues[c] for c in cameras[start:] + cameras[:start]]
            batch: list[BusMessage] = []
            while len(batch) < max_frames and any(order):
                for queue in order:
                    if queue and len(batch) < max_frames:
                        batch.append(queue.popleft())
            for msg in batch:
                self._inflight[msg.id] = msg
            if batch:
                self._cond.notify_all()  # room for blocked replay producers
            return batch

    def ack(self, ids: list[str]) -> None:
        with self._cond:
            for msg_id in ids:
                self._inflight.pop(msg_id, None)

    def claim_stale(self, min_idle_s: float) -> list[BusMessage]:
        return []  # a dead consumer here means a dead process: its frames died with it

    def pending(self) -> int:
        with self._cond:
            return self._queued() + len(self._inflight)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __enter__(self) -> InProcessBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_bus(kind: str, **kwargs: object) -> InProcessBus | RedisFrameBus:
    """'inprocess' -> InProcessBus(max_len=...); 'redis' -> RedisFrameBus(url, ...)."""
    if kind == "inprocess":
        return InProcessBus(**kwargs)  # type: ignore[arg-type]
    if kind == "redis":
        from monitor.redis_bus import RedisFrameBus

        if "url" not in kwargs:
            raise ConfigError("the redis frame bus needs a url, e.g. redis://localhost:6379/0")
        return RedisFrameBus(**kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"unknown frame bus {kind!r}; use 'inprocess' or 'redis'")
