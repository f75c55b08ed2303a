"""Which engine processes which camera, when several engines share one Redis.

A camera's frames must reach one engine at a time: its temporal features compare a frame with
the camera's previous one, and its events live in that engine. So each camera has a lease in
Redis, `owner:<camera>` = the engine's id with an expiry, and each engine reads only the
streams of the cameras it holds.

- Liveness: every engine renews, every lease_s / 3, its entry in the sorted set `engines`
  (score: when it expires) and the leases it holds. An engine that dies stops renewing.
- Shares: an engine holds at most ceil(cameras / live engines). Under it, it takes cameras
  whose lease is free (expired or released); over it (an engine joined), it releases the
  extras between batches. So a dead engine's cameras move within about lease_s, and a new
  engine gets its share within a renewal or two.
- Handover: the new owner first claims the frames the camera's stream still has pending
  (delivered to the old owner, never acked) and processes them in order; results are
  deduplicated by (camera, run, seq) when published, so a frame both engines got is published
  once. Both engines forget the camera's temporal state; the new owner takes over an event the
  old one left open (monitor/delivery.py), so events are not split.
Delivery stays at-least-once; exactly-once publication is the publisher's dedupe.
"""
from __future__ import annotations

import logging
import math
import time
import zlib

import redis

log = logging.getLogger(__name__)

ENGINES_KEY = "engines"
OWNER_PREFIX = "owner:"

# Extend a lease only if it is still ours; release likewise. Returns 1 when it was ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CameraLeases:
    def __init__(self, client: redis.Redis, engine_id: str, cameras: list[str], lease_s: float):
        self.client = client
        self.engine_id = engine_id
        self.cameras = sorted(cameras)
        self.lease_ms = int(lease_s * 1000)
        self.owned: set[str] = set()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._next = 0.0
        # Each engine tries free cameras in its own order, so engines starting together do not
        # all race for the same camera first.
        offset = zlib.crc32(engine_id.encode()) % max(1, len(self.cameras))
        self._order = self.cameras[offset:] + self.cameras[:offset]

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def live_engines(self) -> list[str]:
        now_ms = int(time.time() * 1000)
        self.client.zremrangebyscore(ENGINES_KEY, "-inf", now_ms)
        return [m.decode() if isinstance(m, bytes) else str(m) for m in self.client.zrange(ENGINES_KEY, 0, -1)]

    def renew(self) -> tuple[set[str], set[str]]:
        """Heartbeat, keep what is ours, take or give up cameras toward a fair share; returns
        (cameras gained, cameras lost). Redis errors propagate: the caller retries later."""
        self._next = time.monotonic() + self.lease_ms / 3000
        now_ms = int(time.time() * 1000)
        self.client.zadd(ENGINES_KEY, {self.engine_id: now_ms + self.lease_ms})
        share = math.ceil(len(self.cameras) / max(1, len(self.live_engines())))
        lost = {c for c in self.owned if not self._renew(keys=[OWNER_PREFIX + c], args=[self.engine_id,
                                                                                      self.lease_ms])}
        held = self.owned - lost
        for camera in sorted(held, reverse=True)[: max(0, len(held) - share)]:  # an engine joined
            self._release(keys=[OWNER_PREFIX + camera], args=[self.engine_id])
            lost.add(camera)
            held.discard(camera)
        gained = set()
        for camera in self._order:
            if len(held) >= share:
                break
            if camera not in held and self.client.set(OWNER_PREFIX + camera, self.engine_id, nx=True,
                                                      px=self.lease_ms):
                held.add(camera)
                gained.add(camera)
        self.owned = held
        if gained or lost:
            log.info("engine %s: cameras %s (took %s, gave up %s)", self.engine_id, ", ".join(sorted(held)) or "none",
                     ", ".join(sorted(gained)) or "none", ", ".join(sorted(lost)) or "none")
        return gained, lost

    def others_alive(self) -> bool:
        try:
            return any(e != self.engine_id for e in self.live_engines())
        except redis.RedisError:
            return False

    def release_all(self) -> None:
        """Give every camera up now (a graceful stop), so live engines need not wait for expiry."""
        try:
            for camera in self.owned:
                self._release(keys=[OWNER_PREFIX + camera], args=[self.engine_id])
            self.client.zrem(ENGINES_KEY, self.engine_id)
        except redis.RedisError as exc:
            log.warning("engine %s: could not release its cameras (%s); they move when the leases expire",
                        self.engine_id, type(exc).__name__)
        self.owned = set()
