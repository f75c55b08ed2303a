"""FrameResult / regions_from_map, and the Redis, directory and fan-out publishers."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import fields

import cv2
import numpy as np
import pytest

from monitor.events import EventTracker
from monitor.publish import DirectoryPublisher, MultiPublisher, PublishError, RedisPublisher, encode_overlay
from monitor.results import FrameResult, regions_from_map
from monitor.urls import redact_url

RUN = "feedbeef12345678"


def make_result(seq: int = 7, camera: str = "cam1", flagged: bool = True, score: float = 2.5) -> FrameResult:
    return FrameResult(camera=camera, run_id=RUN, seq=seq, source_ts=seq / 25.0, capture_ts=1.7e9 + seq,
                       scene="lobby", image_score=score, tau=1.25, flagged=flagged, escalated=False,
                       max_pixel_score=np.float32(3.5), theta=0.75, anomalous_area=0.0123,
                       boxes=[[12, 8, 32, 24], [120, 80, 16, 16]])


def small_jpeg() -> bytes:
    frame = np.full((48, 64, 3), 90, np.uint8)
    amap = np.zeros((12, 16), np.float32)
    amap[3:6, 4:8] = 2.0
    return encode_overlay(frame, amap, theta=1.0)


# --- FrameResult and regions -------------------------------------------------------------------

def test_frame_result_round_trips_through_fields_and_json():
    result = make_result()
    result.published_ts = 1.7e9 + 0.123456789
    flat = result.to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert set(flat) == {f.name for f in fields(FrameResult)}
    assert flat["flagged"] == "1" and flat["overlay_ref"] == "" and json.loads(flat["boxes"])[0] == [12, 8, 32, 24]
    wire = {k.encode(): v.encode() for k, v in flat.items()}  # as redis-py returns it
    assert FrameResult.from_fields(wire) == result
    assert FrameResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    assert isinstance(result.max_pixel_score, float)  # numpy scalar coerced


def test_regions_from_map_boxes_in_source_pixels():
    amap = np.zeros((30, 40), np.float32)  # a quarter of the 120x160 frame in each axis
    amap[2:8, 3:11] = 1.0  # big blob -> frame x 12..43, y 8..31
    amap[20:24, 30:34] = 1.0  # small blob -> frame x 120..135, y 80..95
    amap[15, 20] = 1.0  # speckle: counted in the area, too small for a box
    area, boxes = regions_from_map(amap, 0.5, (120, 160), min_area_frac=0.002)
    assert len(boxes) == 2
    for got, want in zip(boxes, ([12, 8, 32, 24], [120, 80, 16, 16])):
        assert np.abs(np.array(got) - want).max() <= 1, (got, want)
    assert (32 * 24 + 16 * 16) / (120 * 160) < area < 0.06
    assert regions_from_map(np.zeros((30, 40)), 0.5, (120, 160)) == (0.0, [])


def test_regions_from_map_keeps_at_most_ten_largest_first():
    amap = np.zeros((64, 64), np.float32)
    for i in range(12):  # a 3x4 grid of separate squares, 2 to 5 pixels wide
        row, col, size = 2 + 15 * (i // 4), 2 + 15 * (i % 4), 2 + i % 4
        amap[row:row + size, col:col + size] = 1
    _, boxes = regions_from_map(amap, 0.5, (64, 64), min_area_frac=0.0)
    areas = [w * h for _, _, w, h in boxes]
    assert len(boxes) == 10 and areas == sorted(areas, reverse=True)


# --- Redis ------------------------------------------------------------------------------------

def client(url: str):
    import redis

    return redis.Redis.from_url(url)


def test_results_land_in_stream_with_documented_fields(redis_server):
    pub = RedisPublisher(redis_server.url)
    result = make_result()
    jpeg = small_jpeg()
    assert pub.publish_result(result, jpeg) is True
    r = client(redis_server.url)
    entries = r.xrange("results:cam1")
    assert len(entries) == 1
    _, data = entries[0]
    assert {k.decode() for k in data} == {f.name for f in fields(FrameResult)}
    back = FrameResult.from_fields(data)
    assert back == result
    key = f"overlay:cam1:{RUN}:7"
    assert back.overlay_ref == key and back.published_ts is not None
    assert r.get(key) == jpeg and 0 < r.ttl(key) <= 3600
    decoded = cv2.imdecode(np.frombuffer(r.get(key), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3)
    pub.close()


def test_same_frame_published_twice_appears_once(redis_server):
    pub = RedisPublisher(redis_server.url)
    assert pub.publish_result(make_result(seq=3), small_jpeg()) is True
    assert pub.publish_result(make_result(seq=3), small_jpeg()) is False  # engine re-processed it
    assert pub.publish_result(make_result(seq=4), None) is True
    r = client(redis_server.url)
    assert r.xlen("results:cam1") == 2
    assert 0 < r.ttl(f"dedupe:cam1:{RUN}:3") <= 3600
    assert r.exists(f"overlay:cam1:{RUN}:4") == 0  # no overlay given, none stored
    pub.close()


def test_events_and_status_streams(redis_server):
    pub = RedisPublisher(redis_server.url)
    tracker = EventTracker()
    events = []
    for seq in range(6):
        events += tracker.update(make_result(seq=seq, score=2.0 + seq), f"ref{seq}")
    events += tracker.flush()
    pub.publish_events(events)
    pub.publish_status("cam1", "running", "fps=5.0")
    r = client(redis_server.url)
    stored = [{k.decode(): v.decode() for k, v in data.items()} for _, data in r.xrange("events:cam1")]
    assert [e["kind"] for e in stored] == [e.kind for e in events] == ["start", "update", "update", "update", "end"]
    assert {e["event_id"] for e in stored} == {f"cam1-{RUN[:8]}-0"}
    assert stored[-1]["end_seq"] == "5" and float(stored[-1]["peak_score"]) == 7.0
    (_, status), = r.xrange("status:cam1")
    assert status[b"status"] == b"running" and status[b"detail"] == b"fps=5.0"
    pub.close()


def test_an_unended_event_is_found_for_the_next_engine(redis_server, tmp_path):
    """Both sinks tell the next engine which event a crashed one left open, and nothing once it ended."""
    tracker = EventTracker()
    opened = []
    for seq in range(4):
        opened += tracker.update(make_result(seq=seq, score=2.0 + seq), None)
    assert opened and opened[-1].kind in ("start", "update")
    for pub in (RedisPublisher(redis_server.url), DirectoryPublisher(tmp_path)):
        assert pub.open_event("cam1") is None
        pub.publish_events(opened)
        found = pub.open_event("cam1")
        assert found is not None and found.event_id == opened[0].event_id and found.peak_score == 5.0
        pub.close()
    reopened = DirectoryPublisher(tmp_path)  # a new engine reads it back from events.jsonl
    assert reopened.open_event("cam1") == found
    reopened.close()
    ended = tracker.flush()
    for pub in (RedisPublisher(redis_server.url), DirectoryPublisher(tmp_path)):
        pub.publish_events(ended)
        assert pub.open_event("cam1") is None
        pub.close()


def test_maxlen_trims_results_stream(redis_server):
    pub = RedisPublisher(redis_server.url, stream_maxlen=100)
    for seq in range(600):
        pub.publish_result(make_result(seq=seq), None)
    length = client(redis_server.url).xlen("results:cam1")
    assert 100 <= length <= 250, length  # '~' trims whole nodes (100 entries each by default)
    pub.close()


def test_outage_raises_publish_error_then_recovers(redis_server):
    pub = RedisPublisher(redis_server.url)
    assert pub.publish_result(make_result(seq=1), None)
    redis_server.stop()
    began = time.monotonic()
    with pytest.raises(PublishError) as info:
        pub.publish_result(make_result(seq=2), None)
    assert time.monotonic() - began < 5
    assert "\n" not in str(info.value) and "127.0.0.1" in str(info.value)
    with pytest.raises(PublishError):
        pub.publish_status("cam1", "degraded")
    assert pub.wait_until_up(0.2) is False
    redis_server.start()
    assert pub.wait_until_up(5) is True
    assert pub.publish_result(make_result(seq=2), None) is True  # the retried frame goes through
    (_, data), = client(redis_server.url).xrange("results:cam1")  # the restarted server kept no data
    assert data[b"seq"] == b"2"
    pub.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_error_never_shows_password(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path), "--requirepass", "secretpw"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://:secretpw@127.0.0.1:{port}/0"
        pub = RedisPublisher(url)
        assert pub.wait_until_up(10)
        assert pub.publish_result(make_result(), None) is True
        assert "secretpw" not in repr(pub.url) and redact_url(url) == f"redis://***@127.0.0.1:{port}/0"

        wrong = RedisPublisher(f"redis://admin:wrongpw@127.0.0.1:{port}/0")
        with pytest.raises(PublishError) as info:
            wrong.publish_result(make_result(seq=8), None)
        assert "wrongpw" not in str(info.value) and "admin" not in str(info.value)

        proc.terminate()
        proc.wait(10)
        with pytest.raises(PublishError) as info:
            pub.publish_result(make_result(seq=9), None)
        message = str(info.value)
        assert "secretpw" not in message and "\n" not in message and f"127.0.0.1:{port}" in message
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


# --- Directory and fan-out -----------------------------------------------------------------------

def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_directory_publisher_writes_all_files(tmp_path):
    out = tmp_path / "out"
    pub = DirectoryPublisher(out)
    tracker = EventTracker()
    jpeg = small_jpeg()
    for camera in ("cam1", "cam2"):
        for seq in range(20):
            result = make_result(seq=seq, camera=camera, flagged=5 <= seq < 10, score=2.0 if 5 <= seq < 10 else 0.5)
            assert pub.publish_result(result, jpeg if result.flagged else None)
            pub.publish_events(tracker.update(result, result.overlay_ref))
        pub.publish_status(camera, "finished")
    assert pub.publish_result(make_result(seq=3), None) is False  # duplicate
    pub.publish_events(tracker.flush())
    pub.close()

    results = read_jsonl(out / "results.jsonl")
    assert len(results) == 40 and FrameResult.from_json(results[0]).camera == "cam1"
    assert results[5]["overlay_ref"] == f"overlays/cam1/{RUN[:8]}-5.jpg" and results[0]["overlay_ref"] is None
    events = read_jsonl(out / "events.jsonl")
    assert [(e["camera"], e["kind"]) for e in events] == [("cam1", "start"), ("cam1", "end"),
                                                          ("cam2", "start"), ("cam2", "end")]
    assert events[1]["best_overlay_ref"] == f"overlays/cam1/{RUN[:8]}-5.jpg"
    assert [s["status"] for s in read_jsonl(out / "status.jsonl")] == ["finished", "finished"]
    overlay = cv2.imread(str(out / "overlays" / "cam2" / f"{RUN[:8]}-7.jpg"))
    assert overlay is not None and overlay.shape == (48, 64, 3)
    assert not (out / "overlays" / "cam1" / f"{RUN[:8]}-0.jpg").exists()
    for camera in ("cam1", "cam2"):
        timeline = cv2.imread(str(out / f"timeline_{camera}.png"))
        assert timeline is not None and timeline.shape[0] > 100 and timeline.shape[1] > 500


def test_directory_publisher_resumes_without_duplicates(tmp_path):
    pub = DirectoryPublisher(tmp_path)
    for seq in range(3):
        pub.publish_result(make_result(seq=seq), None)
    pub.close()
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write('{"camera": "cam1", "se')  # interrupted mid-line
    pub = DirectoryPublisher(tmp_path)
    assert pub.publish_result(make_result(seq=2), None) is False
    assert pub.publish_result(make_result(seq=3), None) is True
    pub.close()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5 and [json.loads(line)["seq"] for i, line in enumerate(lines) if i != 3] == [0, 1, 2, 3]


def test_directory_publisher_refuses_path_separators(tmp_path):
    pub = DirectoryPublisher(tmp_path)
    for camera in ("../evil", "a/b", "a\\b"):
        with pytest.raises(ValueError):
            pub.publish_result(make_result(camera=camera), b"jpeg")
    pub.close()
    assert list(tmp_path.rglob("*.jpg")) == []


def test_multi_publisher_fans_out_and_keeps_primary_ref(redis_server, tmp_path):
    multi = MultiPublisher([RedisPublisher(redis_server.url), DirectoryPublisher(tmp_path)])
    result = make_result()
    assert multi.publish_result(result, small_jpeg()) is True
    assert result.overlay_ref == f"overlay:cam1:{RUN}:7"
    assert multi.publish_result(make_result(), small_jpeg()) is False
    multi.publish_status("cam1", "running")
    multi.close()
    assert client(redis_server.url).xlen("results:cam1") == 1
    assert read_jsonl(tmp_path / "results.jsonl")[0]["overlay_ref"] == f"overlays/cam1/{RUN[:8]}-7.jpg"
    assert (tmp_path / "timeline_cam1.png").is_file()


def test_a_long_running_folder_publisher_keeps_bounded_memory(tmp_path, monkeypatch):
    """The dedupe window and the timelines keep the most recent results only."""
    from monitor.publish import DirectoryPublisher

    monkeypatch.setattr(DirectoryPublisher, "DEDUPE_WINDOW", 100)
    monkeypatch.setattr(DirectoryPublisher, "TIMELINE_POINTS", 50)
    pub = DirectoryPublisher(tmp_path)
    for seq in range(1000):
        assert pub.publish_result(make_result(seq=seq, camera="cam"))
    assert len(pub._seen) == 100 and len(pub._timelines.samples["cam"]) == 50
    assert not pub.publish_result(make_result(seq=999, camera="cam"))  # recent: still deduplicated
    pub.close()
    assert (tmp_path / "timeline_cam.png").is_file()
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1000


def test_camera_status_comes_back_after_redis_loses_its_data(redis_server, monkeypatch):
    """A Redis restarted without its data (or flushed) gets each camera's current status again."""
    from monitor.runner import StatusRelay

    monkeypatch.setattr(StatusRelay, "REFRESH_S", 0.2)
    relay = StatusRelay(RedisPublisher(redis_server.url))
    relay("cam1", "offline", "connection refused")
    relay("cam1", "online", "")
    relay("cam2", "online", "")
    relay.flush()
    r = client(redis_server.url)
    assert [e[b"status"] for _, e in r.xrange("status:cam1")] == [b"offline", b"online"]
    r.flushall()
    time.sleep(0.3)
    relay.flush()
    assert [e[b"status"] for _, e in r.xrange("status:cam1")] == [b"online"]  # the current one only
    assert [e[b"status"] for _, e in r.xrange("status:cam2")] == [b"online"]
    relay.publisher.close()


