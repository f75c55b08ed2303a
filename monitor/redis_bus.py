"""The Redis frame bus: one stream per camera (`frames:<camera>`), read through a consumer group.

The interface and the in-process bus are in monitor/bus.py.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Callable, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from engine.errors import ConfigError, DataError
from monitor.bus import (
    DEFAULT_MAX_AGE_S,
    ENGINE_BEHIND,
    REDIS_DOWN,
    BusClosed,
    BusMessage,
    BusStats,
    BusUnavailable,
    RunDrops,
    check_max_len,
)
from monitor.frames import NAME_RULE, Frame, decode_frame, encode_frame, is_safe_name
from monitor.retry import Backoff
from monitor.urls import redact_url, scrub

log = logging.getLogger(__name__)

T = TypeVar("T")

STREAM_PREFIX = "frames:"
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 2.0
LIVE_PUT_BUDGET_S = 1.0  # live ingest must not stall longer than this on an outage
BLOCK_MAX_S = 1.0  # cap on one XREADGROUP BLOCK, so close() and outages are noticed quickly
SOCKET_TIMEOUT_S = 5.0  # must exceed BLOCK_MAX_S
DISCOVER_EVERY_S = 2.0
DISCOVER_EMPTY_EVERY_S = 0.25  # scan more often while no camera stream is known yet
REPLAY_POLL_START_S = 0.01
REPLAY_POLL_MAX_S = 0.1
CLAIM_PAGE = 100
GROUP_LOSS_LOOKBACK_S = 30.0  # a vanished group (FLUSHALL...) is noticed within this long


# A live frame's XADD. Sheds, oldest first, frames no engine has been given yet (ids after the
# group's last-delivered-id) that are older than the age limit or beyond max_len, so a frame an
# engine is working on is never removed and every shed frame is a frame without a result. Then
# adds the new frame, stamped with its run's dropped-so-far count (monitor/ledger.py).
# KEYS[1] stream; ARGV: group, max_len, max_age_ms, run id, dropped before, then field, value...
# Returns {new id, frames shed, of them this run's}.
_LIVE_PUT = """
local stream, group, run = KEYS[1], ARGV[1], ARGV[4]
local max_len, max_age_ms, dropped = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local last, pending = '0-0', 0
if redis.call('EXISTS', stream) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then last, pending = info['last-delivered-id'], info['pending'] end
  end
