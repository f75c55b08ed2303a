"""Static checks of deploy/: Prometheus config, alert rules and their unit tests (promtool), the
compose file, the Dockerfile, the Grafana dashboard and provisioning, and the dashboard renderer's
variable substitution. Nothing here starts a container or a server."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from deploy_refs import dashboard_exprs, metric_names, referenced_metric_names

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
MONITOR_CONFIG = DEPLOY / "config" / "monitor.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spade-monitor.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "spade.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
METRICS_SOURCE = ROOT / "monitor" / "telemetry.py"

ALERTS = {"CameraDown", "HighFrameDropRate", "EngineLagging", "EngineDown", "AnomalyEventOpen",
          "ReferenceBankMissing", "ReferenceBankStale"}
MONITOR_SERVICES = ("ingest", "engine")
METRICS_PORT = 9108


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _promtool() -> str:
    exe = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if exe is None:
        pytest.skip("promtool not installed (bash scripts/install-system-deps.sh installs the prometheus package)")
    return exe


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_dashboard", DEPLOY / "render_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mounts(volumes: list[str]) -> dict[str, str]:
    """Short-syntax volumes as {container path: host path}; a ${VAR:-default} source may hold ':'."""
    out = {}
    for volume in volumes:
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(?:ro|rw))?", volume)
        assert m, volume
        out[m.group(2)] = m.group(1)
    return out


def _panels(panels):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


# -- Prometheus: promtool -----------------------------------------------------------------------

def test_promtool_check_config():
    # An absolute path: rule_files resolve against the config file's folder, whatever the cwd.
    r = _run(_promtool(), "check", "config", str(PROM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


def test_promtool_check_rules():
    r = _run(_promtool(), "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    r = _run(_promtool(), "test", "rules", str(RULES_TEST))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_rule_tests_cover_every_alert_firing_and_silent():
    alerts = {rule["alert"] for group in _yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule}
    assert ALERTS <= alerts
    firing, silent = set(), set()
    for case in _yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent (an eval_time with exp_alerts: [])"


def test_rules_have_severity_summary_and_description():
    for group in _yaml(RULES)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"page", "warning", "info"}, rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert rule["annotations"]["description"].strip(), rule["alert"]


def test_anomaly_alert_links_the_camera_dashboard():
    rule = next(r for g in _yaml(RULES)["groups"] for r in g["rules"] if r.get("alert") == "AnomalyEventOpen")
    assert "{{ $labels.camera }}" in rule["annotations"]["summary"]
    assert "/d/spade-monitor?var-camera={{ $labels.camera }}" in rule["annotations"]["description"]


def test_prometheus_scrapes_the_compose_services():
    config = _yaml(PROM_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["rules.yml"]
    jobs = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in config["scrape_configs"]}
    assert jobs == {"spade-ingest": [f"ingest:{METRICS_PORT}"], "spade-engine": [f"engine:{METRICS_PORT}"]}


# -- metric names: the contract lives in monitor/telemetry.py ---------------------------------------

def _exported_names(source: str) -> set[str]:
    """String literals starting with spade_ in the exporter's source, as full series names."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"spade_\w+", node.value):
            names.add(node.value)
    # prometheus_client appends _total to counters declared without it.
    return names | {n + "_total" for n in names if not n.endswith("_total")}


def test_referenced_metrics_are_exported():
    exported = _exported_names(METRICS_SOURCE.read_text(encoding="utf-8"))
    assert "spade_camera_frames_sampled_total" in exported, "metric names are string literals in monitor/telemetry.py"
    referenced = referenced_metric_names(DASHBOARD, RULES)
    assert "up" in referenced and any(n.startswith("spade_") for n in referenced)
    assert referenced - exported - {"up"} == set()


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(spade_stage_duration_seconds_bucket'
            '{stage=~"a|b", camera=~"$camera"}[$__rate_interval]))) / on (instance) group_left (x) '
            'spade_bus_pending_frames offset 5m > bool 1e3 or absent(up{job="spade-engine"}) '
            'and time() - spade_engine_heartbeat_timestamp_seconds > 30 * 86400')
    assert metric_names(expr) == {"spade_stage_duration_seconds", "spade_bus_pending_frames", "up",
                                  "spade_engine_heartbeat_timestamp_seconds"}
    assert metric_names("label_values(spade_camera_frames_sampled_total, camera)") == {
        "spade_camera_frames_sampled_total"}
    assert metric_names('sum without (reason) (spade_camera_frames_dropped_total{reason="x y"})') == {
        "spade_camera_frames_dropped_total"}


