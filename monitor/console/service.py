"""The console of one monitor config: what it reads (outputs.dir), which banks feedback
changes (the config's scenes), and who may use it (loopback, or the credentials in the
environment). `spade-monitor console` serves it in the foreground; `run` in a thread."""
from __future__ import annotations

import logging
import threading
import time

from engine.errors import ConfigError

from ..feedback import BankFeedback
from .app import create_app
from .security import console_auth_from_env
from .store import FolderStore

log = logging.getLogger(__name__)


def build_console(config, address: str | None = None):
    """(app, address, port) of the config's console."""
    if not config.outputs.dir:
        raise ConfigError("outputs.dir: not set; the console shows what the engine writes there, so set it in "
                          "the config of both the engine and the console")
    host = address or config.console.address
    auth = console_auth_from_env(host)
    cameras = {cid: cam.scene for cid, cam in config.cameras.items() if cam.enabled}
    device = "cpu" if config.engine.device == "auto" else config.engine.device
    feedback = BankFeedback({sid: scene.bank for sid, scene in config.scenes.items()}, config.outputs.dir, device)
    app = create_app(FolderStore(config.outputs.dir), cameras=cameras, feedback=feedback, auth=auth)
    return app, host, config.console.port


def serve_console(config, address: str | None = None, port: int | None = None) -> int:
    app, host, default_port = build_console(config, address)
    port = default_port if port is None else port
    log.info("console on http://%s:%d/ (reading %s)", host, port, config.outputs.dir)
    serve(app, host, port)
    return 0


class RunningConsole:
    """The console `run` serves beside the engine, stopped with it."""

    def __init__(self, config):
        app, host, port = build_console(config)
        self.server, self.thread = start_in_thread(app, host, port)
        log.info("console on http://%s:%d/", host, port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _server(app, host: str, port: int):
    import uvicorn

    class ConsoleServer(uvicorn.Server):
        async def shutdown(self, *args, **kwargs):
            closing = getattr(getattr(app, "state", None), "closing", None)
            if closing is not None:
                closing.set()  # live streams end themselves, so connections close cleanly
            await super().shutdown(*args, **kwargs)

    # A short graceful shutdown all the same: a stream stuck elsewhere is cancelled after it.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, lifespan="on")
    return ConsoleServer(config)


def serve(app, host: str, port: int) -> None:
    """Serve in the foreground until interrupted."""
    _server(app, host, port).run()


def start_in_thread(app, host: str, port: int, timeout_s: float = 10.0):
    """Serve from a daemon thread; returns (server, thread). Stop: server.should_exit = True; thread.join()."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, name="console-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"console could not start on {host}:{port} (is the port in use?)")
        time.sleep(0.02)
    return server, thread
