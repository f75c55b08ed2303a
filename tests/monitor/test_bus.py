"""Frame buses against a real redis-server (no mocks): ordering, drops, backpressure, fairness, recovery."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import numpy as np
import pytest
import redis

from monitor.bus import ENGINE_BEHIND, REDIS_DOWN, BusMessage, InProcessBus, make_bus
from monitor.frames import Frame, encode_frame
from monitor.ledger import SeqLedger
from monitor.redis_bus import RedisFrameBus
from monitor.urls import redact_url

H, W = 24, 32


def make_frame(camera: str, seq: int) -> Frame:
    # Smooth gradient plus a per-frame offset, so JPEG stays close and frames differ.
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 6, yy * 8, np.full_like(xx, 40)], axis=-1) + (seq % 50)
    return Frame(camera=camera, seq=seq, source_ts=seq / 25, capture_ts=1000.0 + seq,
                 image=image.astype(np.uint8), run_id="r1")


def redis_bus(server, **kwargs) -> RedisFrameBus:
    kwargs.setdefault("consumer", "c1")
    kwargs.setdefault("codec", "raw")
    return RedisFrameBus(server.url, **kwargs)


@pytest.fixture(params=["inprocess", "redis"])
def bus_factory(request):
    """Builds buses of one kind; Redis buses share one server and are closed at the end."""
    made = []

    def build(**kwargs):
        if request.param == "inprocess":
            bus = InProcessBus(max_len=kwargs.get("max_len", 256), max_age_s=kwargs.get("max_age_s", 10.0))
        else:
            bus = redis_bus(request.getfixturevalue("redis_server"), **kwargs)
        made.append(bus)
        return bus

    yield build
    for bus in made:
        bus.close()


def seqs(messages: list[BusMessage], camera: str | None = None) -> list[int]:
    return [m.frame.seq for m in messages if m.frame is not None and camera in (None, m.frame.camera)]


def test_round_trip_inprocess():
    bus = InProcessBus()
    frames = [make_frame("a", i) for i in range(3)]
    for f in frames:
        bus.put(f, live=True)
    got = bus.get_batch(3, 1.0)
    assert [m.frame for m in got] == frames  # same objects, no copy
    assert bus.stats.put == {"a": 3}


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_round_trip_redis(redis_server, codec):
    bus = redis_bus(redis_server, codec=codec, cameras=["a"])
    sent = [make_frame("a", i) for i in range(3)]
    for f in sent:
        bus.put(f, live=True)
    got = bus.get_batch(3, 1.0)
    assert len(got) == 3 and all(m.error is None for m in got)
    for s, m in zip(sent, got):
        r = m.frame
        assert (r.camera, r.seq, r.run_id, r.source_ts, r.capture_ts) == (s.camera, s.seq, s.run_id,
                                                                           s.source_ts, s.capture_ts)
        diff = np.abs(r.image.astype(int) - s.image.astype(int))
        if codec == "raw":
            assert np.array_equal(r.image, s.image)
        else:
            assert r.image.shape == s.image.shape and diff.mean() < 3
    bus.close()


def test_live_put_drops_oldest_inprocess():
    bus = InProcessBus(max_len=5)
    for i in range(12):
        bus.put(make_frame("a", i), live=True)
    assert bus.stats.dropped == {"a": 7}
    assert bus.stats.dropped_by_reason == {("a", ENGINE_BEHIND): 7}
    assert seqs(bus.get_batch(20, 0.0)) == list(range(7, 12))


def test_live_put_drops_oldest_redis(redis_server):
    bus = redis_bus(redis_server, max_len=10, cameras=["a"])
    n = 250
    for i in range(n):
        bus.put(make_frame("a", i), live=True)
    assert redis.Redis.from_url(redis_server.url).xlen("frames:a") == 10
    assert bus.stats.dropped_by_reason == {("a", ENGINE_BEHIND): n - 10}
    got = bus.get_batch(n, 0.2)
    assert seqs(got) == list(range(n - 10, n))  # the newest survive
    assert got[-1].frame.dropped_before == n - 10  # the newest frame knows what went before it
    bus.close()


def test_overload_sheds_only_frames_no_engine_has_and_counts_each_once(bus_factory):
    """sampled = published + dropped: a frame an engine is working on is never shed (nor counted)."""
    producer = bus_factory(max_len=50, max_age_s=1e6, cameras=["a"], consumer="ingest")  # test frames are 1 s apart
    engine = bus_factory(max_len=50, cameras=["a"], consumer="engine") if isinstance(producer, RedisFrameBus) \
        else producer
    n = 0

    def put(k: int) -> None:
        nonlocal n
        for _ in range(k):
            producer.put(make_frame("a", n), live=True)
            n += 1

    put(40)
    working = engine.get_batch(40, 1.0)  # delivered, not acked yet: the engine is scoring them
    put(200)
    rest = engine.get_batch(400, 1.0)
    engine.ack([m.id for m in working + rest])
    got = seqs(working) + seqs(rest)
    dropped = producer.stats.dropped_by_reason[("a", ENGINE_BEHIND)]
    assert got == list(range(40)) + list(range(n - 50, n))
    assert len(got) + dropped == n
    assert rest[-1].frame.dropped_before == dropped  # the engine sees the count: no loss to report


def test_live_frames_older_than_max_age_are_shed(bus_factory):
    bus = bus_factory(max_len=100, max_age_s=0.3, cameras=["a"])
    now = time.time()
    for i in range(5):
        bus.put(Frame("a", i, 0.0, now, make_frame("a", i).image, run_id="r1"), live=True)
    time.sleep(0.4)
    bus.put(Frame("a", 5, 0.0, time.time(), make_frame("a", 5).image, run_id="r1"), live=True)
    got = bus.get_batch(10, 0.5)
    assert seqs(got) == [5] and got[0].frame.dropped_before == 5
    assert bus.stats.dropped_by_reason == {("a", ENGINE_BEHIND): 5}


def loss_rig(server, **producer_kwargs):
    """Ingest's bus, an engine's bus, the engine's ledger, and consume(): take a batch as an
    engine does, as far as the ledger sees (observe each frame, then ack); returns how many."""
    producer = redis_bus(server, cameras=["a"], consumer="ingest", **producer_kwargs)
    engine = redis_bus(server, cameras=["a"], consumer="engine")
    ledger = SeqLedger(grace_s=5)

    def consume() -> int:
        got = engine.get_batch(100, 0.5)
        for m in got:
            ledger.observe(m.frame.camera, m.frame.run_id, m.frame.seq, m.frame.dropped_before, time.monotonic())
        engine.ack([m.id for m in got])
        return len(got)

    return producer, engine, ledger, consume


def test_frames_a_redis_crash_takes_are_counted_lost_exactly(redis_server):
    producer, engine, ledger, consume = loss_rig(redis_server)

    for i in range(20):
        producer.put(make_frame("a", i), live=True)
    published = consume()  # 0..19
    for i in range(20, 35):
        producer.put(make_frame("a", i), live=True)  # the backlog Redis will take with it
    redis_server.kill()
    for i in range(35, 38):
        producer.put(make_frame("a", i), live=True)  # dropped and counted: Redis is down
    assert producer.stats.dropped_by_reason == {("a", REDIS_DOWN): 3}
    redis_server.start()  # no persistence: streams and group are gone
    for i in range(38, 50):
        producer.put(make_frame("a", i), live=True)
    deadline = time.monotonic() + 10
    while published < 50 - 15 - 3 and time.monotonic() < deadline:
        published += consume()
    engine.claim_stale(60.0)  # the engine's periodic claim also checks Redis's run id
    assert engine.data_losses >= 1  # the engine's bus noticed the restart
    now = time.monotonic()
    ledger.note_data_loss(engine.intact_until, now)
    assert ledger.settle(now) == []  # within the grace period, they might still come
    lost = sum(n for _, n in ledger.settle(now + 6))
    assert lost == 15
    assert published + sum(producer.stats.dropped.values()) + lost == 50
    producer.close()
    engine.close()


def test_a_redis_restart_first_met_by_a_camera_takeover_is_counted_from_when_it_happened(redis_server):
    """As in the chaos run: a camera's new owner meets the restarted Redis in claim_camera (the
    group is gone), and the ledger's baseline is below zero because frames older than the first
    one this engine saw were shed after it was stamped. The takeover must not fail, and the
    loss must be dated by the restart, not a fixed lookback that reaches past those sheds."""
    producer, engine, ledger, consume = loss_rig(redis_server, max_age_s=1.0)

    for i in range(5):
        producer.put(make_frame("a", i), live=True)
    time.sleep(0.6)
    for i in range(5, 10):
        producer.put(make_frame("a", i), live=True)  # stamped: nothing shed yet
    time.sleep(0.6)
    producer.put(make_frame("a", 10), live=True)  # sheds 0-4, stamped 5 on this frame
    published = consume()  # 5..10: the range holds 5 drops of frames below it
    assert published == 6
    ledger.settle(time.monotonic())
    assert sum(s for _, s in ledger._runs[("a", "r1")].history) == -5
    time.sleep(2.5)  # the baseline is older than the restart, and its second of rounding
    for i in range(11, 26):
        producer.put(make_frame("a", i), live=True)  # the backlog Redis takes with it
    redis_server.kill()
    redis_server.start()
    assert engine.claim_camera("a") == []  # the group is gone, and nothing pending with it
    assert engine.data_losses >= 1
    assert time.monotonic() - engine.intact_until < 10
    for i in range(26, 36):
        producer.put(make_frame("a", i), live=True)
    deadline = time.monotonic() + 10
    while published < 6 + 10 and time.monotonic() < deadline:
        published += consume()
    now = time.monotonic()
    ledger.note_data_loss(engine.intact_until, now)
    assert sum(n for _, n in ledger.settle(now + 6)) == 15
    assert published + sum(producer.stats.dropped.values()) + 15 == 36
    producer.close()
    engine.close()


def test_live_put_counts_no_drop_when_engine_keeps_up(redis_server):
    # Acked frames are deleted, so trimming must not count already-processed frames as drops.
    bus = redis_bus(redis_server, max_len=10, cameras=["a"])
    received = []
    for i in range(300):
        bus.put(make_frame("a", i), live=True)
        if i % 5 == 4:
            batch = bus.get_batch(5, 1.0)
            received += seqs(batch)
            bus.ack([m.id for m in batch])
    assert received == list(range(300))
    assert bus.stats.dropped == {}
    assert bus.pending() == 0
    bus.close()


def test_replay_put_blocks_until_consumer_reads(bus_factory):
    bus = bus_factory(max_len=4, cameras=["a"])
    n = 12
    producer = threading.Thread(target=lambda: [bus.put(make_frame("a", i), live=False) for i in range(n)],
                                daemon=True)
    producer.start()
    time.sleep(0.4)
    assert producer.is_alive(), "replay put must block when the buffer is full"
    assert bus.stats.put == {"a": 4}
    received: list[int] = []
    deadline = time.monotonic() + 10
    while len(received) < n and time.monotonic() < deadline:
        batch = bus.get_batch(3, 0.2)
        received += seqs(batch)
        bus.ack([m.id for m in batch])
    producer.join(5)
    assert received == list(range(n))
    assert bus.stats.dropped == {} and bus.stats.put == {"a": n}


def test_get_batch_timing(bus_factory):
    bus = bus_factory(cameras=["a"])
    t0 = time.monotonic()
    assert bus.get_batch(5, 0.3) == []
    assert 0.25 <= time.monotonic() - t0 < 1.0

    for i in range(2):
        bus.put(make_frame("a", i), live=True)
    t0 = time.monotonic()
    assert seqs(bus.get_batch(5, 0.3)) == [0, 1]
    assert 0.25 <= time.monotonic() - t0 < 1.0  # not full: waited for max_wait

    for i in range(2, 8):
        bus.put(make_frame("a", i), live=True)
    t0 = time.monotonic()
    assert seqs(bus.get_batch(5, 5.0)) == [2, 3, 4, 5, 6]
    assert time.monotonic() - t0 < 0.5  # full: returned at once

    # Frames that arrive while waiting wake the consumer before max_wait.
    late = threading.Timer(0.1, lambda: [bus.put(make_frame("a", i), live=True) for i in range(8, 12)])
    late.start()
    t0 = time.monotonic()
    got = seqs(bus.get_batch(5, 5.0))
    assert got == [7, 8, 9, 10, 11]
    assert time.monotonic() - t0 < 2.0
    late.join()


def test_get_batch_is_fair_across_cameras(bus_factory):
    bus = bus_factory(cameras=["a", "b", "c"])
    for i in range(10):
        bus.put(make_frame("a", i), live=True)
    for i in range(10):
        bus.put(make_frame("b", i), live=True)
    bus.put(make_frame("c", 0), live=True)
    batch = bus.get_batch(7, 1.0)
    assert Counter(m.frame.camera for m in batch) == {"a": 3, "b": 3, "c": 1}
    assert len({m.frame.camera for m in batch[:3]}) == 3  # interleaved, not camera after camera
    batch2 = bus.get_batch(6, 1.0)
    assert Counter(m.frame.camera for m in batch2) == {"a": 3, "b": 3}
    for cam in "ab":
        assert seqs(batch + batch2, cam) == list(range(6))  # oldest first within a camera


def test_ack_removes_from_pending(bus_factory):
    bus = bus_factory(cameras=["a"])
    for i in range(4):
        bus.put(make_frame("a", i), live=True)
    assert bus.pending() == 4
    batch = bus.get_batch(4, 1.0)
    assert bus.pending() == 4  # delivered, not acked
    bus.ack([m.id for m in batch[:2]])
    assert bus.pending() == 2
    bus.ack([m.id for m in batch[2:]])
    assert bus.pending() == 0


def test_claim_stale_takes_over_a_dead_consumers_frames(redis_server):
    producer = redis_bus(redis_server, cameras=["a"], consumer="producer")
    for i in range(5):
        producer.put(make_frame("a", i), live=True)
    dying = redis_bus(redis_server, cameras=["a"], consumer="dying")
    assert seqs(dying.get_batch(3, 1.0)) == [0, 1, 2]
    dying.close()  # dies without acking

    heir = redis_bus(redis_server, cameras=["a"], consumer="heir")
    assert heir.claim_stale(min_idle_s=30.0) == []  # not idle long enough yet
    assert "dying" in {c["name"].decode() for c in heir._redis.xinfo_consumers("frames:a", "engine")}
    time.sleep(0.3)
    claimed = heir.claim_stale(min_idle_s=0.2)
    assert seqs(claimed) == [0, 1, 2]
    rest = heir.get_batch(5, 0.2)
    assert seqs(rest) == [3, 4]
    heir.ack([m.id for m in claimed + rest])
    assert heir.pending() == 0
    # The dead engine, its frames taken over, has left the group: no stale consumer lingers.
    assert {c["name"].decode() for c in heir._redis.xinfo_consumers("frames:a", "engine")} == {"heir"}
    assert InProcessBus().claim_stale(0.0) == []
    producer.close()
    heir.close()


def test_two_consumers_never_get_the_same_entry(redis_server):
    producer = redis_bus(redis_server, consumer="producer")
    expected = {(cam, i) for cam in "abc" for i in range(30)}
    for i in range(30):
        for cam in "abc":
            producer.put(make_frame(cam, i), live=True)
    consumers = [redis_bus(redis_server, consumer=name) for name in ("c1", "c2")]  # cameras discovered
    got: dict[str, list[BusMessage]] = {"c1": [], "c2": []}

    def consume(bus: RedisFrameBus) -> None:
        deadline = time.monotonic() + 5
        while sum(map(len, got.values())) < len(expected) and time.monotonic() < deadline:
            batch = bus.get_batch(4, 0.05)
            got[bus.consumer].extend(batch)
            bus.ack([m.id for m in batch])

    threads = [threading.Thread(target=consume, args=(c,)) for c in consumers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = {name: [(m.frame.camera, m.frame.seq) for m in msgs] for name, msgs in got.items()}
    assert not set(keys["c1"]) & set(keys["c2"])
    assert len(keys["c1"]) + len(keys["c2"]) == len(expected)
    assert set(keys["c1"]) | set(keys["c2"]) == expected
    assert keys["c1"] and keys["c2"]
    for bus in consumers + [producer]:
        bus.close()


def test_corrupt_entry_is_reported_and_does_not_block(redis_server):
    bus = redis_bus(redis_server, cameras=["a"])
    raw = redis.Redis.from_url(redis_server.url)
    bus.put(make_frame("a", 0), live=True)
    raw.xadd("frames:a", {b"camera": b"a", b"data": b"garbage"})
    broken = encode_frame(make_frame("a", 99), "jpeg")
    broken[b"data"] = b"not a jpeg"
    raw.xadd("frames:a", broken)
    bus.put(make_frame("a", 1), live=True)
    batch = bus.get_batch(4, 1.0)
    assert [m.frame is None for m in batch] == [False, True, True, False]
    for bad in batch[1:3]:
        assert bad.error and "corrupt" in bad.error and "\n" not in bad.error
    assert bus.stats.corrupt == 2
    bus.ack([m.id for m in batch])
    assert bus.pending() == 0
    bus.put(make_frame("a", 2), live=True)
    assert seqs(bus.get_batch(1, 1.0)) == [2]
    bus.close()


def test_consumer_recreates_a_lost_group(redis_server):
    bus = redis_bus(redis_server, cameras=["a"])
    bus.put(make_frame("a", 0), live=True)
    assert seqs(bus.get_batch(1, 1.0)) == [0]
    raw = redis.Redis.from_url(redis_server.url)
    raw.flushall()  # group and stream gone, connection intact
    raw.xadd("frames:a", encode_frame(make_frame("a", 1), "raw"))
    assert seqs(bus.get_batch(1, 2.0)) == [1]
    bus.close()


def test_redis_restart_is_survived(redis_server, caplog):
    producer = redis_bus(redis_server, cameras=["a"], consumer="producer")
    consumer = redis_bus(redis_server, cameras=["a"], consumer="engine-1")
    producer.put(make_frame("a", 0), live=True)
    assert seqs(consumer.get_batch(1, 1.0)) == [0]

    redis_server.stop()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monitor.redis_bus"):
        t0 = time.monotonic()
        producer.put(make_frame("a", 1), live=True)
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        producer.put(make_frame("a", 2), live=True)  # outage known: no second stall
        assert time.monotonic() - t0 < 0.5
        assert producer.stats.dropped_by_reason == {("a", REDIS_DOWN): 2}
        t0 = time.monotonic()
        assert consumer.get_batch(1, 0.5) == []
        assert time.monotonic() - t0 < 1.5
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2  # one line per bus object, not one per retry
        assert all("\n" not in r.getMessage() and r.exc_info is None for r in warnings)

        redis_server.start()  # same port, empty data: streams and group are gone
        received: list[int] = []
        deadline = time.monotonic() + 8
        seq = 3
        while not received and time.monotonic() < deadline:
            producer.put(make_frame("a", seq), live=True)
            seq += 1
            batch = consumer.get_batch(5, 0.2)
            received += seqs(batch)
            consumer.ack([m.id for m in batch])
        assert received and received[0] >= 3
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    producer.close()
    consumer.close()


def test_outage_warning_never_shows_the_password(caplog):
    from conftest import free_port

    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0?password=s3cret"
    assert "s3cret" not in redact_url(url)
    bus = RedisFrameBus(url, cameras=["a"], codec="raw")
    with caplog.at_level(logging.WARNING, logger="monitor.redis_bus"):
        bus.put(make_frame("a", 0), live=True)
    assert bus.stats.dropped == {"a": 1}
    assert caplog.records and all("s3cret" not in r.getMessage() for r in caplog.records)
    bus.close()


def test_make_bus():
    from engine.errors import ConfigError

    assert isinstance(make_bus("inprocess", max_len=3), InProcessBus)
    with pytest.raises(ConfigError):
        make_bus("kafka")
    with pytest.raises(ConfigError):
        make_bus("redis")
