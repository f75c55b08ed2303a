"""Chaos check: the monitor through engine crashes, Redis crashes and overload, and its books.

    python tests/chaos.py [--minutes 3] [--cameras 3] [--out DIR]

`spade-monitor ingest` and `spade-monitor engine` run as separate processes on a real
redis-server without persistence (so a crash loses what Redis held), with file cameras played
as live cameras (looped in real time: they shed frames when the engine falls behind). Each
cycle: kill -9 the engine and start another; freeze the engine until a backlog builds, kill -9
Redis and start it empty; freeze the engine longer than bus.max_age_s. Then ingest stops, the
engine finishes what is queued, and the table gives per camera the frames sampled, published,
dropped by reason and duplicated, and `lost uncounted` = sampled - published - dropped, which
must be 0: every sampled frame has one result or is counted as dropped with a reason.
Counts come from the processes' own Prometheus counters (multiprocess files), dead ones included.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import redis
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from conftest import RedisServer  # noqa: E402  (tests/ is on the path above)

CLAIM_IDLE_S = 3.0  # short, so a dead engine's frames move on within the run
FREEZE_S = 8.0  # longer than MAX_AGE_S: the frozen engine's cameras shed frames
MAX_AGE_S = 4.0
COLUMNS = ("sampled", "published", "dropped", "duplicated", "lost uncounted")


def build_bank(workdir: Path) -> tuple[Path, list[Path]]:
    """A small synthetic scene's calibrated bank and its test videos (the cameras)."""
    from engine.datasets.synthetic import make_scene
    from engine.reference import build_reference
    from engine.spade import Spade, preset

    scene = make_scene(workdir / "scene", seed=3, size=(120, 160), n_train_clips=3, train_len=40,
                       n_test_clips=2, test_len=60, write_videos=True)
    bank = workdir / "plaza.bank"
    spade = Spade(preset("camera", device="cpu", batch_size=8, max_frames=60))
    build_reference(spade, [scene.root / "training" / "frames"], "plaza", progress=False).save(bank)
    return bank, list(scene.test_videos)


class Service:
    """The ingest and engine processes, sharing one folder of Prometheus counters."""

    def __init__(self, workdir: Path, bank: Path, videos: list[Path], cameras: int, redis_url: str):
        self.workdir = workdir
        self.metrics_dir = workdir / "metrics"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.names = [f"cam{i}" for i in range(cameras)]
        config = {
            "cameras": {name: {"source": str(videos[i % len(videos)]), "scene": "plaza", "fps": 5,
                               "mode": "live", "loop": True, "realtime": True}
                        for i, name in enumerate(self.names)},
            "scenes": {"plaza": {"bank": str(bank)}},
            "engine": {"device": "cpu", "max_batch": 8, "threads": 1, "claim_idle_s": CLAIM_IDLE_S},
            "bus": {"kind": "redis", "max_len": 30, "max_age_s": MAX_AGE_S},
            "redis": {"url": redis_url},
            "ingest": {"watchdog_s": 2, "backoff_initial_s": 0.2, "backoff_max_s": 1},
            "metrics": {"port": 0},
        }
        self.config = workdir / "chaos.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.ingest: subprocess.Popen | None = None
        self.engine: subprocess.Popen | None = None
        self._logs = 0

    def _start(self, command: str) -> subprocess.Popen:
        self._logs += 1
        log = (self.workdir / f"{self._logs:02d}-{command}.log").open("w")
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-m", "monitor.cli", command, "--config", str(self.config)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_ingest(self) -> None:
        self.ingest = self._start("ingest")

    def start_engine(self) -> None:
        self.engine = self._start("engine")

    def kill_engine(self) -> None:
        self.engine.kill()
        self.engine.wait(10)

    def freeze_engine(self, frozen: bool) -> None:
        self.engine.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)