end
local waiting = redis.call('XLEN', stream) - pending
local shed, same = 0, 0
if waiting > 0 then
  local t = redis.call('TIME')
  local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - max_age_ms
  local old = redis.call('XRANGE', stream, '(' .. last, tostring(cutoff), 'COUNT', waiting)
  if #old < waiting + 1 - max_len then
    old = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', waiting + 1 - max_len)
  end
  for i = 1, #old, 500 do
    local ids = {}
    for j = i, math.min(i + 499, #old) do
      ids[#ids + 1] = old[j][1]
      local f = old[j][2]
      for k = 1, #f, 2 do if f[k] == 'run' and f[k + 1] == run then same = same + 1 end end
    end
    shed = shed + redis.call('XDEL', stream, unpack(ids))
  end
end
local args = {'XADD', stream, '*', 'dropped', tostring(dropped + same)}
for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
return {redis.call(unpack(args)), shed, same}
"""


class _GaveUp(Exception):
    """Internal: the retry budget of one call ran out while Redis was unreachable."""


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("NOGROUP")


def _camera_of(stream: str) -> str:
    return stream[len(STREAM_PREFIX):]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisFrameBus:
    """One Redis stream per camera, consumed through a consumer group.

    Acked entries are deleted (XACK + XDEL), so a stream holds only frames not yet done: XLEN is the
    camera's backlog (waiting + delivered-not-acked). A live put sheds, in the same script, the
    oldest frames not yet delivered to any engine beyond max_len waiting or max_age_s old
    (_LIVE_PUT): each is a frame that will have no result, counted as engine_behind by the
    producer's bus object. Delivered frames are never shed, so what an engine works on is published.
    """

    def __init__(self, url: str, *, group: str = "engine", consumer: str | None = None, max_len: int = 256,
                 max_age_s: float = DEFAULT_MAX_AGE_S, codec: str = "jpeg", jpeg_quality: int = 90,
                 cameras: list[str] | None = None):
        if codec not in ("jpeg", "raw"):
            raise ConfigError(f"frame bus codec must be 'jpeg' or 'raw', got {codec!r}")
        for camera in cameras or []:
            if not is_safe_name(camera):
                raise ConfigError(f"camera id {camera!r} is not a valid name: use {NAME_RULE}")
        self.max_len = check_max_len(max_len)
        self.max_age_s = float(max_age_s)
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.codec = codec
        self.jpeg_quality = jpeg_quality
        self.stats = BusStats()
        self.url_for_logs = redact_url(url)
        self._url = url
        # No client-side retries: our own helper owns backoff and the live-put time budget.
        self._redis = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=1.0,
                                           retry=Retry(NoBackoff(), 0), protocol=2)
        self._live_put = self._redis.register_script(_LIVE_PUT)
        self._run_drops = RunDrops()
        self._fixed_cameras = list(cameras) if cameras is not None else None
        self._known: dict[str, None] = {}  # discovered or produced stream names, insertion-ordered
        self._next_scan = 0.0
        self._grouped: set[str] = set()  # streams whose group exists, as far as we know
        self._ever_grouped: set[str] = set()  # streams whose group existed once: recreating it means lost data
        self._server_id: str | None = None  # Redis's run_id: a new one means a restart
        self.data_losses = 0  # times Redis was seen to have lost data (a restart, a lost group)
        self.intact_until = 0.0  # time.monotonic() before which the last loss had not happened
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._down = False
        self._carry: deque[BusMessage] = deque()  # read beyond max_frames by a blocking read; served first
        self._rr = 0

    # ---- retry helper -------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, budget_s: float | None) -> T:
        """Run fn; on a connection error back off and retry until it works, budget_s runs out, or close()."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        backoff = Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        while True:
            if self._closed.is_set():
                raise BusClosed("frame bus is closed")
            try:
                result = fn()
            except redis.AuthenticationError:
                raise BusUnavailable(f"Redis at {self.url_for_logs} refused the credentials; "
                                     "check the user and password in the bus URL") from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._closed.is_set():
                    raise BusClosed("frame bus is closed") from None
                self._mark_down(exc)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise _GaveUp() from None
                delay = backoff.next()
                self._closed.wait(delay if deadline is None else min(delay, deadline - now))
                continue
            self._mark_up()
            return result

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self._grouped.clear()  # a restarted server has lost its groups
            if self._down:
                return
            self._down = True
        reason = scrub(str(exc).splitlines()[0], self._url) if str(exc) else ""
        log.warning("frame bus: Redis at %s unreachable (%s: %s); retrying with backoff, live frames are "
                    "dropped meanwhile", self.url_for_logs, type(exc).__name__, reason)

    def _mark_up(self) -> None:
        if self._down:
            with self._lock:
                was_down, self._down = self._down, False
            if was_down:
                log.info("frame bus: Redis at %s reachable again", self.url_for_logs)
                self._check_server()

    def _check_server(self) -> float | None:
        """Note a Redis restart: whatever it held since its last save may be gone. Returns the
        server's uptime in seconds (None if it did not answer)."""
        try:
            info = self._redis.info("server")
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return None
        server_id = info.get("run_id")
        uptime = float(info.get("uptime_in_seconds", 0))
        if self._server_id is not None and server_id != self._server_id:
            self._note_loss(uptime + 1.0)
        self._server_id = server_id
        return uptime

    def _note_loss(self, ago_s: float) -> None:
        self.intact_until = time.monotonic() - ago_s
        self.data_losses += 1

    # ---- streams and groups -------------------------------------------------------------------------

    @staticmethod
    def stream_of(camera: str) -> str:
        return STREAM_PREFIX + camera

    def _ensure_groups(self, streams: list[str]) -> None:
        """XGROUP CREATE ... 0 MKSTREAM for streams not known to have the group; BUSYGROUP is fine."""
        with self._lock:
            missing = [s for s in streams if s not in self._grouped]
        if not missing:
            return
        if self._server_id is None:
            self._check_server()
        pipe = self._redis.pipeline(transaction=False)
        for stream in missing:
            pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
        lost_group = False
        for stream, result in zip(missing, pipe.execute(raise_on_error=False)):
            if isinstance(result, redis.ResponseError) and not str(result).startswith("BUSYGROUP"):
                raise result
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                raise result
            lost_group = lost_group or (result is True and stream in self._ever_grouped)
        if lost_group:
            # The group we had is gone, and so is what the stream held, since some time ago: not
            # before the server started. A lookback reaching further would take in frames shed
            # before then, and so mis-count the loss (monitor/ledger.py).
            uptime = self._check_server()
            self._note_loss(GROUP_LOSS_LOOKBACK_S if uptime is None else min(GROUP_LOSS_LOOKBACK_S, uptime + 1.0))
        with self._lock:
            self._grouped.update(missing)
            self._ever_grouped.update(missing)

    def _forget_groups(self) -> None:
        with self._lock:
            self._grouped.clear()

    def _streams(self) -> list[str]:
        """Camera streams to read: the fixed list, or those found by SCAN frames:* (refreshed now and then)."""
        if self._fixed_cameras is not None:
            return [self.stream_of(c) for c in self._fixed_cameras]
        now = time.monotonic()
        if now >= self._next_scan:
            def scan() -> list[str]:
                return [_text(k) for k in self._redis.scan_iter(match=STREAM_PREFIX + "*", _type="STREAM")]
            try:
                found = self._call(scan, budget_s=0)
            except _GaveUp:
                found = []
            for stream in sorted(found):
                if is_safe_name(_camera_of(stream)):
                    self._known.setdefault(stream, None)
            self._next_scan = now + (DISCOVER_EVERY_S if self._known else DISCOVER_EMPTY_EVERY_S)
        return list(self._known)

    def set_cameras(self, cameras: list[str]) -> None:
        """Read only these cameras from now on (the ones this engine owns: monitor/ownership.py).
        Frames read ahead for others are left pending: their new owner claims them."""
        with self._lock:
            self._fixed_cameras = list(cameras)
            keep = {self.stream_of(c) for c in cameras}
            self._carry = deque(m for m in self._carry if self.stream_of(m.id.rpartition("/")[0]) in keep)

    def claim_camera(self, camera: str) -> list[BusMessage]:
        """Every frame of `camera` delivered to any consumer and not acked, now this one's, oldest
        first: a new owner takes over what the previous one held."""
        stream = self.stream_of(camera)

        def claim() -> list[BusMessage]:
            self._ensure_groups([stream])
            out: list[BusMessage] = []
            cursor: bytes | str = "0-0"
            while True:
                try:
                    reply = self._redis.xautoclaim(stream, self.group, self.consumer, min_idle_time=0,
                                                   start_id=cursor, count=CLAIM_PAGE)
                except redis.ResponseError as exc:
                    if not _is_nogroup(exc):
                        raise
                    # The group went with a Redis restart or flush (counted when it is re-created),
                    # and with it anything pending: nothing to take over.
                    self._forget_groups()
                    self._ensure_groups([stream])
                    return out
                cursor = reply[0]
                out.extend(self._message(stream, eid, f) for eid, f in reply[1])
                if _text(cursor) == "0-0":
                    return out

        try:
            return self._call(claim, budget_s=0)
        except (_GaveUp, BusClosed):
            return []

    # ---- producer side ------------------------------------------------------------------------------

    def put(self, frame: Frame, *, live: bool) -> None:
        if self._closed.is_set():
            raise BusClosed("frame bus is closed")
        stream = self.stream_of(frame.camera)
        if self._fixed_cameras is None:
            self._known.setdefault(stream, None)
        fields = encode_frame(frame, self.codec, self.jpeg_quality)
        if live:
            if not self._put_live(frame, stream, fields):
                return
        else:
            self._put_replay(stream, fields)
        self.stats.count_put(frame.camera)

    def _put_live(self, frame: Frame, stream: str, fields: dict[bytes, bytes]) -> bool:
        """The live XADD (see _LIVE_PUT); False if Redis stayed unreachable (dropped and counted)."""
        del fields[b"dropped"]  # the script stamps it, counting what it sheds
        args: list[EncodableT] = [self.group, self.max_len, int(self.max_age_s * 1000), frame.run_id,
                                  self._run_drops.of(frame)]
        for key, value in fields.items():
            args += [key, value]

        def add() -> list:
            self._ensure_groups([stream])
            return self._live_put(keys=[stream], args=args)

        # Once an outage is known, try once per frame instead of stalling ingest a second per frame.
        budget = 0.0 if self._down else LIVE_PUT_BUDGET_S
        try:
            _, shed, shed_of_run = self._call(add, budget_s=budget)
        except _GaveUp:
            self.stats.count_drop(frame.camera, REDIS_DOWN)
            self._run_drops.add(frame)
            return False
        self.stats.count_drop(frame.camera, ENGINE_BEHIND, int(shed))
        self._run_drops.add(frame, int(shed_of_run))
        return True

    def _backlog(self, stream: str) -> int:
        """Entries not yet delivered to the group (stream length minus delivered-not-acked)."""
        for _ in range(2):
            self._ensure_groups([stream])
            pipe = self._redis.pipeline(transaction=True)
            pipe.xlen(stream)
            pipe.xpending(stream, self.group)
            try:
                length, summary = pipe.execute()
            except redis.ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                self._forget_groups()
                continue
            return length - int(summary["pending"])
        return 0

    def _put_replay(self, stream: str, fields: dict[bytes, bytes]) -> None:
        entry = cast("dict[FieldT, EncodableT]", fields)  # redis-py's dict type is invariant
        poll = Backoff(REPLAY_POLL_START_S, REPLAY_POLL_MAX_S)
        while self._call(lambda: self._backlog(stream), budget_s=None) >= self.max_len:
            if self._closed.wait(poll.next()):
                raise BusClosed("frame bus closed while a replay frame waited for room")
        self._call(lambda: self._redis.xadd(stream, entry), budget_s=None)  # no MAXLEN: replay never drops

    # ---- consumer side ------------------------------------------------------------------------------

    def _message(self, stream: str, entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> BusMessage:
        msg_id = f"{_camera_of(stream)}/{_text(entry_id)}"
        if fields is None:  # Redis < 7 reports a trimmed pending entry this way
            self.stats.count_corrupt()
            return BusMessage(msg_id, None, f"entry {msg_id} was trimmed before it was processed")
        try:
            return BusMessage(msg_id, decode_frame(fields))
        except DataError as exc:
            self.stats.count_corrupt()
            return BusMessage(msg_id, None, f"{exc} (entry {msg_id})")

    def _read_round(self, streams: list[str], need: int) -> dict[str, list[BusMessage]]:
        """Non-blocking: read up to `need` entries, split evenly over streams (water-filling: a stream's
        unused share goes to the others). Never reads more than asked, so nothing sits delivered to us
        but unreturned."""
        got: dict[str, list[BusMessage]] = {s: [] for s in streams}
        active = list(streams)
        while need > 0 and active:
            # Equal shares first; the remainder (< one per stream) goes one each in rotation order.
            base = need // len(active)
            shares = ([(s, base) for s in active] if base else
                      [(s, 1 if i < need else 0) for i, s in enumerate(active)])
            asked = [(s, n) for s, n in shares if n > 0]
            pipe = self._redis.pipeline(transaction=False)
            for stream, n in asked:
                pipe.xreadgroup(self.group, self.consumer, {stream: ">"}, count=n)
            results = pipe.execute(raise_on_error=False)
            still: list[str] = [s for s, n in shares if n == 0]
            nogroup: list[str] = []
            for (stream, n), result in zip(asked, results):
                if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                    raise result
                if isinstance(result, Exception):
                    if not _is_nogroup(result):
                        raise result
                    nogroup.append(stream)
                    continue
                entries = result[0][1] if result else []
                got[stream].extend(self._message(stream, eid, f) for eid, f in entries)
                need -= len(entries)
                if len(entries) == n:
                    still.append(stream)
            if nogroup:  # group lost (server restart, FLUSHALL): re-create and read those again
                self._forget_groups()
                self._ensure_groups(streams)
                still.extend(nogroup)
            active = [s for s in streams if s in still]
        return got

    def _read_blocking(self, streams: list[str], need: int, block_s: float) -> list[BusMessage]:
        try:
            result = self._redis.xreadgroup(self.group, self.consumer, {s: ">" for s in streams},
                                            count=need, block=max(1, int(block_s * 1000)))
        except redis.ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            self._forget_groups()
            self._ensure_groups(streams)
            return []
        out: list[BusMessage] = []
        for stream, entries in cast(list, result or []):
            out.extend(self._message(_text(stream), eid, f) for eid, f in entries)
        return out

    def get_batch(self, max_frames: int, max_wait_s: float) -> list[BusMessage]:
        if max_frames <= 0:
            return []
        deadline = time.monotonic() + max(0.0, max_wait_s)
        out: list[BusMessage] = []
        while self._carry and len(out) < max_frames:
            out.append(self._carry.popleft())
        try:
            while len(out) < max_frames and not self._closed.is_set():
                streams = self._streams()
                left = deadline - time.monotonic()
                if not streams:
                    if left <= 0 or self._closed.wait(min(left, DISCOVER_EMPTY_EVERY_S)):
                        break
                    continue
                start = self._rr % len(streams)
                self._rr += 1
                streams = streams[start:] + streams[:start]

                def first_round() -> dict[str, list[BusMessage]]:
                    self._ensure_groups(streams)
                    return self._read_round(streams, max_frames - len(out))
                per_stream = self._call(first_round, budget_s=max(0.0, left))
                before = len(out)
                for i in range(max(map(len, per_stream.values()), default=0)):
                    out.extend(msgs[i] for msgs in per_stream.values() if i < len(msgs))
                if len(out) >= max_frames:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if len(out) > before:
                    continue  # more may have arrived meanwhile; the next round is non-blocking
                need = max_frames - len(out)
                fresh = self._call(lambda: self._read_blocking(streams, need, min(left, BLOCK_MAX_S)),
                                   budget_s=left)
                out.extend(fresh[:need])
                self._carry.extend(fresh[need:])
        except (_GaveUp, BusClosed):
            pass
        return out

    def ack(self, ids: list[str]) -> None:
        by_stream: dict[str, list[str]] = {}
        for msg_id in ids:
            camera, sep, entry_id = msg_id.rpartition("/")
            if not sep or not camera:
                raise ValueError(f"not a Redis frame bus message id: {msg_id!r}")
            by_stream.setdefault(self.stream_of(camera), []).append(entry_id)
        if not by_stream:
            return

        def ack_and_delete() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for stream, entry_ids in by_stream.items():
                pipe.xack(stream, self.group, *entry_ids)
                pipe.xdel(stream, *entry_ids)  # keeps XLEN == unfinished frames; see the class docstring
            for result in pipe.execute(raise_on_error=False):
                if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                    raise result
                # NOGROUP: the server restarted (or was flushed) since the read; nothing left to ack.
                if isinstance(result, Exception) and not _is_nogroup(result):
                    raise result

        try:
            self._call(ack_and_delete, budget_s=None)
        except BusClosed:
            log.warning("frame bus: closed before %d ack(s) reached Redis; those frames will be reclaimed",
                        len(ids))

    def claim_stale(self, min_idle_s: float) -> list[BusMessage]:
        """XAUTOCLAIM entries idle >= min_idle_s from any consumer of the group to this one."""
        def claim() -> list[BusMessage]:
            out: list[BusMessage] = []
            for stream in self._streams():
                cursor: bytes | str = "0-0"
                while True:
                    try:
                        reply = self._redis.xautoclaim(stream, self.group, self.consumer,
                                                       min_idle_time=int(min_idle_s * 1000),
                                                       start_id=cursor, count=CLAIM_PAGE)
                    except redis.ResponseError as exc:
                        if not _is_nogroup(exc):
                            raise
                        self._forget_groups()
                        break  # no group, so nothing pending there
                    cursor, entries = reply[0], reply[1]
                    out.extend(self._message(stream, eid, f) for eid, f in entries)
                    if len(reply) > 2 and reply[2]:
                        log.info("frame bus: %d pending frame(s) of %s were trimmed before processing",
                                 len(reply[2]), stream)
                    if _text(cursor) == "0-0":
                        break
                self._forget_idle_consumers(stream, min_idle_s)
            return out

        try:
            self._check_server()  # a restart may go unnoticed otherwise: ingest recreates the groups
            return self._call(claim, budget_s=0)
        except (_GaveUp, BusClosed):
            return []

    def _forget_idle_consumers(self, stream: str, min_idle_s: float) -> None:
        """Remove consumers of the group that hold nothing and were idle that long (dead engines):
        a live one that happens to match is recreated by its next read, with nothing lost."""
        try:
            consumers = self._redis.xinfo_consumers(stream, self.group)
        except redis.ResponseError:
            return  # no group yet
        for consumer in consumers:
            name = _text(consumer["name"])
            if name != self.consumer and int(consumer["pending"]) == 0 and \
                    int(consumer["idle"]) >= min_idle_s * 1000:
                self._redis.xgroup_delconsumer(stream, self.group, name)
                log.info("frame bus: removed consumer %s of %s, idle with nothing pending", name, stream)

    def pending(self) -> int:
        """Sum of XLEN: acked entries are deleted, so a stream holds only waiting + delivered-not-acked."""
        streams = self._streams()

        def lengths() -> int:
            pipe = self._redis.pipeline(transaction=False)
            for stream in streams:
                pipe.xlen(stream)
            return sum(pipe.execute())

        try:
            return self._call(lengths, budget_s=LIVE_PUT_BUDGET_S)
        except _GaveUp:
            raise BusUnavailable(f"Redis at {self.url_for_logs} is unreachable") from None

    def close(self) -> None:
        self._closed.set()
        self._redis.close()

    def __enter__(self) -> RedisFrameBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
