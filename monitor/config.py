"""The service's YAML configuration: strict parsing into plain dataclasses.

Strict like Frigate's: unknown keys, wrong types and missing required keys are errors. Every
error is a one-line ConfigError that names the dotted key path and what was expected, and no
error message or repr ever shows a credential from a camera source or the Redis URL.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import quote, unquote, urlsplit

import yaml

from engine.errors import ConfigError
from monitor.frames import NAME_RULE, is_safe_name
from monitor.urls import LIVE_SCHEMES, redact_url
from monitor.urls import scheme as _scheme

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- schema -------------------------------------------------------------------------------------
# Field metadata read by the validator: "check" = (predicate, "what it must be"), "expect" =
# wording that replaces the type's own description, "id" = the dict's keys are ids of this kind.

def _check(pred: typing.Callable[[Any], bool], what: str) -> dict:
    """A constraint on top of the type; `what` completes "expected an integer ...", e.g. ">= 1"."""
    return {"check": (pred, what)}


def _rule(pred: typing.Callable[[Any], bool], expect: str) -> dict:
    """A constraint whose wording replaces the type's, e.g. "auto, cpu, mps, cuda or cuda:N"."""
    return {"check": (pred, expect), "expect": expect}


def _at_least(n: float) -> dict:
    return _check(lambda v: v >= n, f">= {n}")


_POSITIVE = _check(lambda v: v > 0, "> 0")


@dataclass(repr=False)
class CameraConfig:
    source: str = field(metadata={"expect": "a string (rtsp://..., http(s)://... or a file path)"})
    scene: str
    # Sampling rate; null keeps every decoded frame (replays of footage at its own rate).
    fps: Optional[float] = field(default=5.0, metadata=_check(lambda v: v is None or v > 0, "> 0"))
    resolution: Optional[tuple[int, int]] = field(
        default=None, metadata={"expect": "a [width, height] pair of integers > 0 or null",
                                **_check(lambda v: v is None or min(v) > 0, "> 0")})
    mode: Optional[Literal["live", "replay"]] = None  # None: live for streams, replay for files
    realtime: bool = True
    loop: bool = False
    enabled: bool = True

    @property
    def is_live(self) -> bool:
        return _scheme(self.source) in LIVE_SCHEMES

    @property
    def effective_mode(self) -> str:
        return self.mode or ("live" if self.is_live else "replay")

    def __repr__(self) -> str:  # a logged config must never show the source's password
        return (f"CameraConfig(source={redact_url(self.source)!r}, scene={self.scene!r}, fps={self.fps!r}, "
                f"resolution={self.resolution!r}, mode={self.mode!r}, realtime={self.realtime!r}, "
                f"loop={self.loop!r}, enabled={self.enabled!r})")


@dataclass
class SceneConfig:
    bank: str = field(metadata={"expect": "a string (path to a reference bank)"})
    tau: Optional[float] = None  # overrides the bank's calibrated flag threshold tau (engine/decision.py)
    theta: Optional[float] = None  # overrides the bank's pixel threshold


@dataclass
class EngineConfig:
    device: str = field(default="auto", metadata=_rule(
        lambda v: bool(_DEVICE_RE.match(v)), "auto, cpu, mps, cuda or cuda:N"))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_batch: int = field(default=16, metadata=_at_least(1))
    max_wait_ms: float = field(default=50.0, metadata=_at_least(0))
    k_image: Optional[int] = field(default=None, metadata=_at_least(1))  # None: as stored in the bank
    k_pixel: Optional[int] = field(default=None, metadata=_at_least(1))
    escalate: Literal["flagged", "all", "none"] = "flagged"
    # Frames another engine took but did not acknowledge for this long are presumed orphaned.
    claim_idle_s: float = field(default=30.0, metadata=_POSITIVE)
    # CPU threads for the backbone; null = torch's default. Where ingest decoding shares the
    # cores, 1 avoids thread oversubscription stalls (README, Performance).
    threads: Optional[int] = field(default=None, metadata=_check(lambda v: v is None or v >= 1, ">= 1"))


