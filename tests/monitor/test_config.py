"""Strict config parsing: defaults, one-line errors naming the key path, and no leaked credentials."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from engine.errors import ConfigError
from monitor.config import CameraConfig, MonitorConfig, RedisConfig, camera_ids, load_config, parse_config
from monitor.urls import redact_url

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A folder holding a video file and a bank, so check_files=True passes."""
    (tmp_path / "clip.mp4").write_bytes(b"\0")
    (tmp_path / "plaza.safetensors").write_bytes(b"\0")
    return tmp_path


def minimal() -> dict:
    return {"cameras": {"gate": {"source": "clip.mp4", "scene": "plaza"}},
            "scenes": {"plaza": {"bank": "plaza.safetensors"}}}


def error_of(data: dict, base: Path, check_files: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base, check_files=check_files)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "monitor.yaml"
    path.write_text(text)
    return path


def test_valid_config_gets_defaults(files: Path) -> None:
    path = write(files, yaml.safe_dump(minimal()))
    config = load_config(path)
    assert isinstance(config, MonitorConfig)
    cam = config.cameras["gate"]
    assert cam.source == str(files / "clip.mp4")  # resolved against the config file's folder
    assert (cam.fps, cam.resolution, cam.mode, cam.realtime, cam.loop, cam.enabled) == (5.0, None, None, True, False, True)
    assert not cam.is_live and cam.effective_mode == "replay"
    assert config.scenes["plaza"].bank == str(files / "plaza.safetensors")
    assert (config.scenes["plaza"].tau, config.scenes["plaza"].theta) == (None, None)
    eng = config.engine
    assert (eng.device, eng.precision, eng.max_batch, eng.max_wait_ms, eng.k_image, eng.k_pixel, eng.escalate) == (
        "auto", "auto", 16, 50.0, None, None, "flagged")
    assert (config.bus.kind, config.bus.codec, config.bus.jpeg_quality, config.bus.max_len) == ("inprocess", "jpeg", 90, 256)
    assert config.ingest.watchdog_s == 5.0 and config.ingest.backoff_max_s == 30.0
    assert config.redis.url == "redis://127.0.0.1:6379/0" and config.redis.password_env is None
    assert (config.events.open_after, config.events.window, config.events.close_after) == (3, 5, 10)
    assert config.outputs.dir is None and config.outputs.overlays is True
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9108)
    assert (config.logging.json, config.logging.level) == (False, "INFO")
    assert camera_ids(config) == ["gate"]


def test_live_source_and_explicit_values(tmp_path: Path) -> None:
    data = minimal()
    data["cameras"]["gate"] = {"source": "rtsp://cam.local/s1", "scene": "plaza", "fps": 2, "resolution": [640, 360]}
    data["outputs"] = {"dir": "out"}
    config = parse_config(data, tmp_path, check_files=False)
    cam = config.cameras["gate"]
    assert cam.is_live and cam.effective_mode == "live" and cam.source == "rtsp://cam.local/s1"
    assert cam.fps == 2.0 and isinstance(cam.fps, float) and cam.resolution == (640, 360)
    assert config.outputs.dir == str(tmp_path / "out")


@pytest.mark.parametrize("name", ["example.yaml", "replay-local.yaml"])
def test_shipped_configs_parse(name: str) -> None:
    config = load_config(CONFIGS / name, check_files=False)
    assert camera_ids(config)


def test_shipped_config_shapes() -> None:
    example = load_config(CONFIGS / "example.yaml", check_files=False)
    assert example.bus.kind == "redis" and len(example.cameras) == 2 and len(example.scenes) == 1
    assert "CHANGE_ME" not in repr(example)
    local = load_config(CONFIGS / "replay-local.yaml", check_files=False)
    assert local.bus.kind == "inprocess" and local.outputs.dir
    assert [cam.effective_mode for cam in local.cameras.values()] == ["replay"]


