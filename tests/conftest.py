import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

# Tests never download: a missing weight file must fail fast, not hang on a closed network.
os.environ.setdefault("SPADE_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    """One small synthetic scene, shared by the tests that need frames with known anomalies."""
    from engine.datasets.synthetic import make_scene

    return make_scene(tmp_path_factory.mktemp("scene"), seed=3, size=(120, 160), n_train_clips=3,
                      train_len=40, n_test_clips=2, test_len=60, write_videos=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port; stop() and start() simulate an outage."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """kill -9: what an OOM kill or a power cut does."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def redis_config_with(args: list[str], workdir: Path) -> dict:
    """CONFIG GET * of a redis-server started with a deploy file's arguments (password 'pw'):
    what the server really made of them."""
    import shutil

    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (scripts/install-system-deps.sh)")
    port = free_port()
    proc = subprocess.Popen([exe, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="pw")
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        return client.config_get("*")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scene_bank(scene, tmp_path_factory) -> Path:
    """The scene's calibrated reference bank (scene 'plaza'), built once: it takes a while on a CPU."""
    from engine.reference import build_reference
    from engine.spade import Spade, preset

    path = tmp_path_factory.mktemp("bank") / "plaza.bank"
    spade = Spade(preset("camera", device="cpu", batch_size=8, max_frames=60))
    build_reference(spade, [scene.root / "training" / "frames"], "plaza", progress=False).save(path)
    return path


# ---------------------------------------------------------------- RTSP camera

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")


class RtspServer:
    """tests/rtsp_server.py on a fixed loopback port; stop/start and pause/resume simulate faults."""

    def __init__(self, video: Path):
        self.video = video
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the port can take a moment to free after a kill
            self.proc = subprocess.Popen(
                [SYSTEM_PYTHON, str(RTSP_SERVER_SCRIPT), "--port", str(self.port), "--file",
                 str(self.video), "--mount", "/cam", "--loop"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = ""
            while time.monotonic() < deadline and self.proc.poll() is None:
                ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
                if ready:
                    line = self.proc.stdout.readline()
                    break
            if line.strip() == "READY":
                return
            self.stop()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"RTSP server did not start: {line!r}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            self.proc.kill()  # abrupt, like a camera losing power
            self.proc.wait(10)
            self.proc.stdout.close()
            self.proc.stderr.close()
            self.proc = None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)  # connections stay open but go silent

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


_RTSP_REASON: list = []


def rtsp_unavailable() -> str | None:
    """Why the RTSP test server cannot run here (None if it can); probed once per session."""
    if not _RTSP_REASON:
        reason = None
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            reason = f"{SYSTEM_PYTHON} not found"
        else:
            probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
                     "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
                     "missing = [e for e in ('x264enc', 'rtph264pay', 'decodebin') "
                     "if Gst.ElementFactory.find(e) is None];"
                     "assert not missing, missing")
            result = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30)
            if result.returncode:
                reason = ("system python lacks gi/GstRtspServer/x264enc: "
                          + (result.stderr.strip().splitlines() or ["?"])[-1])
        _RTSP_REASON.append(reason)
    return _RTSP_REASON[0]


@pytest.fixture
def rtsp_server_factory():
    """start(video) -> a running RtspServer serving `video` in a loop; all are stopped afterwards."""
    reason = rtsp_unavailable()
    if reason:
        pytest.skip(reason)
    servers: list[RtspServer] = []

    def start(video: Path) -> RtspServer:
        server = RtspServer(video)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
