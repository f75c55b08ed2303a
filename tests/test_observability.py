"""What an SRE relies on: /metrics, /healthz and /readyz of a running monitor, scraped by a real
Prometheus (Debian's package), and a dashboard and alert rules that only use series the monitor
really exports."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from deploy_refs import referenced_metric_names
from prometheus_client.parser import text_string_to_metric_families
from test_service import camera, procs, wait_for, write_config  # noqa: F401 (procs is a fixture)

from engine.errors import ConfigError
from monitor.telemetry import Health, MetricsServer

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "spade-monitor.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
SECRET = "s3cretpw"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:  # busy or not up yet: poll again
        return 0, str(exc)


def scrape(port: int) -> dict[str, list]:
    """Metric name as PromQL writes it (counters with _total) -> samples, from a live /metrics."""
    _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    return {family.name + ("_total" if family.type == "counter" else ""): family.samples
            for family in text_string_to_metric_families(text)}


def total(families: dict, name: str, **labels) -> float:
    return sum(s.value for s in families.get(name, []) if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


# ---------------------------------------------------------------- the endpoint itself

def test_health_and_readiness_endpoints(redis_server):
    health = Health(redis_url=None)
    server = MetricsServer("127.0.0.1", 0, health)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert http_get(base + "/healthz") == (200, "ok\n")
        code, body = http_get(base + "/readyz")
        assert (code, body) == (503, "reference banks not loaded yet\n")
        health.set_loaded()
        assert http_get(base + "/readyz") == (200, "ok\n")
        assert http_get(base + "/nope")[0] == 404
        code, body = http_get(base + "/metrics")
        assert code == 200 and "# TYPE spade_camera_frames_sampled_total counter" in body

        with pytest.raises(ConfigError, match=rf"metrics.port: cannot listen on 127.0.0.1:{server.port}: "):
            MetricsServer("127.0.0.1", server.port, health)
    finally:
        server.close()

    # Readiness follows Redis; the answer never shows the URL (it may carry a password).
    dead = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    health = Health(redis_url=dead)
    health.set_loaded()
    ok, why = health.ready()
    assert not ok and why.startswith("Redis unreachable") and SECRET not in why
    assert Health(redis_url=redis_server.url, needs_banks=False).ready() == (True, "ok")


# ---------------------------------------------------------------- a real Prometheus

class Prometheus:
    def __init__(self, workdir: Path, target_port: int):
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.skip("prometheus not installed (Debian package prometheus)")
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "spade-monitor",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _listening(self.port) or http_get(f"http://127.0.0.1:{self.port}/-/ready")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        code, body = http_get(url)
        assert code == 200, body
        return json.loads(body)["data"]["result"]

    def value(self, promql: str, **labels) -> float | None:
        for series in self.query(promql):
            if all(series["metric"].get(k) == v for k, v in labels.items()):
                return float(series["value"][1])
        return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.mark.slow
def test_prometheus_scrapes_a_running_monitor(scene, scene_bank, tmp_path, procs):  # noqa: F811
    port = free_port()
    cams = {
        "plaza": camera(scene.test_videos[0], realtime=True, loop=True),
        # A dead camera with a password in its URL: it must show as down, and the password nowhere.
        "gate": {"source": f"rtsp://admin:{SECRET}@127.0.0.1:{free_port()}/stream", "scene": "plaza", "fps": 5},
    }
    config = write_config(tmp_path / "run.yaml", cams, scene_bank, outputs={"dir": str(tmp_path / "out")},
                          metrics={"address": "127.0.0.1", "port": port})
    monitor = procs(["run", "--config", str(config)], tmp_path / "monitor.log")
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz", 1)[0] == 200 if _listening(port) else False,
             120, "the monitor to be ready", monitor)
    prom = Prometheus(tmp_path, port)
    try:
        wait_for(lambda: (prom.value("spade_camera_frames_published_total", camera="plaza") or 0) >= 10
                 and (prom.value("count_over_time(spade_camera_fps[1m])", camera="plaza") or 0) >= 4, 120,
                 "Prometheus to scrape published frames a few times", monitor)

        fps = prom.value("spade_camera_fps", camera="plaza")
        assert 2.0 < fps < 8.0, fps  # sampled at 5 fps, paced in real time
        assert prom.value("spade_camera_up", camera="plaza") == 1
        assert prom.value("spade_camera_up", camera="gate") == 0
        assert prom.value("spade_camera_reconnects_total", camera="gate") >= 1
        assert prom.value("spade_bank_frames", scene="plaza") > 0
        assert prom.value("spade_bank_loaded", scene="plaza") == 1
        assert prom.value("time() - spade_engine_heartbeat_timestamp_seconds") < 10
        assert prom.value("spade_camera_last_frame_age_seconds", camera="plaza") < 5
        assert prom.value("spade_image_score_threshold", camera="plaza") > 0
        assert prom.value("spade_device_memory_bytes", device="cpu") > 50e6
        for stage in ("decode", "bus_wait", "backbone", "gate", "publish"):
            assert prom.value("spade_stage_duration_seconds_count", stage=stage) > 0, stage
        assert prom.value("sum(spade_engine_batch_size_count)") > 0
        assert prom.value('histogram_quantile(0.99, sum by (le) (rate(spade_capture_to_publish_seconds_bucket[1m])))') < 5

        # Every sampled frame is published or dropped, but for those still in flight.
        balance = prom.value('sum(spade_camera_frames_sampled_total{camera="plaza"}) '
                             '- sum(spade_camera_frames_published_total{camera="plaza"}) '
                             '- (sum(spade_camera_frames_dropped_total{camera="plaza"}) or vector(0))')
        in_flight = prom.value("spade_bus_pending_frames") + 8 + 2  # bus + one batch + the reader's queue
        assert 0 <= balance <= in_flight, (balance, in_flight)

        # The dashboard and the alert rules use only series the monitor exports.
        families = scrape(port)
        exported = set(families) | {"up"}
        referenced = referenced_metric_names(DASHBOARD, RULES)
        assert referenced, "no PromQL found in the dashboard and rules"
        assert referenced <= exported, f"referenced but not exported: {sorted(referenced - exported)}"

        text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert SECRET not in text and "rtsp://" not in text
    finally:
        prom.stop()
    code, _ = monitor.stop()
    assert code == 0
    assert SECRET not in monitor.text()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_supervised_run_serves_every_process_metrics(scene, scene_bank, redis_server, tmp_path, procs):  # noqa: F811
    """`run` with a Redis bus: one endpoint sums the ingest and engine processes' metrics."""
    port = free_port()
    cams = {"a": camera(scene.test_videos[0], realtime=True, loop=True)}
    config = write_config(tmp_path / "run.yaml", cams, scene_bank, redis_url=redis_server.url)  # metrics.port 0
    monitor = procs(["run", "--config", str(config), "--metrics-port", str(port)], tmp_path / "monitor.log")
    wait_for(lambda: _listening(port), 60, "the metrics endpoint", monitor)
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz", 1)[0] == 200, 120, "the engine to be ready",
             monitor)
    wait_for(lambda: total(scrape(port), "spade_camera_frames_published_total", camera="a") >= 5, 120,
             "published frames", monitor)
    families = scrape(port)
    assert total(families, "spade_camera_frames_sampled_total", camera="a") >= 5  # the ingest process
    assert total(families, "spade_bank_frames", scene="plaza") > 0  # the engine process
    redis_server.stop()
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz", 1)[0] == 503, 20, "readiness to follow Redis",
             monitor)
    assert "Redis unreachable" in http_get(f"http://127.0.0.1:{port}/readyz")[1]
    redis_server.start()
    code, _ = monitor.stop()
    assert code == 0


def test_engine_beats_while_it_loads_its_banks(scene, scene_bank, tmp_path):
    """EngineDown watches the heartbeat: an engine still loading its banks is not down."""
    from prometheus_client import REGISTRY

    from monitor.bus import InProcessBus
    from monitor.config import load_config
    from monitor.worker import EngineWorker

    config = load_config(write_config(tmp_path / "m.yaml", {"cam": camera(scene.test_videos[0])}, scene_bank))
    engine = EngineWorker(config, InProcessBus(), publisher=None)
    before = time.time()
    engine.scenes.load()
    beat = REGISTRY.get_sample_value("spade_engine_heartbeat_timestamp_seconds")
    assert beat is not None and before <= beat <= time.time()