def counters(metrics_dir: Path) -> dict[str, dict[str, float]]:
    """Per camera: sampled, published, duplicated and dropped (by reason, as dropped:REASON)."""
    from monitor.telemetry import multiprocess_registry

    wanted = {"spade_camera_frames_sampled_total": "sampled", "spade_camera_frames_published_total": "published",
              "spade_engine_frames_duplicate_total": "duplicated", "spade_camera_frames_dropped_total": "dropped"}
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for metric in multiprocess_registry(metrics_dir).collect():
        for sample in metric.samples:
            column = wanted.get(sample.name)
            if column is None:
                continue
            if column == "dropped":
                column = f"dropped:{sample.labels['reason']}"
            out[sample.labels["camera"]][column] += sample.value
    return out


def table(counts: dict[str, dict[str, float]]) -> tuple[list[dict], str]:
    """Rows per camera and in total, and the printed table."""
    reasons = sorted({k.split(":", 1)[1] for c in counts.values() for k in c if k.startswith("dropped:")})
    rows = []
    for camera in sorted(counts) + ["total"]:
        cams = sorted(counts) if camera == "total" else [camera]
        row = {"camera": camera}
        for key in ("sampled", "published", "duplicated"):
            row[key] = int(sum(counts[c].get(key, 0) for c in cams))
        row["dropped"] = {r: int(sum(counts[c].get(f"dropped:{r}", 0) for c in cams)) for r in reasons}
        row["lost uncounted"] = row["sampled"] - row["published"] - sum(row["dropped"].values())
        rows.append(row)
    head = ["camera", "sampled", "published"] + [f"dropped {r}" for r in reasons] + ["duplicated", "lost uncounted"]
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for row in rows:
        cells = [row["camera"], row["sampled"], row["published"]] + [row["dropped"][r] for r in reasons] + \
                [row["duplicated"], row["lost uncounted"]]
        lines.append("  ".join(f"{c:>14}" for c in cells))
    return rows, "\n".join(lines)


def _wait_drained(redis_url: str, cameras: list[str], timeout: float) -> bool:
    """True once no camera stream holds a frame (every one scored and acked, or shed)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(client.xlen(f"frames:{c}") == 0 for c in cameras):
            return True
        time.sleep(0.5)
    return False


def run_chaos(workdir: Path, seconds: float, cameras: int = 3, say=print) -> list[dict]:
    """The kill/freeze cycle for about `seconds`; returns the table's rows (the last is the total)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bank, videos = build_bank(workdir)
    server = RedisServer(workdir)
    server.start()
    service = Service(workdir, bank, videos, cameras, server.url)
    try:
        service.start_engine()
        service.start_ingest()
        time.sleep(12)  # the engine loads torch and its bank
        end = time.monotonic() + seconds
        cycle = 0
        while time.monotonic() < end:
            cycle += 1
            say(f"cycle {cycle}: kill -9 the engine, start another")
            service.kill_engine()
            time.sleep(2)
            service.start_engine()
            time.sleep(15)
            say(f"cycle {cycle}: freeze the engine, kill -9 Redis with a backlog, start it empty")
            service.freeze_engine(True)
            time.sleep(3)
            server.kill()
            time.sleep(1)
            server.start()
            service.freeze_engine(False)
            time.sleep(10)
            say(f"cycle {cycle}: freeze the engine for {FREEZE_S:g}s (frames older than {MAX_AGE_S:g}s are shed)")
            service.freeze_engine(True)
            time.sleep(FREEZE_S)
            service.freeze_engine(False)
            time.sleep(10)
        say("stopping ingest; the engine finishes what is queued")
        Service.stop(service.ingest)
        if not _wait_drained(server.url, service.names, 120):
            say("the engine did not empty the bus within 120 s")
        time.sleep(2 * CLAIM_IDLE_S + 3)  # the engine's grace before it calls a missing frame lost
        Service.stop(service.engine)
    finally:
        for proc in (service.ingest, service.engine):
            if proc is not None and proc.poll() is None:
                proc.kill()
        server.stop()
    rows, text = table(counters(service.metrics_dir))
    say(text)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the fault cycle runs")
    parser.add_argument("--cameras", type=int, default=3, help="file cameras played as live cameras")
    parser.add_argument("--out", type=Path, default=None, help="folder for logs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spade-chaos-") as tmp:
        rows = run_chaos(args.out or Path(tmp), 60 * args.minutes, args.cameras)
    return 0 if rows[-1]["lost uncounted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
