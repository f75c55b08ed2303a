"""Running the parts of the service: ingest, engine, and both in one process, each with a clean stop.

`spade-monitor run` puts them together (monitor/supervisor.py). bus.kind picks the layout:

- inprocess: one process (run_local). One ingest thread per enabled camera feeds an InProcessBus
  and the engine runs on the main thread; no Redis is needed. Results go to outputs.dir
  (DirectoryPublisher), and to Redis only when the config file has an explicit `redis:`
  section (its defaults alone never turn Redis on). With neither there is nowhere to publish,
  which is a config error. Frames in the in-memory bus die with the process, so a stop drains
  them all before exiting.
- redis: `ingest` (run_ingest) and `engine` (run_engine) run as separate processes, which `run`
  supervises. On a stop the engine drains for at most DRAIN_LIMIT_S; frames left over stay in
  Redis (unread, or pending and claimed by the next engine after engine.claim_idle_s), so none
  is lost. Results, events and status go to Redis, and to outputs.dir as well when it is set.

SIGTERM or SIGINT: ingest stops first, then the engine finishes its batch, drains, acks what it
processed and exits; exit code 0. A second signal forces the stop.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import redis

from engine.errors import ConfigError

from .bus import BusClosed, InProcessBus
from .config import MonitorConfig, camera_ids
from .ingest import OFFLINE, IngestWorker
from .ownership import CameraLeases
from .publish import DirectoryPublisher, MultiPublisher, PublishError, RedisPublisher, StatusFile
from .redis_bus import RedisFrameBus
from .retry import Backoff
from .telemetry import Health, IngestMetrics, serve
from .urls import scrub

if TYPE_CHECKING:
    from .worker import EngineWorker  # torch: imported where the engine runs

log = logging.getLogger(__name__)

DRAIN_LIMIT_S = 3.0  # redis bus: what is left after this stays in Redis for the next engine
TICK_S = 0.2
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
STABLE_S = 60.0  # a child or thread that ran this long before dying restarts fast again
DROP_REPORT_S = 5.0
INGEST_STOP_S = 5.0
EXIT_NOTHING_READ = 3  # every camera ended without a single frame: a run that did nothing


# ---------------------------------------------------------------- logging

class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "process": record.processName,
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(as_json: bool = False, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(processName)s] %(message)s",
                                               "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


# ---------------------------------------------------------------- signals

@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event set by the first SIGTERM/SIGINT; a second one raises KeyboardInterrupt (forced stop)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("%s received: stopping (send it again to force)", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals can only be handled on the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- sinks

def uses_redis_publisher(config: MonitorConfig) -> bool:
    return config.bus.kind == "redis" or "redis" in config.explicit


def build_publisher(config: MonitorConfig, *, results: bool = True):
    """Redis and/or outputs.dir, as the module docstring says; results=False: status only."""
    sinks: list = []
    if uses_redis_publisher(config):
        red = config.redis
        sinks.append(RedisPublisher(red.connection_url(), stream_maxlen=red.stream_maxlen,
                                    overlay_ttl_s=red.overlay_ttl_s, overlays_per_camera=red.overlays_per_camera))
    if config.outputs.dir:
        sinks.append(DirectoryPublisher(config.outputs.dir) if results else StatusFile(config.outputs.dir))
    if not sinks:
        raise ConfigError("outputs.dir: results would go nowhere; with bus.kind inprocess set outputs.dir "
                          "(a folder for JSON Lines and overlays) or add a redis: section")
    return sinks[0] if len(sinks) == 1 else MultiPublisher(sinks)


def make_redis_bus(config: MonitorConfig, cameras: list[str], consumer: str | None = None) -> RedisFrameBus:
    bus = config.bus
    return RedisFrameBus(config.redis.connection_url(), consumer=consumer, max_len=bus.max_len,
                         max_age_s=bus.max_age_s, codec=bus.codec, jpeg_quality=bus.jpeg_quality, cameras=cameras)


def _require_redis(config: MonitorConfig, what: str) -> None:
    if config.bus.kind != "redis":
        raise ConfigError(f"bus.kind: '{what}' runs one part of the service and needs bus.kind: redis, "
                          f"got {config.bus.kind}; use 'spade-monitor run' for an in-process monitor")


def select_cameras(config: MonitorConfig, requested: list[str] | None) -> list[str]:
    enabled = camera_ids(config)
    if not requested:
        return enabled
    for cid in requested:
        if cid not in config.cameras:
            raise ConfigError(f"--camera {cid}: unknown camera; expected one of {', '.join(config.cameras)}")
        if cid not in enabled:
            raise ConfigError(f"--camera {cid}: the camera is disabled in the config (enabled: false)")
    return list(dict.fromkeys(requested))


class StatusRelay:
    """The ingest on_status callback. Changes are queued and published by flush(), called from the
    supervising loop, so a slow or unreachable sink never stalls a camera; failures are retried in
    order (each status line carries the time it was published)."""

    MAX_QUEUED = 200
    RETRY_S = 2.0
    # Each camera's current status is published again this often, and after an outage, so a
    # Redis that lost its data (restarted without persistence) gets it back.
    REFRESH_S = 60.0

    def __init__(self, publisher):
        self.publisher = publisher
        self._queue: deque[tuple[str, str, str]] = deque(maxlen=self.MAX_QUEUED)
        self._current: dict[str, tuple[str, str, str]] = {}
        self._lock = threading.Lock()
        self._failing = False
        self._retry_at = 0.0
        self._refresh_at = time.monotonic() + self.REFRESH_S

    def __call__(self, camera: str, status: str, detail: str) -> None:
        with self._lock:
            self._queue.append((camera, status, detail))
            self._current[camera] = (camera, status, detail)

    def _requeue_current(self) -> None:
        with self._lock:
            queued = {item[0] for item in self._queue}
            self._queue.extend(item for cam, item in self._current.items() if cam not in queued)
        self._refresh_at = time.monotonic() + self.REFRESH_S

    def flush(self, force: bool = False) -> None:
        if self._failing and not force and time.monotonic() < self._retry_at:
            return
        if time.monotonic() >= self._refresh_at:
            self._requeue_current()
        while True:
            with self._lock:
                if not self._queue:
                    return
                item = self._queue[0]
            try:
                self.publisher.publish_status(*item)
            except PublishError as exc:
                self._retry_at = time.monotonic() + self.RETRY_S
                if not self._failing:
                    self._failing = True
                    log.warning("camera status not published yet, will retry: %s", exc)
                return
            with self._lock:
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()
            if self._failing:
                self._failing = False
                log.info("camera status publishing resumed")
                self._requeue_current()  # the sink may have lost what it had


# ---------------------------------------------------------------- ingest

class IngestGroup:
    """One ingest thread per camera, feeding one bus. A thread that dies of an unexpected error
    is logged in one line and restarted (a new ingest run: seq restarts under a new run_id)."""

    def __init__(self, config: MonitorConfig, cameras: list[str], bus, on_status: Callable):
        self.config = config
        self.bus = bus
        self.stop_event = threading.Event()
        self.workers = {cid: self._worker(cid, on_status) for cid in cameras}
        self.metrics = IngestMetrics(self.workers, bus)
        self.threads: dict[str, threading.Thread] = {}
        self._drops_seen: dict[tuple[str, str], int] = {}
        self._next_report = time.monotonic() + DROP_REPORT_S

    def _worker(self, cid: str, on_status: Callable) -> IngestWorker:
        cam, ing = self.config.cameras[cid], self.config.ingest
        live = cam.effective_mode == "live"  # live: drop the oldest when the engine lags; replay: wait

        def sink(frame) -> None:
            self.bus.put(frame, live=live)

        return IngestWorker(cid, cam.source, fps=cam.fps, resolution=cam.resolution, realtime=cam.realtime,
                            loop=cam.loop, watchdog_s=ing.watchdog_s, backoff_initial_s=ing.backoff_initial_s,
                            backoff_max_s=ing.backoff_max_s, connect_timeout_s=ing.connect_timeout_s,
                            read_timeout_s=ing.read_timeout_s, sink=sink, on_status=on_status)

    def start(self) -> None:
        for cid, worker in self.workers.items():
            thread = threading.Thread(target=self._run_camera, args=(cid, worker), name=f"ingest-{cid}",
                                      daemon=True)
            self.threads[cid] = thread
            thread.start()

    def _run_camera(self, cid: str, worker: IngestWorker) -> None:
        backoff = Backoff(RESTART_MIN_S, RESTART_MAX_S)
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                worker.run(self.stop_event)
                return  # the file ended (or failed for good), or stop
            except BusClosed:
                return
            except Exception as exc:  # a bug or an unexpected library error: restart, never die silently
                if self.stop_event.is_set():
                    return
                if time.monotonic() - started > STABLE_S:
                    backoff.reset()
                delay = backoff.next()
                log.error("ingest %s failed (%s); restarting in %.0fs", cid, scrub(one_line(exc), worker.source),
                          delay)
                if self.stop_event.wait(delay):
                    return

    def done(self) -> bool:
        return all(not t.is_alive() for t in self.threads.values())

    def failed_cameras(self) -> dict[str, str]:
        """Cameras that ended offline (a file that could not be read), with the reason."""
        return {cid: w.detail for cid, w in self.workers.items() if w.status == OFFLINE}

    def nothing_read(self) -> bool:
        """True when every camera has ended without handing on a single frame."""
        return self.done() and all(w.stats.sampled == 0 for w in self.workers.values())

    def tick(self) -> None:
        """Housekeeping from the supervising loop: metrics and drop reports."""
        self.metrics.update()
        self.report_drops()

    def report_drops(self, force: bool = False) -> None:
        """Log frames the bus lost since the last report (engine behind, or Redis down)."""
        now = time.monotonic()
        if not force and now < self._next_report:
            return
        self._next_report = now + DROP_REPORT_S
        stats = self.bus.stats.snapshot()
        for (cam, reason), total in sorted(stats.dropped_by_reason.items()):
            new = total - self._drops_seen.get((cam, reason), 0)
            if new > 0:
                self._drops_seen[(cam, reason)] = total
                log.warning("camera %s: %d frame(s) dropped (%s), %d in total", cam, new, reason, total)

    def stop(self) -> None:
        """Stop every camera; the bus is closed too, which wakes a put waiting for room."""
        self.stop_event.set()
        deadline = time.monotonic() + 1.0
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        self.bus.close()
        deadline = time.monotonic() + INGEST_STOP_S
        for cid, thread in self.threads.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # stuck in a blocking read; PyAV's own timeout ends it later
                log.warning("ingest %s did not stop within %.0fs", cid, INGEST_STOP_S)
        self.report_drops(force=True)
        self.metrics.update()


@contextmanager
def metrics_endpoint(config: MonitorConfig, health: Health, registry=None) -> Iterator[None]:
    """/metrics, /healthz and /readyz for the duration (nothing when metrics.port is 0)."""
    server = serve(config, health) if registry is None else serve(config, health, registry)
    try:
        yield
    finally:
        if server is not None:
            server.close()


def redis_for_health(config: MonitorConfig) -> str | None:
    return config.redis.connection_url() if uses_redis_publisher(config) else None


def run_ingest(config: MonitorConfig, cameras: list[str], stop: threading.Event, serve_metrics: bool = True) -> int:
    """The `ingest` command and the ingest child of `run`: cameras -> Redis frame bus.
    The child of `run` leaves the endpoint and the summary to its supervisor (serve_metrics=False).
    Returns EXIT_NOTHING_READ when every camera ended without a frame, else 0."""
    _require_redis(config, "ingest")
    health = Health(redis_for_health(config), needs_banks=False)
    with metrics_endpoint(config, health) if serve_metrics else nullcontext():
        publisher = build_publisher(config, results=False)
        bus = make_redis_bus(config, cameras)
        relay = StatusRelay(publisher)
        group = IngestGroup(config, cameras, bus, relay)
        log.info("ingest: cameras %s -> %s (pid %d)", ", ".join(cameras), bus.url_for_logs, os.getpid())
        group.start()
        try:
            while not stop.wait(TICK_S):
                health.beat()
                relay.flush()
                group.tick()
                if group.done():
                    break
        finally:
            group.stop()
            group.tick()  # the last frames' counts, or sampled would fall short of what the engine got
            relay.flush(force=True)
            publisher.close()
        return nothing_read_code(group, report=serve_metrics)


def nothing_read_code(group: IngestGroup, report: bool = True) -> int:
    if not group.nothing_read():
        return 0
    if not report:
        return EXIT_NOTHING_READ
    reasons = "; ".join(f"{cid}: {detail}" for cid, detail in group.failed_cameras().items())
    log.error("no frame could be read from any camera (%s): check the sources", reasons or "none delivered")
    return EXIT_NOTHING_READ


# ---------------------------------------------------------------- engine

def run_engine(config: MonitorConfig, stop: threading.Event, drain_all: "threading.Event | None" = None,
               ready: "threading.Event | None" = None, serve_metrics: bool = True):
    """The `engine` command and the engine child of `run`: Redis frame bus -> results.
    `ready` is set once the models are loaded. The child of `run` leaves the endpoint to its
    supervisor (serve_metrics=False)."""
    _require_redis(config, "engine")
    health = Health(redis_for_health(config))
    with metrics_endpoint(config, health) if serve_metrics else nullcontext():
        return _engine_loop(config, stop, drain_all, ready, health)


def _engine_loop(config: MonitorConfig, stop: threading.Event, drain_all, ready, health: Health):
    from .worker import EngineWorker  # torch: only where the engine runs

    publisher = build_publisher(config)
    bus = make_redis_bus(config, camera_ids(config), consumer=f"engine-{socket.gethostname()}-{os.getpid()}")
    leases = CameraLeases(redis.Redis.from_url(config.redis.connection_url(), socket_timeout=5.0,
                                               socket_connect_timeout=2.0),
                          bus.consumer, camera_ids(config), config.engine.lease_s)
    try:
        engine = EngineWorker(config, bus, publisher, leases=leases)
        log.info("engine: cameras %s from %s on %s (pid %d)", ", ".join(camera_ids(config)), bus.url_for_logs,
                 engine.device, os.getpid())
        engine.stopping = stop
        health.set_loaded()
        if ready is not None:
            ready.set()
        while not stop.is_set():
            health.beat()
            engine.step()  # also claims frames a dead engine left pending, and reloads changed banks
        everything = drain_all is not None and drain_all.is_set()
        # Every camera finished: this is the only engine, so what others hold pending is a dead
        # engine's and is taken over at once, not after claim_idle_s.
        engine.drain(limit_s=None if everything else DRAIN_LIMIT_S, claim_idle_s=0.0 if everything else None)
        engine.close()
        engine.log_stats()
        return engine
    finally:
        bus.close()
        publisher.close()


# ---------------------------------------------------------------- one process

@dataclass
class LocalRun:
    engine: EngineWorker
    ingest: IngestGroup
    seconds: float


def run_local(config: MonitorConfig, stop: threading.Event,
              on_frames: Callable[[int], None] | None = None, health: Health | None = None) -> LocalRun:
    """Ingest threads + engine in this process over an InProcessBus, until stop or until every
    camera has finished; then everything the bus accepted is processed. `health` (for an
    endpoint) hears the loop's beats and when the banks are loaded."""
    from .worker import EngineWorker

    health = health if health is not None else Health(needs_banks=True)
    publisher = build_publisher(config)
    try:
        bus = InProcessBus(max_len=config.bus.max_len, max_age_s=config.bus.max_age_s)
        engine = EngineWorker(config, bus, publisher)
        health.set_loaded()
        t0 = time.perf_counter()  # frames/s of the pipeline, not of loading models
        relay = StatusRelay(publisher)
        ingest = IngestGroup(config, camera_ids(config), bus, relay)
        engine.stopping = stop
        ingest.start()
        try:
            while not stop.is_set():
                health.beat()
                n = engine.step()
                if n and on_frames:
                    on_frames(n)
                relay.flush()
                ingest.tick()
                if ingest.done() and bus.pending() == 0:
                    break
        finally:
            ingest.stop()
            while True:  # the bus is closed now: step returns at once when it is empty
                n = engine.step(max_wait_s=0.5)
                if not n:
                    break
                if on_frames:
                    on_frames(n)
            engine.close()
            relay.flush(force=True)
    finally:
        publisher.close()
    return LocalRun(engine, ingest, time.perf_counter() - t0)