def test_replay_local_config_runs_on_the_quick_start_outputs(tmp_path: Path) -> None:
    """configs/replay-local.yaml points at what the README quick start writes, from the repository root."""
    root = CONFIGS.parent
    readme = (root / "README.md").read_text()
    video, bank = "runs/demo/videos/test_01.mp4", "runs/demo/demo.bank"
    assert "demo-scene --out runs/demo" in readme and f"--out {bank}" in readme and video in readme

    local = load_config(CONFIGS / "replay-local.yaml", check_files=False)
    assert [cam.source for cam in local.cameras.values()] == [str(root / video)]
    assert [scene.bank for scene in local.scenes.values()] == [str(root / bank)]

    # A copy of the repository layout holding those files loads with every file checked.
    (tmp_path / "configs").mkdir()
    copy = tmp_path / "configs" / "replay-local.yaml"
    copy.write_text((CONFIGS / "replay-local.yaml").read_text())
    for rel in (video, bank):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\0")
    config = load_config(copy)
    assert config.outputs.dir == str(tmp_path / "runs" / "replay-local")


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(engin={}), "engin: unknown key (did you mean engine?)"),
    (lambda d: d.update(engine={"max_bach": 4}), "engine.max_bach: unknown key (did you mean max_batch?)"),
    (lambda d: d["cameras"]["gate"].update(fsp=5), "cameras.gate.fsp: unknown key (did you mean fps?)"),
])
def test_unknown_key_names_full_path_with_hint(tmp_path: Path, mutate, expected: str) -> None:
    data = minimal()
    mutate(data)
    assert error_of(data, tmp_path) == expected


def test_unknown_key_without_close_match_lists_keys(tmp_path: Path) -> None:
    data = minimal()
    data["bus"] = {"zzz": 1}
    assert error_of(data, tmp_path) == "bus.zzz: unknown key; expected one of kind, codec, jpeg_quality, max_len, max_age_s"


@pytest.mark.parametrize("section, key, value, expected", [
    ("cameras.gate", "fps", "ten", "cameras.gate.fps: expected a number > 0 or null, got 'ten'"),
    ("cameras.gate", "fps", 0, "cameras.gate.fps: expected a number > 0 or null, got 0"),
    ("cameras.gate", "enabled", "yes please", "cameras.gate.enabled: expected true or false, got 'yes please'"),
    ("cameras.gate", "resolution", [640], "cameras.gate.resolution: expected a [width, height] pair of integers > 0 or null, got [640]"),
    ("cameras.gate", "resolution", [640, "x"], "cameras.gate.resolution: expected a [width, height] pair of integers > 0 or null, got [640, 'x']"),
    ("cameras.gate", "resolution", [640, 0], "cameras.gate.resolution: expected a [width, height] pair of integers > 0 or null, got [640, 0]"),
    ("cameras.gate", "mode", "repaly", "cameras.gate.mode: expected one of live, replay or null, got 'repaly' (did you mean replay?)"),
    ("engine", "max_batch", 2.5, "engine.max_batch: expected an integer >= 1, got 2.5"),
    ("engine", "max_batch", True, "engine.max_batch: expected an integer >= 1, got true"),
    ("engine", "k_image", 0, "engine.k_image: expected an integer >= 1 or null, got 0"),
    ("engine", "precision", "fp64", "engine.precision: expected one of auto, fp32, bf16, fp16, got 'fp64'"),
    ("bus", "jpeg_quality", 101, "bus.jpeg_quality: expected an integer in 1..100, got 101"),
    ("scenes.plaza", "tau", "high", "scenes.plaza.tau: expected a number or null, got 'high'"),
    ("logging", "level", "LOUD", "logging.level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
])
def test_wrong_type_names_path_and_expectation(tmp_path: Path, section: str, key: str, value, expected: str) -> None:
    data = minimal()
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    assert error_of(data, tmp_path).startswith(expected)


def test_missing_required_keys(tmp_path: Path) -> None:
    data = minimal()
    del data["cameras"]["gate"]["source"]
    assert error_of(data, tmp_path) == ("cameras.gate.source: missing required key; "
                                        "expected a string (rtsp://..., http(s)://... or a file path)")
    assert error_of({"scenes": {}}, tmp_path).startswith("cameras: missing required key; expected a mapping")


def test_camera_with_unknown_scene(tmp_path: Path) -> None:
    data = minimal()
    data["cameras"]["gate"]["scene"] = "plazza"
    assert error_of(data, tmp_path) == "cameras.gate.scene: unknown scene 'plazza'; expected one of plaza (did you mean plaza?)"


@pytest.mark.parametrize("bad_id", ["../x", "cam one", "", "-lead", "cam\n", "a" * 65])
def test_bad_camera_id_rejected(tmp_path: Path, bad_id: str) -> None:
    data = minimal()
    data["cameras"] = {bad_id: data["cameras"]["gate"]}
    assert error_of(data, tmp_path).startswith("cameras: invalid camera id")


def test_bad_scene_id_rejected(tmp_path: Path) -> None:
    data = minimal()
    data["scenes"] = {"a/b": {"bank": "x"}}
    assert error_of(data, tmp_path).startswith("scenes: invalid scene id 'a/b'")


def test_no_enabled_camera(tmp_path: Path) -> None:
    data = minimal()
    data["cameras"]["gate"]["enabled"] = False
    assert error_of(data, tmp_path).startswith("cameras: no enabled camera")


def test_missing_file_source_and_bank_with_check_files(files: Path) -> None:
    parse_config(minimal(), files, check_files=True)
    data = minimal()
    data["cameras"]["gate"]["source"] = "nope.mp4"
    assert error_of(data, files, check_files=True) == f"cameras.gate.source: file not found: {files / 'nope.mp4'}"
    data = minimal()
    data["scenes"]["plaza"]["bank"] = "nope.safetensors"
    assert error_of(data, files, check_files=True) == (
        f"scenes.plaza.bank: reference bank not found: {files / 'nope.safetensors'} "
        "(build it with 'spade-monitor reference build')")
    parse_config(data, files, check_files=False)  # the same config is fine when files are not checked


def test_config_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file not found: .*missing\.yaml$"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_syntax_error_is_one_line_with_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "cameras:\n  gate:\n    source: rtsp://u:secretpw@h/x\n   scene: [plaza\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    message = str(info.value)
    assert "\n" not in message and "line 4" in message and "secretpw" not in message


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "cameras:\n  gate: {source: a.mp4, scene: s}\n  gate: {source: b.mp4, scene: s}\n"
                           "scenes:\n  s: {bank: b}\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'gate'"):
        load_config(path, check_files=False)