@dataclass
class BusConfig:
    kind: Literal["inprocess", "redis"] = "inprocess"
    codec: Literal["jpeg", "raw"] = "jpeg"
    jpeg_quality: int = field(default=90, metadata=_check(lambda v: 1 <= v <= 100, "in 1..100"))
    max_len: int = field(default=256, metadata=_at_least(1))  # live cameras drop the oldest beyond it
    max_age_s: float = field(default=10.0, metadata=_POSITIVE)  # and live frames waiting longer than this


@dataclass
class IngestConfig:
    watchdog_s: float = field(default=5.0, metadata=_POSITIVE)  # no frame for this long = reconnect
    backoff_initial_s: float = field(default=0.5, metadata=_POSITIVE)
    backoff_max_s: float = field(default=30.0, metadata=_POSITIVE)
    connect_timeout_s: float = field(default=5.0, metadata=_POSITIVE)
    read_timeout_s: float = field(default=5.0, metadata=_POSITIVE)


@dataclass(repr=False)
class RedisConfig:
    url: str = field(default="redis://127.0.0.1:6379/0", metadata=_rule(
        lambda v: _scheme(v) in ("redis", "rediss", "unix"), "a redis://, rediss:// or unix:// URL"))
    password_env: Optional[str] = None  # name of the environment variable holding the password
    stream_maxlen: int = field(default=10000, metadata=_at_least(1))
    overlay_ttl_s: int = field(default=3600, metadata=_at_least(1))
    # Newest overlays kept per camera: at about 15 KB each, 500 bound a camera to about 7 MB.
    overlays_per_camera: int = field(default=500, metadata=_at_least(1))

    def connection_url(self) -> str:
        """The URL to connect with: the password from password_env inserted when it is set."""
        if not self.password_env:
            return self.url
        password = os.environ.get(self.password_env)
        if password is None:
            raise ConfigError(f"redis.password_env: environment variable {self.password_env} is not set; "
                              f"expected it to hold the Redis password")
        parts = urlsplit(self.url)
        user = quote(unquote(parts.username), safe="") if parts.username else ""
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()

    def __repr__(self) -> str:
        return (f"RedisConfig(url={redact_url(self.url)!r}, password_env={self.password_env!r}, "
                f"stream_maxlen={self.stream_maxlen!r}, overlay_ttl_s={self.overlay_ttl_s!r}, "
                f"overlays_per_camera={self.overlays_per_camera!r})")


@dataclass
class EventsConfig:
    open_after: int = field(default=3, metadata=_at_least(1))  # flagged frames within `window` open an event
    window: int = field(default=5, metadata=_at_least(1))
    close_after: int = field(default=10, metadata=_at_least(1))  # consecutive normal frames close it


@dataclass
class OutputsConfig:
    dir: Optional[str] = None  # also write JSON Lines and overlays here (no Redis needed)
    overlays: bool = True


@dataclass
class MetricsConfig:
    address: str = "127.0.0.1"
    port: int = field(default=9108, metadata=_check(lambda v: 0 <= v <= 65535, "in 0..65535 (0 disables)"))


@dataclass
class LoggingConfig:
    json: bool = False
    level: str = field(default="INFO", metadata=_rule(
        lambda v: v.upper() in _LOG_LEVELS, "one of " + ", ".join(_LOG_LEVELS)))


@dataclass
class MonitorConfig:
    cameras: dict[str, CameraConfig] = field(metadata={"id": "camera"})
    scenes: dict[str, SceneConfig] = field(metadata={"id": "scene"})
    engine: EngineConfig = field(default_factory=EngineConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Top-level sections present in the file: e.g. an in-process bus publishes to Redis only if
    # `redis:` was written out, not because it has a default.
    explicit: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)


