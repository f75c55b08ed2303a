"""Prometheus metrics, and the endpoint that serves them with /healthz and /readyz.

Every metric is defined here, once, so the names the dashboard and the alert rules use are easy
to check (tests/test_observability.py scrapes a live monitor for them). Labels are camera and
scene ids from the config, never a source URL.

The service code never touches prometheus_client: IngestMetrics and EngineMetrics read the
counters the ingest workers, the bus and the engine worker keep anyway, on the loop's tick or
after each batch, and turn them into metric updates.

One process, one endpoint (`run` with an in-process bus, `ingest`, `engine`). `run` with a Redis
bus supervises several processes: they write prometheus_client's multiprocess files into one
folder and the supervisor serves their sum (see multiprocess_dir). Gauge modes say how values
of several processes combine; "live" modes forget a dead process's values.
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine.errors import ConfigError

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

FPS_WINDOW_S = 5.0
HEALTHY_WITHIN_S = 60.0  # /healthz fails when the main loop has not ticked for this long (a hang)
REDIS_CHECK_EVERY_S = 2.0
ENGINE_GAUGES_EVERY_S = 1.0  # bus pending and memory cost a Redis call / a syscall: not every batch

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)  # score / threshold
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# -- ingest (one process per camera group)
FRAMES_DECODED = Counter("spade_camera_frames_decoded_total", "Frames out of the decoder.", ["camera"])
FRAMES_SAMPLED = Counter("spade_camera_frames_sampled_total", "Frames kept by the fps sampler.", ["camera"])
FRAMES_DROPPED = Counter("spade_camera_frames_dropped_total",
                         "Sampled frames that got no result, by reason: reader_behind, engine_behind, "
                         "redis_down (ingest side), corrupt, failed, lost (engine side).", ["camera", "reason"])
CAMERA_FPS = Gauge("spade_camera_fps", f"Sampled frames per second over the last {FPS_WINDOW_S:g} s.",
                   ["camera"], multiprocess_mode="livemax")
CAMERA_UP = Gauge("spade_camera_up", "1 while the camera delivers frames, else 0.", ["camera"],
                  multiprocess_mode="livemax")
RECONNECTS = Counter("spade_camera_reconnects_total", "Attempts to reopen the camera.", ["camera"])
DECODE_ERRORS = Counter("spade_camera_decode_errors_total", "Damaged packets or frames skipped.", ["camera"])
LAST_FRAME_AGE = Gauge("spade_camera_last_frame_age_seconds", "Seconds since the camera's last sampled frame.",
                       ["camera"], multiprocess_mode="livemax")
LAST_FRAME_TS = Gauge("spade_camera_last_frame_timestamp_seconds",
                      "Unix time of the camera's last sampled frame; outlives a dead ingest process.",
                      ["camera"], multiprocess_mode="max")
STAGE_SECONDS = Histogram("spade_stage_duration_seconds",
                          "Pipeline stage latency: decode and bus_wait per frame; backbone, gate, "
                          "pixel_matching, overlay and publish per batch.", ["stage"], buckets=LATENCY_BUCKETS)

# -- engine
FRAMES_PUBLISHED = Counter("spade_camera_frames_published_total", "Frame results published.", ["camera"])
FRAMES_DUPLICATE = Counter("spade_engine_frames_duplicate_total",
                           "Re-delivered frames whose result was already published (not counted as published).",
                           ["camera"])
FRAMES_ESCALATED = Counter("spade_engine_frames_escalated_total", "Frames sent to pixel matching.", ["camera"])
FRAMES_FLAGGED = Counter("spade_engine_frames_flagged_total", "Frames whose image score exceeded tau.", ["camera"])
BATCH_SIZE = Histogram("spade_engine_batch_size", "Frames per engine batch.", buckets=BATCH_BUCKETS)
CAPTURE_TO_PUBLISH = Histogram("spade_capture_to_publish_seconds",
                               "End to end: capture of a frame to publication of its result.", ["camera"],
                               buckets=LATENCY_BUCKETS)
IMAGE_SCORE = Gauge("spade_image_score", "The camera's last image score (smoothed as published).", ["camera"],
                    multiprocess_mode="livemostrecent")
IMAGE_TAU = Gauge("spade_image_score_threshold", "Image threshold tau of the camera's scene.", ["camera"],
                  multiprocess_mode="livemostrecent")
IMAGE_RATIO = Histogram("spade_image_score_ratio", "Image score / tau (1 = the threshold).", ["camera"],
                        buckets=RATIO_BUCKETS)
PIXEL_RATIO = Histogram("spade_pixel_score_ratio", "Peak pixel score / theta, escalated frames only.",
                        ["camera"], buckets=RATIO_BUCKETS)
BUS_PENDING = Gauge("spade_bus_pending_frames", "Frames waiting on the bus or delivered and not yet acknowledged.",
                    multiprocess_mode="livemax")
HEARTBEAT = Gauge("spade_engine_heartbeat_timestamp_seconds",
                  "Unix time of the engine loop's last step; frozen when the engine dies or hangs.",
                  multiprocess_mode="max")
BANK_FRAMES = Gauge("spade_bank_frames", "Reference frames in the scene's loaded bank.", ["scene"],
                    multiprocess_mode="livemax")
BANK_BYTES = Gauge("spade_bank_bytes", "Bytes of the scene's loaded bank features.", ["scene"],
                   multiprocess_mode="livemax")
BANK_LOAD_SECONDS = Gauge("spade_bank_load_seconds", "Time the scene's last bank (re)load took.", ["scene"],
                          multiprocess_mode="livemax")
BANK_CREATED = Gauge("spade_bank_created_timestamp_seconds", "Unix time the scene's bank was built.", ["scene"],
                     multiprocess_mode="livemax")
BANK_LOADED = Gauge("spade_bank_loaded", "1 while the scene's bank is loaded and its file exists, else 0.",
                    ["scene"], multiprocess_mode="livemin")
DEVICE_MEMORY = Gauge("spade_device_memory_bytes",
                      "CUDA memory allocated by the engine, or its resident memory on a CPU device.", ["device"],
                      multiprocess_mode="livemax")
EVENTS_OPENED = Counter("spade_events_opened_total", "Anomaly events opened.", ["camera"])
EVENTS_CLOSED = Counter("spade_events_closed_total", "Anomaly events closed.", ["camera"])
ANOMALY_ACTIVE = Gauge("spade_anomaly_active", "1 while an anomaly event is open on the camera.", ["camera"],
                       multiprocess_mode="livemax")


class _Deltas:
    """Turns running totals into counter increments (counters only go up by what is new)."""

    def __init__(self) -> None:
        self._seen: dict = {}

    def inc(self, counter, labels: tuple, total: float) -> None:
        new = total - self._seen.get((id(counter), labels), 0)
        if new > 0:
            counter.labels(*labels).inc(new)
            self._seen[(id(counter), labels)] = total


class IngestMetrics:
    """Metrics of a group of ingest workers (camera id -> IngestWorker) and the bus they feed."""

    def __init__(self, workers: dict, bus) -> None:
        self.workers = workers
        self.bus = bus
        self._deltas = _Deltas()
        self._recent: dict[str, deque] = {cid: deque() for cid in workers}  # (monotonic, sampled total)
        for cid in workers:  # every camera's series exist from the start, at zero
            for metric in (FRAMES_DECODED, FRAMES_SAMPLED, RECONNECTS, DECODE_ERRORS):
                metric.labels(cid)
            CAMERA_UP.labels(cid).set(0)

    def update(self) -> None:
        now_mono, now = time.monotonic(), time.time()
        drops = self.bus.stats.snapshot().dropped_by_reason
        for cid, worker in self.workers.items():
            stats = worker.stats
            self._deltas.inc(FRAMES_DECODED, (cid,), stats.decoded)
            self._deltas.inc(FRAMES_SAMPLED, (cid,), stats.sampled)
            self._deltas.inc(RECONNECTS, (cid,), stats.reconnects)
            self._deltas.inc(DECODE_ERRORS, (cid,), stats.decode_errors)
            self._deltas.inc(FRAMES_DROPPED, (cid, "reader_behind"), stats.dropped)
            while stats.decode_seconds:
                STAGE_SECONDS.labels("decode").observe(stats.decode_seconds.popleft())
            recent = self._recent[cid]
            recent.append((now_mono, stats.sampled))
            while len(recent) > 2 and now_mono - recent[1][0] >= FPS_WINDOW_S:
                recent.popleft()
            (t0, n0), (t1, n1) = recent[0], recent[-1]
            CAMERA_FPS.labels(cid).set((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)
            CAMERA_UP.labels(cid).set(1 if worker.status == "online" else 0)
            if stats.last_frame_wall:
                LAST_FRAME_AGE.labels(cid).set(max(0.0, now - stats.last_frame_wall))
                LAST_FRAME_TS.labels(cid).set(stats.last_frame_wall)
        for (cid, reason), total in drops.items():
            self._deltas.inc(FRAMES_DROPPED, (cid, reason), total)


class EngineMetrics:
    """Metrics of one EngineWorker: observe() after each batch, update() on every loop step."""

    def __init__(self) -> None:
        self._next_gauges = 0.0
        self._cameras: set[str] = set()

    def observe_batch(self, frames: int, stage_seconds: dict[str, float], bus_wait_s: list[float]) -> None:
        if frames:
            BATCH_SIZE.observe(frames)
        for stage, seconds in stage_seconds.items():
            STAGE_SECONDS.labels(stage).observe(seconds)
        for seconds in bus_wait_s:
            STAGE_SECONDS.labels("bus_wait").observe(seconds)

    def observe_result(self, result) -> None:
        cam = result.camera
        if cam not in self._cameras:
            self._cameras.add(cam)
            for metric in (FRAMES_ESCALATED, FRAMES_FLAGGED, EVENTS_OPENED, EVENTS_CLOSED):
                metric.labels(cam)
            ANOMALY_ACTIVE.labels(cam).set(0)
        FRAMES_PUBLISHED.labels(cam).inc()
        if result.published_ts is not None:
            CAPTURE_TO_PUBLISH.labels(cam).observe(max(0.0, result.published_ts - result.capture_ts))
        IMAGE_SCORE.labels(cam).set(result.image_score)
        IMAGE_TAU.labels(cam).set(result.tau)
        if result.tau > 0:
            IMAGE_RATIO.labels(cam).observe(result.image_score / result.tau)
        if result.escalated:
            FRAMES_ESCALATED.labels(cam).inc()
            if result.max_pixel_score is not None and result.theta:
                PIXEL_RATIO.labels(cam).observe(result.max_pixel_score / result.theta)
        if result.flagged:
            FRAMES_FLAGGED.labels(cam).inc()

    def observe_events(self, events) -> None:
        for event in events:
            if event.kind == "start":
                EVENTS_OPENED.labels(event.camera).inc()
                ANOMALY_ACTIVE.labels(event.camera).set(1)
            elif event.kind == "end":
                EVENTS_CLOSED.labels(event.camera).inc()
                ANOMALY_ACTIVE.labels(event.camera).set(0)

    def observe_duplicate(self, camera: str) -> None:
        FRAMES_DUPLICATE.labels(camera).inc()

    def observe_drop(self, camera: str, reason: str, n: int = 1) -> None:
        FRAMES_DROPPED.labels(camera, reason).inc(n)

    def observe_scene(self, name: str, frames: int, nbytes: int, load_seconds: float, created_ts: float | None,
                      present: bool = True) -> None:
        BANK_FRAMES.labels(name).set(frames)
        BANK_BYTES.labels(name).set(nbytes)
        BANK_LOAD_SECONDS.labels(name).set(load_seconds)
        if created_ts is not None:
            BANK_CREATED.labels(name).set(created_ts)
        BANK_LOADED.labels(name).set(1 if present else 0)

    def scene_file_missing(self, name: str, missing: bool) -> None:
        BANK_LOADED.labels(name).set(0 if missing else 1)

    def beat(self) -> None:
        """The engine is alive. Also called while it loads banks: until its first beat, the
        multiprocess view holds only the other processes' zero, and EngineDown would fire."""
        HEARTBEAT.set(time.time())

    def update(self, bus, device: str) -> None:
        self.beat()
        now = time.monotonic()
        if now < self._next_gauges:
            return
        self._next_gauges = now + ENGINE_GAUGES_EVERY_S
        try:
            BUS_PENDING.set(bus.pending())
        except Exception as exc:  # Redis down: the bus logs it; keep the last value
            log.debug("bus pending unavailable: %s", exc)
        DEVICE_MEMORY.labels(device).set(device_memory_bytes(device))


