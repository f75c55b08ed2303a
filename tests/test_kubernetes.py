"""Offline checks of deploy/kubernetes: each kustomization rendered by a small renderer here (no
kubectl or kustomize binary needed), every object validated against the Kubernetes JSON schemas
that the kubernetes-validate package ships, and cross-checks against the service itself: probe
paths it serves, ports, the config the ConfigMap holds, Secret references, camera ids, Redis
stream names and the alert rules' job names.

The renderer implements only what these kustomizations use: `resources` (files, and directories
with their own kustomization.yaml), `namespace`, and `patches` given as a strategic-merge patch
file matched by apiVersion, kind and name. Any other kustomization key fails the render, so a
feature the renderer does not apply can never be skipped silently.

KEDA's ScaledObject is a custom resource with no schema in the package: its fields are checked
by hand (test_keda_scaledobject).
"""
from __future__ import annotations

import copy
import re
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
KEDA = K8S / "keda"
REDIS_EXTERNAL = K8S / "redis-external"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
COMPOSE_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

K8S_VERSION = "1.33.0"  # schemas bundled by kubernetes-validate (1.26 ... 1.37 in its 1.37.0 release)
NAMESPACE = "spade-monitor"
CONFIG_MAP = "spade-monitor-config"
CONFIG_KEY = "monitor.yaml"
CONFIG_PATH = "/etc/spade/monitor.yaml"

# -- the renderer -------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass"}
# Strategic-merge keys of the lists these patches can reach; any other list is replaced whole,
# as Kubernetes' own patch strategy does for lists without a merge key (tolerations, args...).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}