# -- Grafana ------------------------------------------------------------------------------------

def test_dashboard_sanity():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "spade-monitor"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    types = set()
    for panel in panels:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        types.add(panel["type"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "prometheus"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    assert types == {"timeseries", "stat"}

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    camera = variables["camera"]
    query = camera["query"]["query"] if isinstance(camera["query"], dict) else camera["query"]
    assert query.replace(" ", "") == "label_values(spade_camera_frames_sampled_total,camera)"
    assert camera["multi"] and camera["includeAll"]
    assert any(p["type"] == "row" and p.get("repeat") == "camera" for p in dashboard["panels"])


def test_dashboard_covers_the_required_views():
    exprs = " ".join(dashboard_exprs(json.loads(DASHBOARD.read_text(encoding="utf-8"))))
    for needle in ("spade_camera_fps", "spade_camera_frames_dropped_total", "spade_camera_up",
                   "spade_image_score{", "spade_image_score_threshold", "spade_engine_frames_escalated_total",
                   "spade_events_opened_total", "spade_events_closed_total", "spade_anomaly_active",
                   "rate(spade_camera_frames_published_total", "spade_engine_batch_size_bucket",
                   "sum by (le, stage) (rate(spade_stage_duration_seconds_bucket",
                   "spade_capture_to_publish_seconds_bucket", "spade_bus_pending_frames",
                   "spade_device_memory_bytes", "spade_bank_frames", "spade_bank_load_seconds"):
        assert needle in exprs, needle


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses every query as a recording rule, with Grafana's variables substituted.
    promtool = _promtool()
    rd = _load_renderer()
    variables = {"camera": rd.regex_value(["gate", "dock.2"]), **rd.time_variables(300, 5)}
    exprs = [e for e in dashboard_exprs(json.loads(DASHBOARD.read_text(encoding="utf-8")))
             if not e.lstrip().startswith("label_values")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": rd.substitute(e, variables)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    r = _run(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_matches_dashboard_and_compose():
    ds = _yaml(DATASOURCES)["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in ds] == [("prometheus", "prometheus", "http://prometheus:9090")]
    provider = _yaml(DASHBOARD_PROVIDER)["providers"][0]
    assert provider["type"] == "file"
    grafana = _yaml(COMPOSE)["services"]["grafana"]
    mounts = _mounts(grafana["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# -- compose, Dockerfile, monitor config --------------------------------------------------------

def test_compose_services():
    services = _yaml(COMPOSE)["services"]
    assert set(services) == {"redis", "prometheus", "grafana", "ingest", "engine"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    assert services["redis"]["image"].startswith("redis:7")
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert _mounts(services["prometheus"]["volumes"])["/etc/prometheus"] == "./prometheus"
    assert any(p.endswith(":9090:9090") for p in services["prometheus"]["ports"])
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana-oss")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert any(p.endswith(":3000:3000") for p in grafana["ports"])
    assert "/api/health" in " ".join(grafana["healthcheck"]["test"])


def test_compose_redis_persists_with_aof_and_never_evicts_a_stream(tmp_path):
    """The compose file's Redis options, run by a real redis-server: AOF fsync'd every second, a
    memory cap, and an eviction policy that only ever removes keys with a TTL."""
    from conftest import redis_config_with

    command = _yaml(COMPOSE)["services"]["redis"]["command"]
    args = [re.sub(r"\$\{(\w+)(:-([^}]*)|:\?[^}]*)\}", lambda m: m.group(3) or "pw", a) for a in command[1:]]
    config = redis_config_with(args, tmp_path)
    assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "volatile-ttl"
    assert int(config["maxmemory"]) == 1024 ** 3


@pytest.mark.parametrize("name", MONITOR_SERVICES)
def test_compose_monitor_services(name):
    service = _yaml(COMPOSE)["services"][name]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert service["command"] == [name, "--config", "/config/monitor.yaml"]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    mounts = _mounts(service["volumes"])
    assert mounts["/config/monitor.yaml"].endswith("./config/monitor.yaml}")
    assert mounts["/data"].endswith("./data}")
    health = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{METRICS_PORT}/readyz" in health and "urllib" in health  # the slim image has no curl
    # Secrets only by reference to the environment (deploy/.env), never a literal.
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]*\}", service["environment"]["REDIS_PASSWORD"])


def test_compose_gpu_override_reserves_a_gpu_for_the_engine_only():
    base = _yaml(COMPOSE)["services"]
    assert "deploy" not in base["engine"], "the default engine must run on hosts without a GPU"
    override = _yaml(COMPOSE_GPU)["services"]
    assert set(override) == {"engine"}
    devices = override["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None or _run(docker, "compose", "version").returncode != 0:
        pytest.skip("docker compose not available here")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "REDIS_PASSWORD": "x", "GRAFANA_ADMIN_PASSWORD": "x"}
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]):
        r = subprocess.run([docker, "compose", *files, "config", "-q"], cwd=DEPLOY, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr


def test_dockerfile():
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    first = {}
    for word, *rest in instructions:
        first.setdefault(word.upper(), []).append(rest[0] if rest else "")
    assert first["FROM"] == ["python:3.11-slim"]
    assert any("pip install" in run and run.rstrip().split("&&")[0].rstrip().endswith(" .") for run in first["RUN"])
    assert first["USER"][-1] not in ("root", "0")
    assert json.loads(first["ENTRYPOINT"][-1]) == ["spade-monitor"]
    # `pip install .` needs pyproject.toml, the README it names, and every package it finds.
    copied = {src for arg in first["COPY"] for src in arg.split()[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    packages = re.search(r'include\s*=\s*\[([^\]]*)\]', pyproject).group(1)
    needed = {"pyproject.toml", "README.md"} | {p.strip(' "*') for p in packages.split(",") if p.strip()}
    assert needed <= copied


def test_monitor_config_loads_strictly():
    from monitor.config import load_config
    from monitor.urls import redact_url

    config = load_config(MONITOR_CONFIG, check_files=False)
    assert config.bus.kind == "redis"
    assert config.redis.url == "redis://redis:6379/0"
    assert config.redis.password_env == "REDIS_PASSWORD"
    assert (config.metrics.address, config.metrics.port) == ("0.0.0.0", METRICS_PORT)
    assert config.engine.device == "auto"
    for camera in config.cameras.values():
        assert redact_url(camera.source) == camera.source, "no credentials in the committed config"
        assert camera.source.startswith("/data/")
    for scene in config.scenes.values():
        assert scene.bank.startswith("/data/")


# -- render_dashboard.py ------------------------------------------------------------------------

def test_render_variable_substitution():
    rd = _load_renderer()
    assert rd.regex_value([]) == ".*"
    assert rd.regex_value(["gate"]) == "gate"
    # Doubled escapes: the regex sits in a double-quoted PromQL string.
    assert rd.regex_value(["gate", "dock.2"]) == r"(gate|dock\\.2)"
    tv = rd.time_variables(300, 5)
    assert tv["__interval"] == "5s" and tv["__rate_interval"] == "30s" and tv["__range"] == "300s"
    assert rd.time_variables(86400, 300)["__rate_interval"] == "305s"  # never shorter than a step
    variables = {"camera": "(a|b)", **tv}
    expr = ('rate(x{camera=~"$camera"}[$__rate_interval]) + y{camera=~"${camera}"}[${__interval}] '
            '+ [[camera]] $__interval_ms')
    assert rd.substitute(expr, variables) == 'rate(x{camera=~"(a|b)"}[30s]) + y{camera=~"(a|b)"}[5s] + (a|b) 5000'
    assert rd.substitute("${camera:regex} $unknown", variables) == "(a|b) $unknown"
    assert rd.legend("{{camera}} p99", {"camera": "gate"}) == "gate p99"
    assert rd.legend("", {"__name__": "up", "job": "j"}) == 'up{job="j"}'


def test_render_refuses_unreachable_prometheus_in_one_line(tmp_path, capsys):
    rd = _load_renderer()
    out = tmp_path / "d.png"
    status = rd.main(["--prometheus", f"http://127.0.0.1:{free_port()}", "--out", str(out), "--timeout", "2"])
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert err.startswith("render_dashboard: error: cannot reach Prometheus") and err.count("\n") == 1
    assert rd.main(["--dashboard", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "dashboard not found" in capsys.readouterr().err
