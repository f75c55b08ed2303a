"""Ingest against real files and a real RTSP server (tests/rtsp_server.py under /usr/bin/python3)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from monitor.frames import Frame
from monitor.ingest import CameraReader, IngestWorker, SourceError, open_source
from monitor.urls import redact_url

# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """short: 1 s at 10 fps; long: 4 s at 10 fps; truncated: the first 60% of an MJPEG AVI."""
    from engine.datasets.synthetic import make_scene

    root = tmp_path_factory.mktemp("ingest")
    info = make_scene(root / "scene", seed=1, size=(120, 160), n_train_clips=1, train_len=10,
                      n_test_clips=1, test_len=40, fps=10)
    avi = root / "full.avi"
    _write_mjpeg_avi(avi, n=40)
    data = avi.read_bytes()
    truncated = root / "truncated.avi"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    return {"short": info.train_videos[0], "long": info.test_videos[0], "truncated": truncated}


def _write_mjpeg_avi(path: Path, n: int) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuvj420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (120, 160, 3), np.uint8), "rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


class Recorder:
    """Sink and status callback that remember everything, for assertions and waits."""

    def __init__(self, stop: threading.Event | None = None, max_frames: int | None = None):
        self.frames: list[Frame] = []
        self.statuses: list[tuple[str, str]] = []
        self.stop, self.max_frames = stop, max_frames
        self.lock = threading.Lock()

    def sink(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)
            if self.max_frames is not None and len(self.frames) >= self.max_frames:
                self.stop.set()

    def on_status(self, camera: str, status: str, detail: str) -> None:
        with self.lock:
            self.statuses.append((status, detail))

    @property
    def status_names(self) -> list[str]:
        with self.lock:
            return [s for s, _ in self.statuses]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; statuses {self.statuses}, "
                             f"{len(self.frames)} frames")


def _worker(rec: Recorder, source, **kw) -> IngestWorker:
    kw.setdefault("realtime", False)
    return IngestWorker("cam1", source, sink=rec.sink, on_status=rec.on_status, **kw)


def _run_in_thread(worker: IngestWorker, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- files

def test_file_sampled_to_half_rate(clips):
    rec = Recorder()
    worker = _worker(rec, clips["long"], fps=5)
    worker.run(threading.Event())
    n = len(rec.frames)
    assert 18 <= n <= 22  # 40 frames at 10 fps -> about 20 at 5 fps
    assert [f.seq for f in rec.frames] == list(range(n))
    steps = np.diff([f.source_ts for f in rec.frames])
    assert np.allclose(steps, 0.2, atol=0.02)
    assert {f.run_id for f in rec.frames} == {worker.run_id} and len(worker.run_id) == 32
    image = rec.frames[0].image
    assert image.dtype == np.uint8 and image.shape == (120, 160, 3)
    assert rec.status_names == ["online", "finished"]
    assert worker.stats.decoded == 40 and worker.stats.sampled == n
    assert worker.stats.decode_errors == 0 and worker.stats.last_frame_wall > 0


def test_reader_resizes_and_keeps_all_frames_without_fps(clips):
    with CameraReader(clips["short"], resolution=(80, 60)) as reader:
        items = list(reader)
    assert len(items) == 10
    assert all(img.shape == (60, 80, 3) and img.dtype == np.uint8 for img, _ in items)
    assert [round(ts, 3) for _, ts in items] == [round(0.1 * i, 3) for i in range(10)]


def test_realtime_paces_by_timestamps(clips):
    rec = Recorder()
    start = time.monotonic()
    _worker(rec, clips["short"], realtime=True).run(threading.Event())
    paced = time.monotonic() - start
    assert len(rec.frames) == 10
    assert 0.8 <= paced <= 2.0  # 10 frames at 10 fps: 0.9 s from the first to the last

    rec = Recorder()
    start = time.monotonic()
    _worker(rec, clips["short"], realtime=False).run(threading.Event())
    assert len(rec.frames) == 10
    assert time.monotonic() - start < paced / 2


def test_loop_continues_timestamps_and_seq(clips):
    stop = threading.Event()
    rec = Recorder(stop, max_frames=25)
    worker = _worker(rec, clips["short"], loop=True)
    worker.run(stop)
    assert len(rec.frames) == 25  # 2.5 passes over a 10-frame clip
    assert [f.seq for f in rec.frames] == list(range(25))
    steps = np.diff([f.source_ts for f in rec.frames])
    assert np.allclose(steps, 0.1, atol=0.01)  # monotonic, also across the restarts
    assert "finished" not in rec.status_names


def test_truncated_file_yields_frames_and_counts_errors(clips):
    rec = Recorder()
    worker = _worker(rec, clips["truncated"])
    worker.run(threading.Event())  # must not raise
    assert 10 <= len(rec.frames) < 40
    assert worker.stats.decode_errors >= 1
    assert rec.status_names[-1] in ("finished", "offline")
    assert "\n" not in rec.statuses[-1][1]


def test_missing_file_goes_offline_with_one_line(tmp_path):
    rec = Recorder()
    missing = tmp_path / "nope.mp4"
    start = time.monotonic()
    _worker(rec, missing, live=False).run(threading.Event())
    assert time.monotonic() - start < 2
    assert rec.frames == []
    assert rec.status_names == ["offline"]
    detail = rec.statuses[0][1]
    assert "nope.mp4" in detail and "\n" not in detail
    with pytest.raises(SourceError, match="not found"):
        open_source(missing, connect_timeout_s=1, read_timeout_s=1)


def test_credentials_never_leak_and_stop_interrupts_backoff(caplog):
    port = _free_port()  # closed: nobody listens there
    url = f"rtsp://user:secretpw@127.0.0.1:{port}/x"
    assert "secretpw" not in redact_url(url)
    with pytest.raises(SourceError) as err:
        open_source(url, connect_timeout_s=2, read_timeout_s=2)
    assert "secretpw" not in str(err.value) and "\n" not in str(err.value)

    caplog.set_level(logging.DEBUG)
    stop = threading.Event()
    rec = Recorder()
    worker = _worker(rec, url, connect_timeout_s=2, read_timeout_s=2, watchdog_s=1,
                     backoff_initial_s=0.1, backoff_max_s=30)
    thread = _run_in_thread(worker, stop)
    rec.wait_for(lambda: worker.stats.reconnects >= 3, 10, "a few reconnect attempts")
    assert rec.status_names == ["offline"]
    stop.set()
    thread.join(1.5)  # the backoff is up to 0.8 s by now: stop must cut it short
    assert not thread.is_alive()
    texts = [d for _, d in rec.statuses] + [r.getMessage() for r in caplog.records]
    assert texts and not any("secretpw" in t for t in texts)
    assert any("***@127.0.0.1" in t for t in texts)


# ---------------------------------------------------------------- RTSP

@pytest.fixture
def rtsp_server(clips, rtsp_server_factory):
    return rtsp_server_factory(clips["long"])


def _rtsp_worker(rec: Recorder, url: str, **kw) -> IngestWorker:
    opts = dict(fps=5, watchdog_s=1, backoff_initial_s=0.2, backoff_max_s=1,
                connect_timeout_s=2, read_timeout_s=1)
    opts.update(kw)
    return _worker(rec, url, **opts)


def test_rtsp_reconnects_after_server_restart(rtsp_server):
    stop = threading.Event()
    rec = Recorder()
    worker = _rtsp_worker(rec, rtsp_server.url)
    thread = _run_in_thread(worker, stop)
    try:
        rec.wait_for(lambda: len(rec.frames) >= 3, 10, "first RTSP frames")
        assert rec.status_names == ["online"]
        image = rec.frames[0].image
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8

        rtsp_server.stop()
        rec.wait_for(lambda: rec.status_names[-1] in ("reconnecting", "offline"), 5, "the loss")
        before = len(rec.frames)
        time.sleep(1.5)  # longer than watchdog_s: the camera stays away
        assert len(rec.frames) == before

        rtsp_server.start()
        rec.wait_for(lambda: len(rec.frames) >= before + 3, 12, "frames after the restart")
        assert rec.status_names[-1] == "online"
        assert "reconnecting" in rec.status_names
        assert worker.stats.reconnects >= 1
    finally:
        stop.set()
        thread.join(3)
    assert not thread.is_alive()
    assert [f.seq for f in rec.frames] == list(range(len(rec.frames)))  # seq continues
    assert {f.run_id for f in rec.frames} == {worker.run_id}


def test_rtsp_hung_stream_is_detected_by_watchdog(rtsp_server):
    stop = threading.Event()
    rec = Recorder()
    # A long PyAV read timeout: only the wall-clock watchdog can notice the silence in time.
    worker = _rtsp_worker(rec, rtsp_server.url, read_timeout_s=6, connect_timeout_s=1.5)
    thread = _run_in_thread(worker, stop)
    try:
        rec.wait_for(lambda: len(rec.frames) >= 2, 10, "first RTSP frames")
        rtsp_server.pause()
        paused_at = time.monotonic()
        rec.wait_for(lambda: rec.status_names[-1] == "reconnecting", 4, "the stall")
        assert time.monotonic() - paused_at < 3
        before = len(rec.frames)
        rtsp_server.resume()
        rec.wait_for(lambda: len(rec.frames) >= before + 2, 15, "frames after the resume")
        assert rec.status_names[-1] == "online"
    finally:
        stop.set()
        thread.join(3)
    assert not thread.is_alive()
    assert [f.seq for f in rec.frames] == list(range(len(rec.frames)))