class RenderError(Exception):
    pass


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _merge(base, patch, field: str = ""):
    """A strategic-merge patch as a deep merge: mappings key by key (null deletes), lists of
    MERGE_KEYS by their key, any other list or scalar replaced."""
    if isinstance(patch, dict):
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise RenderError(f"{key}: patch directives are not implemented by this renderer")
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(out.get(key), value, key)
        return out
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(base, list):
        key = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"{field}: every patch item needs its merge key {key!r}")
            match = [i for i, old in enumerate(out) if old.get(key) == item[key]]
            if match:
                out[match[0]] = _merge(out[match[0]], item, "")
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` would print, for the features above."""
    directory = directory.resolve()
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = set(spec) - KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(f"{path}: kustomization keys this renderer does not implement: {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind {spec['kind']!r} is not implemented")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects += render(target)
        elif target.is_file():
            if directory not in target.parents:  # kustomize's default load restrictor
                raise RenderError(f"{path}: {entry} is a file outside the kustomization's directory")
            objects += _documents(target)
        else:
            raise RenderError(f"{path}: resource {entry} not found")
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise RenderError(f"{path}: only `patches: - path: FILE` (strategic merge) is implemented")
        for patch in _documents(directory / patch_entry["path"]):
            ident = (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])
            hits = [i for i, obj in enumerate(objects)
                    if (obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) == ident]
            if len(hits) != 1:
                raise RenderError(f"{path}: patch {patch_entry['path']} matches {len(hits)} objects {ident}")
            objects[hits[0]] = _merge(objects[hits[0]], patch)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    seen = set()
    for obj in objects:
        ident = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if ident in seen:
            raise RenderError(f"{path}: {ident} defined twice")
        seen.add(ident)
    return objects


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def _get(objects: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _containers(workload: dict, init: bool = True) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def _monitor_containers(objects: list[dict]):
    """(workload, container) for every container of the spade-monitor image, init containers included."""
    for workload in _workloads(objects):
        for container in _containers(workload):
            if container["image"].startswith("spade-monitor:"):
                yield workload, container


def _command(container: dict) -> list[str]:
    """What runs, with the image's ENTRYPOINT (spade-monitor) when `command` is not set."""
    return container.get("command", ["spade-monitor"]) + container.get("args", [])


def _loads_config(container: dict) -> bool:
    return CONFIG_PATH in " ".join(_command(container))


def _subcommand(container: dict) -> str | None:
    command = _command(container)
    return command[1] if command[0] == "spade-monitor" else None


def _config_text(objects: list[dict]) -> str:
    return _get(objects, "ConfigMap", CONFIG_MAP)["data"][CONFIG_KEY]


def _env_refs(text: str) -> set[str]:
    from monitor.config import _ENV_REF

    return set(_ENV_REF.findall(text))


def _example_secrets() -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: s["stringData"] for s in _documents(SECRETS_EXAMPLE)}


def _parsed_config(objects: list[dict], monkeypatch):
    from monitor.config import parse_config

    text = _config_text(objects)
    for name in _env_refs(text):
        monkeypatch.setenv(name, "placeholder")
    return parse_config(yaml.safe_load(text), Path(CONFIG_PATH).parent, check_files=False)


def _env_names(container: dict) -> set[str]:
    """Variables the container gets: env entries, and every key of a Secret it takes whole."""
    names = {e["name"] for e in container.get("env", [])}
    secrets = _example_secrets()
    for source in container.get("envFrom", []):
        names |= set(secrets[source["secretRef"]["name"]])
    return names


def _volume_claims(workload: dict) -> dict[str, str]:
    """mountPath -> PVC claimName for the container's PVC mounts (first container)."""
    spec = workload["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for m in spec["containers"][0].get("volumeMounts", [])
            if m["name"] in claims}


# -- the renderer itself ------------------------------------------------------------------------

def test_renderer_fails_on_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    for extra in ("commonLabels: {a: b}", "images: [{name: x, newTag: y}]", "configMapGenerator: []",
                  "namePrefix: x-", "patchesStrategicMerge: [p.yaml]", "components: [../c]"):
        (tmp_path / "kustomization.yaml").write_text(f"resources: [cm.yaml]\n{extra}\n")
        with pytest.raises(RenderError, match="does not implement"):
            render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: p.yaml}]\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typo}\n")
    with pytest.raises(RenderError, match="matches 0 objects"):
        render(tmp_path)
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n$patch: delete\n")
    with pytest.raises(RenderError, match="directives"):
        render(tmp_path)
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "kustomization.yaml").write_text("resources: [../cm.yaml]\n")
    with pytest.raises(RenderError, match="outside"):  # kustomize's load restrictor refuses it too
        render(inner)


def test_strategic_merge_merges_containers_by_name():
    base = {"spec": {"containers": [{"name": "a", "image": "x", "resources": {"limits": {"cpu": "1"}}},
                                    {"name": "b", "image": "y"}],
                     "tolerations": [{"key": "old"}]}}
    patch = {"spec": {"containers": [{"name": "a", "resources": {"limits": {"nvidia.com/gpu": 1}}}],
                      "tolerations": [{"key": "new"}]}}
    merged = _merge(base, patch)
    assert merged["spec"]["containers"] == [
        {"name": "a", "image": "x", "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": 1}}},
        {"name": "b", "image": "y"}]
    assert merged["spec"]["tolerations"] == [{"key": "new"}]


# -- schemas ------------------------------------------------------------------------------------

def _validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    except kubernetes_validate.ValidationError as exc:
        problem = f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}"
    pytest.fail(problem, pytrace=False)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_matches_the_kubernetes_schema(rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service"} <= kinds
    for obj in objects:
        _validate(obj)


def test_secret_example_and_external_redis_match_the_schema():
    for obj in _documents(SECRETS_EXAMPLE) + render(REDIS_EXTERNAL):
        _validate(obj)


def test_overlays_put_everything_in_one_namespace(rendered):
    for objects in rendered.values():
        assert _get(objects, "Namespace", NAMESPACE)
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


# -- probes and ports ---------------------------------------------------------------------------

def _served_status(path: str) -> int:
    """What monitor/telemetry.py's endpoint answers for `path` (a real server on loopback)."""
    from monitor.telemetry import Health, MetricsServer

    server = MetricsServer("127.0.0.1", 0, Health(needs_banks=False))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    finally:
        server.close()


def test_probes_use_paths_and_ports_the_service_serves(rendered, monkeypatch):
    for objects in rendered.values():
        config = _parsed_config(objects, monkeypatch)
        paths = set()
        for workload, container in _monitor_containers(objects):
            if container in workload["spec"]["template"]["spec"].get("initContainers", []):
                continue
            ports = {p["containerPort"] for p in container.get("ports", [])}
            probes = [container.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")]
            assert probes[1] and probes[2], f"{workload['metadata']['name']}: readiness and liveness probes"
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            if _subcommand(container) in ("ingest", "engine"):
                assert config.metrics.port in ports
                assert [p for p in probes if p and "httpGet" in p] == [p for p in probes if p]
                assert annotations.get("prometheus.io/scrape") == "true"
                assert annotations["prometheus.io/port"] == str(config.metrics.port)
            for probe in probes:
                if probe and "httpGet" in probe:
                    assert probe["httpGet"]["port"] == config.metrics.port, workload["metadata"]["name"]
                    paths.add(probe["httpGet"]["path"])
                elif probe:
                    assert probe["tcpSocket"]["port"] in ports, workload["metadata"]["name"]
        engine = _get(objects, "Deployment", "engine")["spec"]["template"]["spec"]["containers"][0]
        assert engine["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert engine["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for path in paths:
            assert _served_status(path) == 200, f"probe path {path} is not served by monitor/telemetry.py"
    assert _served_status("/readz") == 404  # the check above would catch a typo


def test_metrics_listen_beyond_loopback(rendered, monkeypatch):
    """The kubelet probes and Prometheus scrapes the pod's IP, not 127.0.0.1."""
    config = _parsed_config(rendered["cpu"], monkeypatch)
    assert config.metrics.address == "0.0.0.0" and config.metrics.port


def test_engine_is_given_time_to_drain_and_every_container_has_resources(rendered):
    from monitor.supervisor import ENGINE_STOP_S

    for objects in rendered.values():
        engine = _get(objects, "Deployment", "engine")
        assert engine["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= ENGINE_STOP_S + 30
        assert "replicas" not in engine["spec"], "the ScaledObject owns the engine's replica count"
        for workload in _workloads(objects):
            for container in _containers(workload, init=False):
                resources = container["resources"]
                assert resources["requests"]["memory"] and resources["limits"]["memory"], container["name"]


# -- the config and the secrets -----------------------------------------------------------------

def test_configmap_holds_a_valid_redis_config(rendered, monkeypatch):
    for objects in rendered.values():
        config = _parsed_config(objects, monkeypatch)
        assert config.bus.kind == "redis"
        assert config.redis.password_env == "REDIS_PASSWORD"
        host, port = re.fullmatch(r"redis://([^:/@]+):(\d+)/\d+", config.redis.url).groups()
        service = _get(objects, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        redis = _get(objects, "StatefulSet", host)
        assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
        assert redis["spec"]["serviceName"] == host


def test_no_credentials_in_configmaps(rendered):
    secret_values = {v for data in _example_secrets().values() for v in data.values()}
    for objects in rendered.values():
        for cm in (o for o in objects if o["kind"] == "ConfigMap"):
            for key, text in cm["data"].items():
                # user:password@ in any URL, unless the password is a ${VAR} reference
                for user, password in re.findall(r"://([^/\s:@]*):([^@\s/]*)@", text):
                    assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", password), \
                        f"ConfigMap {cm['metadata']['name']} {key}: a literal password for {user!r}"
                for value in secret_values:
                    assert value not in text, f"ConfigMap {cm['metadata']['name']} {key} holds a Secret value"


def test_secret_references_exist_in_the_example_secret(rendered):
    secrets = _example_secrets()
    for objects in rendered.values():
        for workload in _workloads(objects):
            for container in _containers(workload):
                where = f"{workload['metadata']['name']}/{container['name']}"
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets.get(ref["name"], {}), f"{where}: {ref}"
                for source in container.get("envFrom", []):
                    assert source["secretRef"]["name"] in secrets, f"{where}: {source}"


def test_every_config_reader_gets_every_variable_the_config_needs(rendered, monkeypatch):
    secrets = _example_secrets()
    for objects in rendered.values():
        config = _parsed_config(objects, monkeypatch)
        needed = _env_refs(_config_text(objects))
        assert needed, "camera passwords come from the environment"
        assert needed <= set(secrets["camera-credentials"])
        readers = [(w, c) for w, c in _monitor_containers(objects) if _loads_config(c)]
        assert {w["metadata"]["name"] for w, _ in readers} >= {"engine", "console", "ingest-group-a"}
        for workload, container in readers:
            names = _env_names(container)
            assert needed <= names, f"{workload['metadata']['name']}/{container['name']}: {needed - names}"
            if _subcommand(container) in ("ingest", "engine"):
                assert config.redis.password_env in names
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
            assert volumes[mounts[str(Path(CONFIG_PATH).parent)]]["configMap"]["name"] == CONFIG_MAP


def test_ingest_groups_cover_every_camera_once(rendered, monkeypatch):
    from monitor.config import camera_ids

    for objects in rendered.values():
        config = _parsed_config(objects, monkeypatch)
        assigned: list[str] = []
        for workload, container in _monitor_containers(objects):
            if _subcommand(container) != "ingest":
                continue
            args = _command(container)
            cameras = [args[i + 1] for i, a in enumerate(args) if a == "--camera"]
            assert cameras, f"{workload['metadata']['name']}: a group names its cameras"
            assert set(cameras) <= set(camera_ids(config)), f"{workload['metadata']['name']}: {cameras}"
            assigned += cameras
            assert workload["spec"]["replicas"] == 1 and workload["spec"]["strategy"]["type"] == "Recreate"
        assert sorted(assigned) == sorted(camera_ids(config)), "each enabled camera in exactly one group"


def test_console_binds_beyond_loopback_with_credentials_and_shares_the_outputs(rendered, monkeypatch):
    for objects in rendered.values():
        config = _parsed_config(objects, monkeypatch)
        console = _get(objects, "Deployment", "console")
        container = console["spec"]["template"]["spec"]["containers"][0]
        args = _command(container)
        assert args[1] == "console" and args[args.index("--address") + 1] == "0.0.0.0"
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert {"SPADE_CONSOLE_USER", "SPADE_CONSOLE_PASSWORD"} <= set(env)
        assert {p["containerPort"] for p in container["ports"]} == {config.console.port}
        service = _get(objects, "Service", "console")
        assert service["spec"]["selector"].items() <= console["spec"]["template"]["metadata"]["labels"].items()
        assert all(p["targetPort"] in ("http", config.console.port) for p in service["spec"]["ports"])
        # outputs.dir and the banks on one ReadWriteMany claim, mounted by the engine and the console
        engine = _get(objects, "Deployment", "engine")
        for workload in (engine, console):
            claims = _volume_claims(workload)
            mount = next(m for m in claims if Path(config.outputs.dir).is_relative_to(m))
            for scene in config.scenes.values():
                assert Path(scene.bank).is_relative_to(mount)
            claim = _get(objects, "PersistentVolumeClaim", claims[mount])
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert _volume_claims(engine) == _volume_claims(console)


def test_redis_persists_with_aof_on_a_volume(rendered):
    for objects in rendered.values():
        redis = _get(objects, "StatefulSet", "redis")
        container = redis["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        options = dict(zip(args[1::2], args[2::2]))
        assert args[0] == "redis-server"
        assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
        assert options["--maxmemory-policy"] == "volatile-ttl"
        assert options["--requirepass"] == "$(REDIS_PASSWORD)"
        assert "REDIS_PASSWORD" in {e["name"] for e in container["env"]}
        templates = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
        data = [m for m in container["volumeMounts"] if m["name"] in templates]
        assert [m["mountPath"] for m in data] == ["/data"]


def test_redis_options_run_on_a_real_redis_server(rendered, tmp_path):
    """The StatefulSet's redis-server arguments, run by a real redis-server as the compose test does."""
    from conftest import redis_config_with

    args = _get(rendered["cpu"], "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    config = redis_config_with([a.replace("$(REDIS_PASSWORD)", "pw") for a in args[1:]], tmp_path)
    assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "volatile-ttl"
    assert int(config["maxmemory"]) == 1024 ** 3


# -- the GPU overlay ----------------------------------------------------------------------------

def test_gpu_overlay_changes_only_the_engine_scheduling_resources_and_rollout(rendered):
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, cpu)) == sorted(map(key, gpu))
    for obj in gpu:
        if key(obj) != ("Deployment", "engine"):
            assert obj == _get(cpu, obj["kind"], obj["metadata"]["name"]), key(obj)
    engine = _get(gpu, "Deployment", "engine")["spec"]["template"]["spec"]
    limits = engine["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert engine["nodeSelector"] and engine["tolerations"]
    for obj in cpu:
        for container in (_containers(obj) if obj["kind"] in ("Deployment", "StatefulSet") else []):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    # The engine's config picks the GPU it is given (engine.device auto); the console, which runs
    # feedback on engine.device from the same ConfigMap, has none, so `cuda` would break it there.
    assert yaml.safe_load(_config_text(gpu))["engine"]["device"] == "auto"
    # A rollout must not need a second GPU.
    assert _get(gpu, "Deployment", "engine")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    stripped = copy.deepcopy(_get(gpu, "Deployment", "engine"))
    stripped["spec"]["strategy"] = _get(cpu, "Deployment", "engine")["spec"]["strategy"]
    spec = stripped["spec"]["template"]["spec"]
    del spec["nodeSelector"], spec["tolerations"]
    spec["containers"][0]["resources"] = _get(cpu, "Deployment", "engine")["spec"]["template"]["spec"][
        "containers"][0]["resources"]
    assert stripped == _get(cpu, "Deployment", "engine")


# -- Prometheus ---------------------------------------------------------------------------------

def test_prometheus_scrape_config_finds_the_pods_with_the_rules_job_names(rendered):
    objects = rendered["cpu"]
    prometheus = yaml.safe_load(_get(objects, "ConfigMap", "spade-prometheus")["data"]["prometheus.yml"])
    assert [Path(f).name for f in prometheus["rule_files"]] == [RULES.name]
    compose_jobs = {job["job_name"] for job in yaml.safe_load(COMPOSE_PROMETHEUS.read_text())["scrape_configs"]}
    rules_jobs = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    (job,) = prometheus["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = job["relabel_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in relabel if r.get("action") == "keep"}
    naming = next(r for r in relabel if r.get("target_label") == "job")
    address = next(r for r in relabel if r.get("target_label") == "__address__")
    scraped = set()
    for workload in _workloads(objects):
        template = workload["spec"]["template"]["metadata"]
        labels, annotations = template["labels"], template.get("annotations", {})
        meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^A-Za-z0-9_]', '_', k)}": v for k, v in labels.items()}
        meta |= {f"__meta_kubernetes_pod_annotation_{re.sub(r'[^A-Za-z0-9_]', '_', k)}": v
                 for k, v in annotations.items()}
        if not all(re.fullmatch(regex, meta.get(label, "")) for label, regex in keep.items()):
            continue
        component = meta[naming["source_labels"][0]]
        scraped.add(re.sub(naming["regex"], naming["replacement"].replace("$1", r"\1"), component))
        port = annotations["prometheus.io/port"]
        target = re.sub(address["regex"], address["replacement"].replace("$1", r"\1").replace("$2", r"\2"),
                        f"10.0.0.7:1234;{port}")
        assert target == f"10.0.0.7:{port}"
    assert scraped == compose_jobs, "the alert rules and the dashboard select on these job names"
    assert rules_jobs <= scraped


def test_prometheus_config_passes_promtool(rendered, tmp_path):
    """promtool checks the scrape config (relabel rules and regexes, kubernetes_sd_configs where
    it has Kubernetes discovery) and loads the rules from where the config expects the
    spade-prometheus-rules ConfigMap to be mounted."""
    import shutil
    import subprocess

    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (scripts/install-system-deps.sh installs the prometheus package)")
    config = yaml.safe_load(_get(rendered["cpu"], "ConfigMap", "spade-prometheus")["data"]["prometheus.yml"])
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES, tmp_path / "rules" / RULES.name)
    config["rule_files"] = [f.replace("/etc/prometheus/", f"{tmp_path}/") for f in config["rule_files"]]

    def check() -> subprocess.CompletedProcess:
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        return subprocess.run([exe, "check", "config", str(tmp_path / "prometheus.yml")],
                              capture_output=True, text=True, timeout=60)

    r = check()
    if "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian's Prometheus is built without Kubernetes discovery: check the rest of the job
        # (test_prometheus_scrape_config... checks the discovery block itself).
        for job in config["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["127.0.0.1:9108"]}]
        r = check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


# -- KEDA ---------------------------------------------------------------------------------------

def test_keda_scaledobject(rendered, monkeypatch):
    """No schema ships for this CRD (checked below), so its fields are checked by hand."""
    from monitor.config import camera_ids
    from monitor.redis_bus import STREAM_PREFIX

    (scaled,) = render(KEDA)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(scaled, K8S_VERSION, strict=True)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["metadata"]["namespace"] == NAMESPACE
    spec = scaled["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "advanced", "triggers"}
    for objects in rendered.values():
        config = _parsed_config(objects, monkeypatch)
        target = _get(objects, spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"])
        engine = target["spec"]["template"]["spec"]["containers"][0]
        assert _subcommand(engine) == "engine", "the ScaledObject scales the engine"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= len(camera_ids(config)), \
            "a camera's frames are one engine's work: engines beyond the camera count add nothing"
        redis_port = {p["port"] for p in _get(objects, "Service", "redis")["spec"]["ports"]}
        streams = []
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-streams"
            assert set(meta) <= {"address", "passwordFromEnv", "stream", "streamLength", "databaseIndex"}
            # streamLength (XLEN), not pendingEntriesCount: see scaledobject.yaml and the test below.
            # A consumerGroup would switch KEDA to XPENDING.
            assert "consumerGroup" not in meta and "pendingEntriesCount" not in meta
            host, port = meta["address"].rsplit(":", 1)
            assert host == f"redis.{target['metadata']['namespace']}.svc" and int(port) in redis_port
            assert meta["passwordFromEnv"] in {e["name"] for e in engine["env"]}
            streams.append(meta["stream"])
            # Reachable: a live camera's stream never holds more than max_len, nor more than
            # fps x max_age_s frames (older ones are shed).
            target_len = int(meta["streamLength"])
            camera_id = meta["stream"].removeprefix(STREAM_PREFIX)
            assert meta["stream"].startswith(STREAM_PREFIX) and camera_id in camera_ids(config), \
                f"{meta['stream']}: not the stream of an enabled camera ({STREAM_PREFIX}<camera id>, monitor/redis_bus.py)"
            camera = config.cameras[camera_id]
            ceiling = min(config.bus.max_len, (camera.fps or 1e9) * config.bus.max_age_s)
            assert 0 < target_len < ceiling, f"{meta['stream']}: streamLength {target_len} >= {ceiling}"
        assert sorted(streams) == sorted(STREAM_PREFIX + c for c in camera_ids(config)), \
            "one trigger per camera stream: KEDA's redis-streams trigger reads a single stream"


def test_stream_length_is_the_backlog_and_pending_entries_are_not(redis_server):
    """Why the ScaledObject uses streamLength: the bus deletes frames once done, so XLEN is a
    camera's backlog; XPENDING holds only what an engine took for its batch."""
    import time

    import numpy as np
    import redis

    from monitor.frames import Frame
    from monitor.redis_bus import RedisFrameBus

    producer = RedisFrameBus(redis_server.url, max_len=1000, cameras=["cam"])
    engine = RedisFrameBus(redis_server.url, consumer="engine-1", cameras=["cam"])
    client = redis.Redis.from_url(redis_server.url)
    try:
        for seq in range(40):
            producer.put(Frame("cam", seq, seq / 5, time.time(), np.zeros((8, 8, 3), np.uint8), run_id="r"),
                         live=False)
        batch = engine.get_batch(8, 1.0)
        assert len(batch) == 8
        stream = producer.stream_of("cam")
        assert client.xlen(stream) == 40 and client.xpending(stream, engine.group)["pending"] == 8
        engine.ack([m.id for m in batch])
        assert client.xlen(stream) == 32 and client.xpending(stream, engine.group)["pending"] == 0
    finally:
        producer.close()
        engine.close()