def device_memory_bytes(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.memory_allocated(torch.device(device)))
    return float(resident_bytes())


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak instead of current
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------- health

class Health:
    """What /healthz and /readyz answer. beat() from the main loop; ready once banks are loaded
    (set_loaded) and Redis, when used, answers a PING."""

    def __init__(self, redis_url: str | None = None, needs_banks: bool = True,
                 loaded: Callable[[], bool] | None = None) -> None:
        self.redis_url = redis_url
        self.needs_banks = needs_banks
        self._loaded_flag = False
        self._loaded = loaded  # e.g. a multiprocessing Event's is_set, for a supervisor
        self._last_beat = time.monotonic()
        self._redis_ok: tuple[float, str | None] = (0.0, "not checked yet")
        self._client: "redis.Redis | None" = None

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_loaded(self) -> None:
        self._loaded_flag = True

    def live(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._last_beat
        if idle > HEALTHY_WITHIN_S:
            return False, f"main loop stuck for {idle:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.needs_banks and not (self._loaded_flag or (self._loaded is not None and self._loaded())):
            return False, "reference banks not loaded yet"
        problem = self._redis_problem()
        if problem:
            return False, problem
        return True, "ok"

    def _redis_problem(self) -> str | None:
        if self.redis_url is None:
            return None
        checked, problem = self._redis_ok
        if time.monotonic() - checked < REDIS_CHECK_EVERY_S:
            return problem
        import redis

        try:
            if self._client is None:
                self._client = redis.Redis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._client.ping()
            problem = None
        except redis.RedisError as exc:
            problem = f"Redis unreachable ({type(exc).__name__})"  # never the URL: it may hold a password
        self._redis_ok = (time.monotonic(), problem)
        return problem


# ---------------------------------------------------------------- endpoint

class MetricsServer:
    """/metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(self, address: str, port: int, health: Health, registry: CollectorRegistry = REGISTRY) -> None:
        self.health = health
        self.registry = registry
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, why = server.health.live() if path == "/healthz" else server.health.ready()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
                pass

        try:
            self.httpd = ThreadingHTTPServer((address, port), Handler)
        except OSError as exc:
            raise ConfigError(f"metrics.port: cannot listen on {address}:{port}: {exc.strerror or exc}; "
                              f"pick a free port (or 0 to turn metrics off)") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", address, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(config, health: Health, registry: CollectorRegistry = REGISTRY) -> MetricsServer | None:
    """The endpoint for config.metrics, or None when metrics.port is 0."""
    if not config.metrics.port:
        return None
    return MetricsServer(config.metrics.address, config.metrics.port, health, registry)


def multiprocess_registry(path: str | Path) -> CollectorRegistry:
    """A registry that sums the metric files every child process writes into `path`."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return registry


def mark_process_dead(pid: int, path: str | Path) -> None:
    """Forget a dead child's live gauges (its counters stay: they are totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))