def test_only_the_newest_overlays_of_a_camera_are_kept(redis_server):
    """Overlays are budgeted per camera, so busy cameras cannot fill Redis within their TTL."""
    pub = RedisPublisher(redis_server.url, overlays_per_camera=3)
    for seq in range(10):
        pub.publish_result(make_result(seq=seq), small_jpeg())
    pub.publish_result(make_result(seq=0, camera="cam2"), small_jpeg())
    r = client(redis_server.url)
    kept = sorted(k.decode() for k in r.keys("overlay:cam1:*"))
    assert kept == [f"overlay:cam1:{RUN}:{seq}" for seq in (7, 8, 9)]
    assert r.exists(f"overlay:cam2:{RUN}:0")
    assert r.xlen("results:cam1") == 10  # results keep their overlay_ref; the image may have gone
    pub.close()


def test_stills_are_written_next_to_the_overlay_and_only_checked_refs_resolve(tmp_path):
    from monitor.publish import media_path
    from monitor.results import Stills

    pub = DirectoryPublisher(tmp_path)
    result = make_result(seq=4)
    assert pub.publish_result(result, small_jpeg(), Stills(b"\xff\xd8frame", b"\xff\xd8prev"))
    pub.close()
    record = read_jsonl(tmp_path / "results.jsonl")[0]
    assert record["frame_ref"] == f"frames/cam1/{RUN[:8]}-4.jpg"
    assert record["previous_ref"] == f"frames/cam1/{RUN[:8]}-4-prev.jpg"
    assert media_path(tmp_path, record["frame_ref"]).read_bytes() == b"\xff\xd8frame"
    assert media_path(tmp_path, record["previous_ref"]).read_bytes() == b"\xff\xd8prev"
    assert media_path(tmp_path, "overlays/cam1/4.jpg") is not None  # folders from before the run prefix
    for bad in ("../x.jpg", "frames/../../x.jpg", "frames/cam1/../../x-1.jpg", "/etc/x.jpg", "frames/..a/1.jpg",
                "frames/cam1/4.png", "frames/cam1/sub/4.jpg", "frames/cam1/4.jpg\n", "results.jsonl", "", None):
        assert media_path(tmp_path, bad) is None, bad