def camera_ids(config: MonitorConfig, enabled_only: bool = True) -> list[str]:
    return [cid for cid, cam in config.cameras.items() if cam.enabled or not enabled_only]


# -- generic validator --------------------------------------------------------------------------

def _got(value: Any) -> str:
    """How a bad value is echoed: short, and redacted in case it is a URL with a password."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        text = repr([redact_url(v) if isinstance(v, str) else v for v in value])
        return text if len(text) <= 60 else f"a list of {len(value)}"
    text = repr(redact_url(value)) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: Any) -> str:
    key = redact_url(str(key))
    return f"{path}.{key}" if path else key


def _optional_arg(tp: Any) -> Any | None:
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _describe(tp: Any) -> str:
    inner = _optional_arg(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return "a list of " + plural.get(args[0], "items")
    if origin is tuple:
        return f"a list of {len(args)} values"
    if origin is dict:
        return "a mapping of id -> settings"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _expected(tp: Any, meta: typing.Mapping) -> str:
    if "expect" in meta:
        return meta["expect"]
    text = _describe(tp)
    if "check" in meta:
        inner = _optional_arg(tp)
        text = f"{_describe(inner)} {meta['check'][1]} or null" if inner is not None else f"{text} {meta['check'][1]}"
    return text


def _convert(value: Any, tp: Any, path: str, meta: typing.Mapping, shown: Any = None) -> Any:
    """Check `value` against type `tp`; return it converted (e.g. int -> float, list -> tuple).

    `shown` is the type that messages describe: Optional[X] while X is being checked.
    """
    shown = shown or tp

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{path}: expected {_expected(shown, meta)}, got {_got(value)}")

    inner = _optional_arg(tp)
    if inner is not None:
        return None if value is None else _convert(value, inner, path, meta, shown=tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path)  # an empty section means all defaults
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"{path}: expected {_describe(shown)}, got {_got(value)}{suffix}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {_check_id(k, path, meta.get("id")): _convert(v, args[1], _join(path, k), {})
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            fail()
        if origin is tuple:
            if len(value) != len(args):
                fail()
            try:
                items = [_convert(v, a, path, meta) for v, a in zip(value, args)]
            except ConfigError:
                fail()  # report the whole list, not the one bad item
        else:
            items = [_convert(v, args[0], f"{path}[{i}]", {}) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            fail()
        return value
    raise TypeError(f"config schema uses unsupported type {tp!r}")  # a bug in this module, not user error


def _check_id(key: Any, path: str, kind: str | None) -> str:
    if kind is None:
        return key
    if not is_safe_name(key):
        raise ConfigError(f"{path}: invalid {kind} id {_got(key)}; expected {NAME_RULE}")
    return key


def _build(cls: type, data: Any, path: str) -> Any:
    """Validate a mapping against dataclass `cls` and construct it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_got(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            what = (f"unknown key (did you mean {hint[0]}?)" if hint
                    else f"unknown key; expected one of {', '.join(fields)}")
            raise ConfigError(f"{_join(path, key)}: {what}")
    kwargs = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key_path}: missing required key; expected {_expected(hints[name], f.metadata)}")
            continue
        value = _convert(data[name], hints[name], key_path, f.metadata)
        if "check" in f.metadata and value is not None and not f.metadata["check"][0](value):
            raise ConfigError(f"{key_path}: expected {_expected(hints[name], f.metadata)}, got {_got(data[name])}")
        kwargs[name] = value
    return cls(**kwargs)


