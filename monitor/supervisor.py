"""`spade-monitor run`: the whole monitor for one config, until a signal or until every file ends.

With the in-process bus it is one process (monitor/runner.run_local). With the Redis bus the
Supervisor starts one ingest process per enabled camera and one engine process ('spawn'
context), restarts any that dies abnormally (one log line each), and serves their metrics as
one endpoint. `run` ends on its own once every camera has finished (files without loop) and
the engine has drained everything.

Child exit codes: 0 done; 2 user error (the service stops: a restart would fail the same way);
anything else is a crash, logged in one line and restarted with backoff.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.errors import SpadeError

from .config import MonitorConfig, camera_ids
from .retry import Backoff
from .runner import (
    DRAIN_LIMIT_S,
    EXIT_NOTHING_READ,
    INGEST_STOP_S,
    RESTART_MAX_S,
    RESTART_MIN_S,
    STABLE_S,
    TICK_S,
    metrics_endpoint,
    nothing_read_code,
    one_line,
    redis_for_health,
    run_engine,
    run_ingest,
    run_local,
    setup_logging,
    stop_on_signals,
)
from .telemetry import Health, mark_process_dead, multiprocess_registry

log = logging.getLogger(__name__)

ENGINE_STOP_S = DRAIN_LIMIT_S + 20.0  # a batch in flight plus the drain
ENGINE_DRAIN_ALL_S = 3600.0  # every file ended: the engine works through the whole backlog
EXIT_USER_ERROR = 2


# ---------------------------------------------------------------- supervised processes

def _child_main(role: str, config: MonitorConfig, cameras: list[str] | None, stop_event, drain_all, ready,
                log_json: bool, log_level: str) -> None:
    setup_logging(log_json, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group; the parent orders the stop
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = multiprocessing.parent_process()

    def watch() -> None:  # also stop if the supervisor died without telling us
        while not stop.wait(TICK_S):
            if stop_event.is_set() or (parent is not None and not parent.is_alive()):
                stop.set()

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
    name = multiprocessing.current_process().name
    try:
        if role == "engine":
            run_engine(config, stop, drain_all, ready=ready, serve_metrics=False)
        else:
            sys.exit(run_ingest(config, cameras or [], stop, serve_metrics=False))
    except SpadeError as exc:
        log.error("%s: %s", name, exc)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        log.error("%s crashed: %s", name, one_line(exc))
        log.debug("crash", exc_info=True)
        sys.exit(1)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Child:
    name: str
    role: str  # 'engine' or 'ingest'
    cameras: list[str] | None
    proc: multiprocessing.process.BaseProcess | None = None
    started: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(RESTART_MIN_S, RESTART_MAX_S))
    restart_at: float = 0.0
    done: bool = False
    read_nothing: bool = False  # an ingest child whose cameras all ended without a frame


class Supervisor:
    """`run` with a Redis bus: an engine process and one ingest process per camera.

    Metrics: the children write prometheus_client's multiprocess files into a private folder
    and this process serves their sum, so `run` has one endpoint whatever it starts. /readyz
    is ready once the engine child has loaded its banks and Redis answers.
    """

    def __init__(self, config: MonitorConfig, log_json: bool = False):
        self.config = config
        self.log_json = log_json
        self.ctx = multiprocessing.get_context("spawn")
        self.ingest_stop = self.ctx.Event()
        self.engine_stop = self.ctx.Event()
        self.drain_all = self.ctx.Event()
        self.engine_ready = self.ctx.Event()
        self.metrics_dir: str | None = None
        self.children = [_Child("engine", "engine", None)] + [
            _Child(f"ingest-{cid}", "ingest", [cid]) for cid in camera_ids(config)]

    def _start(self, child: _Child) -> None:
        stop = self.engine_stop if child.role == "engine" else self.ingest_stop
        if child.role == "engine":
            self.engine_ready.clear()
        child.proc = self.ctx.Process(
            target=_child_main, name=child.name, daemon=False,
            args=(child.role, self.config, child.cameras, stop, self.drain_all, self.engine_ready, self.log_json,
                  self.config.logging.level))
        child.proc.start()
        child.started = time.monotonic()

    def run(self, stop: threading.Event) -> int:
        if not self.config.metrics.port:
            return self._run(stop, Health())
        with tempfile.TemporaryDirectory(prefix="spade-metrics-") as folder:
            # Spawned children import prometheus_client with this set: they write files here.
            previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir = folder
            try:
                health = Health(self.config.redis.connection_url(), loaded=self.engine_ready.is_set)
                with metrics_endpoint(self.config, health, multiprocess_registry(folder)):
                    return self._run(stop, health)
            finally:
                if previous is None:
                    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
                else:
                    os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous

    def _run(self, stop: threading.Event, health: Health) -> int:
        log.info("starting the engine and %d ingest process(es)", len(self.children) - 1)
        code = 0
        try:
            for child in self.children:
                self._start(child)
            while not stop.wait(TICK_S):
                health.beat()
                if self._check():
                    code = EXIT_USER_ERROR
                    break
                ingest = [c for c in self.children if c.role == "ingest"]
                if all(c.done for c in ingest):
                    if all(c.read_nothing for c in ingest):
                        log.error("no frame could be read from any camera (see above): check the sources")
                        code = EXIT_NOTHING_READ
                    log.info("every camera has finished; the engine drains the bus and stops")
                    self.drain_all.set()
                    break
        finally:
            if not self._shutdown() and code == 0:
                code = 1
        return code

    def _check(self) -> bool:
        """Restart dead children; True when one failed with a user error."""
        now = time.monotonic()
        for child in self.children:
            if child.done:
                continue
            if child.proc is None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            if child.proc.is_alive():
                continue
            code = child.proc.exitcode
            child.proc.join()
            self._forget_metrics(child.proc.pid)
            child.proc.close()
            child.proc = None
            if code in (0, EXIT_NOTHING_READ) and child.role == "ingest":
                child.done = True  # its file ended or cannot be read: a restart changes nothing
                child.read_nothing = code == EXIT_NOTHING_READ
                continue
            if code == EXIT_USER_ERROR:
                log.error("%s cannot run (its error is above); stopping the monitor", child.name)
                return True
            if now - child.started > STABLE_S:
                child.backoff.reset()
            delay = child.backoff.next()
            log.warning("%s exited unexpectedly (%s); restarting in %.0fs", child.name, _exit_text(code), delay)
            child.restart_at = now + delay
        return False

    def _forget_metrics(self, pid: int | None) -> None:
        if self.metrics_dir is not None and pid is not None:
            mark_process_dead(pid, self.metrics_dir)

    def _stop_children(self, role: str, event, timeout: float) -> None:
        event.set()
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.role != role or child.proc is None:
                continue
            child.proc.join(max(0.0, deadline - time.monotonic()))
            if child.proc.is_alive():
                log.warning("%s did not stop within %.0fs; killing it", child.name, timeout)
                child.proc.kill()
                child.proc.join(5)

    def _shutdown(self) -> bool:
        """Stop ingest, then the engine; False when frames the bus accepted were left unscored."""
        self._stop_children("ingest", self.ingest_stop, INGEST_STOP_S + 2)
        drained = True
        if self.drain_all.is_set():
            drained = self._drain_engine()
        else:
            self._stop_children("engine", self.engine_stop, ENGINE_STOP_S)
        log.info("monitor stopped")
        return drained

    def _drain_engine(self, attempts: int = 3) -> bool:
        """Every camera has finished: an engine works through all the bus accepted, a dead
        engine's pending frames included. One that is down (or dies meanwhile) is started again."""
        engine = next(c for c in self.children if c.role == "engine")
        self.engine_stop.set()  # a (re)started engine skips the live loop and drains
        for attempt in range(attempts + 1):
            if engine.proc is None:
                if attempt == attempts:
                    break
                log.info("starting the engine again to drain what the cameras sent")
                self._start(engine)
            proc = engine.proc
            assert proc is not None  # started above
            proc.join(ENGINE_DRAIN_ALL_S)
            if proc.is_alive():
                log.warning("engine did not finish draining within %.0fs; killing it", ENGINE_DRAIN_ALL_S)
                proc.kill()
                proc.join(5)
            code = proc.exitcode
            self._forget_metrics(proc.pid)
            proc.close()
            engine.proc = None
            if code == 0:
                return True
            log.warning("engine exited unexpectedly (%s) while draining", _exit_text(code))
        log.error("the engine could not drain the bus: frames still queued or pending in Redis stay there "
                  "for the next engine")
        return False


# ---------------------------------------------------------------- entry point

def run_service(config: MonitorConfig, log_json: bool = False) -> int:
    """`spade-monitor run`: the whole monitor for this config, until a signal (or all files end)."""
    with stop_on_signals() as stop, console_beside(config):
        if config.bus.kind == "inprocess":
            health = Health(redis_for_health(config))
            with metrics_endpoint(config, health):
                result = run_local(config, stop, health=health)
            result.engine.log_stats()
            return nothing_read_code(result.ingest)
        config.redis.connection_url()  # an unset password_env fails here, in one line
        return Supervisor(config, log_json).run(stop)


@contextmanager
def console_beside(config: MonitorConfig):
    """The console, served for as long as `run` runs, when the config enables it."""
    if not config.console.enabled:
        yield
        return
    from .console.service import RunningConsole

    console = RunningConsole(config)
    try:
        yield
    finally:
        console.stop()
