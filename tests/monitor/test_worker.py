"""The engine worker on its own: an in-process bus, a real folder publisher, no subprocesses."""
from __future__ import annotations

import json
import time

import pytest

from engine.datasets import iter_video_frames
from monitor.bus import InProcessBus
from monitor.config import parse_config
from monitor.frames import Frame
from monitor.publish import DirectoryPublisher, PublishError
from monitor.telemetry import FRAMES_DUPLICATE, FRAMES_PUBLISHED
from monitor.worker import EngineWorker


def _make_worker(scene_bank, tmp_path):
    config = parse_config({
        "cameras": {"cam": {"source": "rtsp://127.0.0.1:9/none", "scene": "plaza"}},
        "scenes": {"plaza": {"bank": str(scene_bank)}},
        "engine": {"device": "cpu", "max_batch": 4},
        "bus": {"kind": "inprocess"},
        "outputs": {"dir": str(tmp_path / "out")},
        "metrics": {"port": 0},
    }, base_dir=tmp_path)
    bus = InProcessBus(max_len=64)
    publisher = DirectoryPublisher(tmp_path / "out")
    return EngineWorker(config, bus, publisher), bus, tmp_path / "out"


@pytest.fixture
def worker(scene_bank, tmp_path):
    engine, bus, out = _make_worker(scene_bank, tmp_path)
    yield engine, bus, out
    engine.publisher.close()


def _frame(scene, seq: int, run_id: str) -> Frame:
    image = next(iter(iter_video_frames(scene.train_videos[0])))  # a normal frame
    return Frame(camera="cam", seq=seq, source_ts=seq / 5, capture_ts=time.time(), image=image, run_id=run_id)


def _events(out) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


LEFT_OPEN = {"event_id": "cam-aaaaaaaa-3", "camera": "cam", "kind": "update", "start_seq": 3, "start_ts": 0.6,
             "end_seq": None, "end_ts": None, "peak_score": 9.5, "peak_seq": 7, "duration_s": 1.4,
             "frames_flagged": 5, "best_overlay_ref": None}


@pytest.mark.parametrize("same_run", [True, False])
def test_an_event_a_dead_engine_left_open_is_taken_over_or_ended(scene, scene_bank, tmp_path, same_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.jsonl").write_text(json.dumps(LEFT_OPEN) + "\n")  # the crashed engine's last word
    engine, bus, _ = _make_worker(scene_bank, tmp_path)
    run_id = "aaaaaaaa" + "0" * 24 if same_run else "bbbbbbbb" + "0" * 24
    bus.put(_frame(scene, 9, run_id), live=False)
    engine.process(bus.get_batch(4, 1.0))
    ends = [e for e in _events(out) if e["event_id"] == LEFT_OPEN["event_id"] and e["kind"] == "end"]
    if same_run:
        assert not ends  # it goes on: the same ingest run may still be inside it
        engine.close()  # a graceful stop ends what is open
        ends = [e for e in _events(out) if e["event_id"] == LEFT_OPEN["event_id"] and e["kind"] == "end"]
    assert len(ends) == 1
    assert ends[0]["start_seq"] == 3 and ends[0]["peak_score"] == 9.5
    if not same_run:  # it ended where it was last seen
        assert ends[0]["end_ts"] == pytest.approx(2.0) and ends[0]["end_seq"] == 7
    assert not [e for e in _events(out) if e["kind"] == "start"]  # no second event opened for it
    engine.publisher.close()


def _value(counter, camera: str) -> float:
    return counter.labels(camera)._value.get()


def test_a_redelivered_frame_is_published_and_counted_once(scene, worker):
    engine, bus, out = worker
    image = next(iter(iter_video_frames(scene.test_videos[0])))
    frame = Frame(camera="cam", seq=0, source_ts=0.0, capture_ts=time.time(), image=image, run_id="r1")
    published, duplicates = _value(FRAMES_PUBLISHED, "cam"), _value(FRAMES_DUPLICATE, "cam")
    for _ in range(2):  # the second time as after an engine crash between publish and ack
        bus.put(frame, live=False)
        engine.process(bus.get_batch(4, 1.0))
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["camera"], r["seq"]) for r in lines] == [("cam", 0)]
    assert _value(FRAMES_PUBLISHED, "cam") - published == 1
    assert _value(FRAMES_DUPLICATE, "cam") - duplicates == 1
    assert engine.stats.duplicates == 1 and bus.pending() == 0