def test_python_tags_are_refused(tmp_path: Path) -> None:
    # Harmless under an unsafe loader too: builtins.len would just return 1.
    path = write(tmp_path, "cameras: !!python/object/apply:builtins.len [[1]]\nscenes: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    message = str(info.value)
    assert "\n" not in message and "line 1" in message and "python/object" in message


def _with_source(source: str, **extra) -> dict:
    data = minimal()
    data["cameras"]["gate"].update(source=source, **extra)
    return data


SECRET_CASES = {  # case -> (config, how the error starts)
    "bad fps": (_with_source("rtsp://admin:secretpw@10.0.0.5/s", fps="fast"), "cameras.gate.fps:"),
    "unknown scene": (_with_source("rtsp://admin:secretpw@10.0.0.5/s", scene="nope"), "cameras.gate.scene:"),
    "unknown key": (_with_source("rtsp://admin:secretpw@10.0.0.5/s", sorce="x"), "cameras.gate.sorce:"),
    "unsupported scheme": (_with_source("ftp://admin:secretpw@10.0.0.5/s"),
                           "cameras.gate.source: unsupported scheme ftp:// in 'ftp://***@10.0.0.5/s'"),
    "scheme forgotten": (_with_source("admin:secretpw@10.0.0.5/stream"),
                         "cameras.gate.source: '***@10.0.0.5/stream' looks like a URL without a scheme"),
    "query token on a file": (_with_source("clip.mp4?token=secretpw"), "cameras.gate.source:"),
    "missing file with userinfo-like name": (_with_source("file:///videos/u:secretpw@cam.mp4"),
                                             "cameras.gate.source: file not found: ***@cam.mp4"),
    "url in a number field": (_with_source("clip.mp4", fps="rtsp://admin:secretpw@10.0.0.5/s"),
                              "cameras.gate.fps: expected a number > 0 or null, got 'rtsp://***@10.0.0.5/s'"),
    "url as camera id": ({"cameras": {"rtsp://a:secretpw@h": {"source": "x", "scene": "plaza"}},
                          "scenes": {"plaza": {"bank": "plaza.safetensors"}}}, "cameras: invalid camera id"),
}


@pytest.mark.parametrize("case", SECRET_CASES)
def test_credentials_never_in_errors(files: Path, case: str) -> None:
    data, start = SECRET_CASES[case]
    message = error_of(copy.deepcopy(data), files, check_files=True)
    assert message.startswith(start)
    assert "secretpw" not in message


def test_camera_and_config_repr_hide_credentials(tmp_path: Path) -> None:
    data = _with_source("rtsp://admin:secretpw@10.0.0.5:554/s?token=secretpw")
    data["redis"] = {"url": "redis://:secretpw@redis.local:6379/0"}
    config = parse_config(data, tmp_path, check_files=False)
    cam = config.cameras["gate"]
    assert cam.source.startswith("rtsp://admin:secretpw@")  # ingest still needs the real URL
    for text in (repr(cam), str(cam), repr(config), repr(config.redis)):
        assert "secretpw" not in text
    assert "rtsp://***@10.0.0.5:554/s?token=***" in repr(cam)


@pytest.mark.parametrize("url, expected", [
    ("rtsp://admin:secretpw@10.0.0.5:554/stream1", "rtsp://***@10.0.0.5:554/stream1"),
    ("rtsp://admin@10.0.0.5/stream1", "rtsp://***@10.0.0.5/stream1"),
    ("rtsp://admin:pa/ss@w@10.0.0.5/s", "rtsp://***@10.0.0.5/s"),  # unescaped '/' and '@' in the password
    ("http://cam.local/snap.jpg?user=me&token=abc123&size=2", "http://cam.local/snap.jpg?user=me&token=***&size=2"),
    ("https://cam.local/v?PASSWORD=x;key=y", "https://cam.local/v?PASSWORD=***;key=***"),
    ("http://cam.local/v?monkey=1", "http://cam.local/v?monkey=1"),
    ("/data/videos/plaza.mp4", "/data/videos/plaza.mp4"),
    ("videos/cam@2x.mp4", "videos/cam@2x.mp4"),
    ("admin:pw@10.0.0.5/s", "***@10.0.0.5/s"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redis_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = RedisConfig(url="redis://redis.local:6379/0", password_env="SPADE_TEST_REDIS_PW")
    monkeypatch.delenv("SPADE_TEST_REDIS_PW", raising=False)
    with pytest.raises(ConfigError, match=r"^redis\.password_env: environment variable SPADE_TEST_REDIS_PW is not set"):
        redis.connection_url()
    monkeypatch.setenv("SPADE_TEST_REDIS_PW", "s3cr:t/@")
    assert redis.connection_url() == "redis://:s3cr%3At%2F%40@redis.local:6379/0"
    assert "s3cr" not in repr(redis)
    assert RedisConfig(url="redis://me@h/1", password_env="SPADE_TEST_REDIS_PW").connection_url() == \
        "redis://me:s3cr%3At%2F%40@h/1"
    assert RedisConfig().connection_url() == "redis://127.0.0.1:6379/0"


def test_redis_password_env_must_be_a_name_and_is_not_echoed(tmp_path: Path) -> None:
    data = minimal()
    data["redis"] = {"password_env": "hunter 2!"}
    message = error_of(data, tmp_path)
    assert message.startswith("redis.password_env: not a valid variable name") and "hunter" not in message


def test_cross_field_checks(tmp_path: Path) -> None:
    data = minimal()
    data["events"] = {"open_after": 6, "window": 5}
    assert error_of(data, tmp_path) == "events.open_after: expected at most events.window (5), got 6"
    data = minimal()
    data["ingest"] = {"backoff_initial_s": 60}
    assert error_of(data, tmp_path).startswith("ingest.backoff_initial_s: expected at most ingest.backoff_max_s")


def test_empty_section_means_defaults_and_empty_file_is_an_error(tmp_path: Path) -> None:
    data = minimal()
    data["engine"] = None
    assert parse_config(data, tmp_path, check_files=False).engine.max_batch == 16
    with pytest.raises(ConfigError, match=r"^config: empty"):
        load_config(write(tmp_path, "# nothing yet\n"), check_files=False)
    with pytest.raises(ConfigError, match=r"^config: expected a mapping, got \[.a.\]$"):
        load_config(write(tmp_path, "- a\n"), check_files=False)


def test_camera_repr_is_a_camera_config() -> None:
    cam = CameraConfig(source="rtsp://u:secretpw@h/x", scene="s")
    assert repr(cam).startswith("CameraConfig(source='rtsp://***@h/x'")


def test_generic_validator_handles_string_lists() -> None:
    from dataclasses import dataclass, field

    from monitor.config import _build

    @dataclass
    class Tags:
        names: list[str] = field(default_factory=list)

    assert _build(Tags, {"names": ["a", "b"]}, "tags").names == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^tags\.names\[1\]: expected a string, got 3$"):
        _build(Tags, {"names": ["a", 3]}, "tags")
    with pytest.raises(ConfigError, match=r"^tags\.names: expected a list of strings, got 'a'$"):
        _build(Tags, {"names": "a"}, "tags")


def test_camera_source_takes_secrets_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = minimal()
    data["cameras"]["gate"]["source"] = "rtsp://admin:${GATE_PW}@10.0.0.7/stream"
    monkeypatch.setenv("GATE_PW", "hunter2")
    config = parse_config(copy.deepcopy(data), tmp_path, check_files=False)
    assert config.cameras["gate"].source == "rtsp://admin:hunter2@10.0.0.7/stream"
    assert "hunter2" not in repr(config)
    monkeypatch.delenv("GATE_PW")
    assert error_of(data, tmp_path) == ("cameras.gate.source: environment variable GATE_PW is not set; "
                                        "set it or write the value")


@pytest.mark.parametrize("section, key, value, expected", [
    ("cameras.gate", "fps", "5", "cameras.gate.fps: expected a number > 0 or null, got '5'"),  # no coercion
    ("cameras.gate", "fps", float("nan"), "cameras.gate.fps: expected a number > 0 or null, got nan"),
    ("cameras.gate", "enabled", 1, "cameras.gate.enabled: expected true or false, got 1"),
    ("cameras.gate", "scene", "  ", "cameras.gate.scene: expected a string, got '  '"),
    ("cameras.gate", "resolution", [640.0, 360], "cameras.gate.resolution: expected a [width, height] pair of integers > 0 or null, got [640.0, 360]"),
    ("cameras.gate", "resolution", [1, 2, 3], "cameras.gate.resolution: expected a [width, height] pair of integers > 0 or null, got [1, 2, 3]"),
    ("engine", "device", "gpu", "engine.device: expected auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
    ("engine", "max_wait_ms", -1, "engine.max_wait_ms: expected a number >= 0, got -1"),
    ("redis", "url", "http://redis.local", "redis.url: expected a redis://, rediss:// or unix:// URL, got 'http://redis.local'"),
    ("redis", "url", "http://u:secretpw@redis.local", "redis.url: expected a redis://, rediss:// or unix:// URL, got 'http://***@redis.local'"),
    ("metrics", "port", 70000, "metrics.port: expected an integer in 0..65535 (0 disables), got 70000"),
    ("outputs", "dir", "", "outputs.dir: expected a string or null, got ''"),
])
def test_strict_values_exact_messages(tmp_path: Path, section: str, key: str, value, expected: str) -> None:
    data = minimal()
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    assert error_of(data, tmp_path) == expected


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["cameras"].update(gate=5), "cameras.gate: expected a mapping, got 5"),
    (lambda d: d["cameras"].update(gate=None), "cameras.gate.source: missing required key; "
                                               "expected a string (rtsp://..., http(s)://... or a file path)"),
    (lambda d: d.update(engine=[1]), "engine: expected a mapping, got [1]"),
    (lambda d: d["cameras"]["gate"].update(sorce=d["cameras"]["gate"].pop("source")),  # the typo, not the gap
     "cameras.gate.sorce: unknown key (did you mean source?)"),
    (lambda d: d.update(explicit=["redis"]), "explicit: unknown key; expected one of cameras, scenes, engine, bus, "
                                             "ingest, redis, events, outputs, metrics, logging"),
    (lambda d: d["cameras"].update({7: {"source": "a", "scene": "plaza"}}), "cameras: invalid camera id 7; expected"),
])
def test_structure_errors(tmp_path: Path, mutate, expected: str) -> None:
    data = minimal()
    mutate(data)
    assert error_of(data, tmp_path).startswith(expected)


def test_explicit_sections_survive_a_spawned_process(tmp_path: Path) -> None:
    import pickle

    data = minimal()
    data["redis"] = {"url": "redis://:secretpw@redis.local/0"}
    config = parse_config(data, tmp_path, check_files=False)
    assert config.explicit == {"cameras", "scenes", "redis"}
    assert parse_config(minimal(), tmp_path, check_files=False).explicit == {"cameras", "scenes"}
    copy_ = pickle.loads(pickle.dumps(config))  # what multiprocessing's spawn does to it
    assert copy_.explicit == config.explicit and copy_.redis.url == config.redis.url
    assert "secretpw" not in str(config.redis) and "secretpw" not in repr(copy_)


def test_log_level_is_case_insensitive_and_stored_upper(tmp_path: Path) -> None:
    data = minimal()
    data["logging"] = {"level": "debug"}
    assert parse_config(data, tmp_path, check_files=False).logging.level == "DEBUG"


def test_pydantic_messages_never_quote_a_value() -> None:
    """Code that builds a model directly gets pydantic's ValidationError: it must not echo the source."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        CameraConfig(source="rtsp://u:secretpw@h/x", scene="s", fps="fast", nope=1)
    assert "secretpw" not in str(info.value) and "fast" not in str(info.value)