# -- cross-checks and path resolution ----------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(text: str, path: str) -> str:
    """${NAME} from the environment, so camera passwords stay out of config files."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{path}: environment variable {name} is not set; set it or write the value")
        return os.environ[name]

    return _ENV_REF.sub(value, text)


def _resolve_source(cid: str, cam: CameraConfig, base_dir: Path, check_files: bool) -> str:
    path = f"cameras.{cid}.source"
    source = _expand_env(cam.source.strip(), path)
    scheme = _scheme(source)
    if scheme in LIVE_SCHEMES:
        return source
    if scheme not in ("", "file"):
        raise ConfigError(f"{path}: unsupported scheme {scheme}:// in {redact_url(source)!r}; expected "
                          f"{', '.join(sorted(LIVE_SCHEMES))} or a file path")
    if not scheme and redact_url(source) != source:  # 'user:pw@host/x' with the rtsp:// forgotten
        raise ConfigError(f"{path}: {redact_url(source)!r} looks like a URL without a scheme; expected "
                          f"rtsp://..., http(s)://... or a file path")
    file = Path(unquote(urlsplit(source).path) if scheme == "file" else source).expanduser()
    file = file if file.is_absolute() else (base_dir / file)
    file = Path(os.path.normpath(file))
    if check_files and not file.is_file():
        raise ConfigError(f"{path}: file not found: {redact_url(str(file))}")
    return str(file)


def _cross_check(config: MonitorConfig, base_dir: Path, check_files: bool) -> None:
    for sid, scene in config.scenes.items():
        bank = Path(scene.bank).expanduser()
        bank = Path(os.path.normpath(bank if bank.is_absolute() else base_dir / bank))
        if check_files and not bank.is_file():
            raise ConfigError(f"scenes.{sid}.bank: reference bank not found: {bank} "
                              f"(build it with 'spade-monitor reference build')")
        scene.bank = str(bank)
    for cid, cam in config.cameras.items():
        if cam.scene not in config.scenes:
            hint = difflib.get_close_matches(cam.scene, list(config.scenes), n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"cameras.{cid}.scene: unknown scene {_got(cam.scene)}; expected one of "
                              f"{', '.join(config.scenes) or '(no scenes defined)'}{suffix}")
        cam.source = _resolve_source(cid, cam, base_dir, check_files)
    if not any(cam.enabled for cam in config.cameras.values()):
        raise ConfigError("cameras: no enabled camera; expected at least one camera with enabled: true")
    ev = config.events
    if ev.open_after > ev.window:
        raise ConfigError(f"events.open_after: expected at most events.window ({ev.window}), got {ev.open_after}")
    ing = config.ingest
    if ing.backoff_initial_s > ing.backoff_max_s:
        raise ConfigError(f"ingest.backoff_initial_s: expected at most ingest.backoff_max_s ({ing.backoff_max_s}), "
                          f"got {ing.backoff_initial_s}")
    red = config.redis
    if red.password_env is not None:
        if not _ENV_NAME_RE.match(red.password_env):  # never echo it: it may be the password itself
            raise ConfigError("redis.password_env: not a valid variable name; expected the NAME of an environment "
                              "variable (e.g. REDIS_PASSWORD), not the password")
        if urlsplit(red.url).password:
            raise ConfigError("redis.url: contains a password and redis.password_env is set; expected only one")
    config.logging.level = config.logging.level.upper()
    if config.outputs.dir is not None:
        out = Path(config.outputs.dir).expanduser()
        config.outputs.dir = str(Path(os.path.normpath(out if out.is_absolute() else base_dir / out)))


def parse_config(data: dict, base_dir: Path, check_files: bool = True) -> MonitorConfig:
    """Validate an already-loaded mapping; relative paths resolve against `base_dir`."""
    if data is None:
        raise ConfigError("config: empty; expected a mapping with at least cameras and scenes")
    config = _build(MonitorConfig, data, "")
    config.explicit = frozenset(data)
    _cross_check(config, Path(base_dir).resolve(), check_files)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags) that also refuses duplicate keys, which YAML would silently drop."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_got(key)}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | Path, *, check_files: bool = True) -> MonitorConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__}); "
                          f"expected a UTF-8 text file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        # Only the problem text: str(exc) quotes the offending line, which may hold a password.
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{path}: invalid YAML at {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    return parse_config(data, path.resolve().parent, check_files=check_files)
