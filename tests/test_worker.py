"""The engine worker on its own: an in-process bus, a real folder publisher, no subprocesses."""
from __future__ import annotations

import json
import time

import pytest

from engine.datasets import iter_video_frames
from monitor.bus import InProcessBus
from monitor.config import parse_config
from monitor.frames import Frame
from monitor.metrics import FRAMES_DUPLICATE, FRAMES_PUBLISHED
from monitor.publish import DirectoryPublisher
from monitor.worker import EngineWorker


@pytest.fixture
def worker(scene_bank, tmp_path):
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
    yield EngineWorker(config, bus, publisher), bus, tmp_path / "out"
    publisher.close()


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