def test_frames_claimed_late_do_not_disturb_the_camera_they_come_from(scene, scene_bank, tmp_path):
    """Frames a dead engine held arrive after later ones: they are published, marked late, and
    leave the temporal context, the smoothing and the events of their camera as they were."""
    frames = list(iter_video_frames(scene.test_videos[0]))[:12]

    def run(folder, with_late: bool) -> list[dict]:
        folder.mkdir()
        engine, bus, out = _make_worker(scene_bank, folder)
        make = lambda seq: Frame(camera="cam", seq=seq, source_ts=seq / 5, capture_ts=time.time(),
                                 image=frames[seq], run_id="r" * 32)
        for seq in (0, 1, 2, 3, 8, 9):  # 4-7 were held by a dead engine
            bus.put(make(seq), live=False)
            engine.process(bus.get_batch(4, 1.0))
        if with_late:
            for seq in (4, 5, 6, 7):
                bus.put(make(seq), live=False)
            engine.process(bus.get_batch(4, 1.0), late=True)
        bus.put(make(10), live=False)
        engine.process(bus.get_batch(4, 1.0))
        engine.publisher.close()
        return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]

    plain, claimed = run(tmp_path / "a", False), run(tmp_path / "b", True)
    late = [r for r in claimed if r["late"]]
    assert sorted(r["seq"] for r in late) == [4, 5, 6, 7]
    assert not any(r["late"] for r in plain)
    after = lambda results: next(r for r in results if r["seq"] == 10)
    assert after(claimed)["image_score"] == pytest.approx(after(plain)["image_score"], rel=1e-6)


def test_frames_missing_from_a_camera_and_never_counted_are_reported_lost(scene, worker):
    """A Redis crash takes frames without a trace on the ingest side: the engine sees the gap in
    the camera's seq, tells it from the drops the bus counted, and counts the rest as lost."""
    engine, bus, _ = worker
    from monitor.telemetry import FRAMES_DROPPED

    image = next(iter(iter_video_frames(scene.test_videos[0])))
    lost_before = FRAMES_DROPPED.labels("cam", "lost")._value.get()
    # 2-3 were shed and counted (frame 4 says so); 6-8 vanished with nobody counting them
    for seq, dropped_before in ((0, 0), (1, 0), (4, 2), (5, 2), (9, 2)):
        bus.put(Frame(camera="cam", seq=seq, source_ts=seq / 5, capture_ts=time.time(), image=image,
                      run_id="r1", dropped_before=dropped_before), live=False)
    bus.data_losses += 1  # what a Redis bus notes when Redis restarts without its data
    engine.step(max_wait_s=0.5)
    assert engine.stats.lost == 0  # they might still be claimed from a dead engine
    engine.drain(claim_idle_s=0.0)  # a stop: nothing is pending anywhere any more
    assert engine.stats.lost == 3
    assert FRAMES_DROPPED.labels("cam", "lost")._value.get() - lost_before == 3


class _FlakySink:
    """A folder publisher whose first `failures` result publications fail, as Redis down would."""

    def __init__(self, inner, failures: int, bus=None):
        self.inner, self.failures, self.bus = inner, failures, bus
        self.unfinished_at_failures: list[int] = []  # the bus's pending frames at each failure

    def publish_result(self, result, overlay=None, stills=None):
        if self.failures > 0:
            self.failures -= 1
            self.unfinished_at_failures.append(self.bus.pending() if self.bus else -1)
            raise PublishError("redis at redis://127.0.0.1:1/0: publish failed (ConnectionError)")
        return self.inner.publish_result(result, overlay, stills)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_batch_is_acked_only_once_its_results_are_published(scene, worker, monkeypatch):
    engine, bus, out = worker
    monkeypatch.setattr("monitor.delivery.BACKOFF_START_S", 0.01)
    engine.delivery.publisher = sink = _FlakySink(engine.publisher, failures=3, bus=bus)
    for seq in range(3):
        bus.put(_frame(scene, seq, "r1"), live=False)
    engine.process(bus.get_batch(4, 1.0))
    assert engine.stats.publish_retries == 3 and sink.unfinished_at_failures == [3, 3, 3]  # none acked meanwhile
    assert [json.loads(x)["seq"] for x in (out / "results.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert bus.pending() == 0


def test_a_stop_while_the_sink_is_down_leaves_the_batch_unacked_for_the_next_engine(scene, worker):
    import threading

    engine, bus, out = worker
    engine.delivery.publisher = _FlakySink(engine.publisher, failures=10**6)
    engine.stopping = threading.Event()
    threading.Timer(0.5, engine.stopping.set).start()
    for seq in range(2):
        bus.put(_frame(scene, seq, "r1"), live=False)
    engine._process_safely(bus.get_batch(4, 1.0))
    assert engine.stats.abandoned == 2 and engine.stats.failed == 0
    assert bus.pending() == 2  # delivered, not acknowledged: a Redis bus re-delivers them
    assert not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text()
