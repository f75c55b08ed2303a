"""The service's YAML configuration: strict parsing into pydantic models, one per section.

Strict like Frigate's: unknown keys, wrong types and missing required keys are errors, and nothing
is coerced ("5" is no number, 1 is not true). `_build` turns pydantic's errors into one-line
ConfigErrors that name the dotted key path and what was expected, and no error message, repr or
str ever shows a credential from a camera source or the Redis URL.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, TypeAlias, Union
from urllib.parse import quote, unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic.functional_validators import AfterValidator, BeforeValidator
from pydantic_core import ErrorDetails, PydanticCustomError

from engine.errors import ConfigError
from monitor.frames import NAME_RULE, is_safe_name
from monitor.urls import LIVE_SCHEMES, redact_url
from monitor.urls import scheme as _scheme

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- schema -------------------------------------------------------------------------------------
# A field's `description` is the wording errors use for what its value must be; without one it
# is derived from the type and its bounds ("an integer >= 1 or null").

_Text = Annotated[str, Field(pattern=r"\S")]  # a blank string is as good as missing
_Positive = Annotated[int, Field(gt=0)]


def _rule(test: typing.Callable[[str], Any]) -> AfterValidator:
    """A check beyond the type; the field's description says what passes."""
    def check(value: str) -> str:
        if not test(value):
            raise PydanticCustomError("rule", "not allowed")
        return value
    return AfterValidator(check)


def _id(kind: str) -> Any:
    """Camera and scene ids become Redis keys and file names: the dict's keys must be safe names."""
    def check(key: Any) -> Any:
        if not is_safe_name(key):
            raise PydanticCustomError("unsafe_id", "invalid id", {"kind": kind})
        return key
    return Annotated[str, BeforeValidator(check)]


if TYPE_CHECKING:  # a type checker sees the ids as what they are; pydantic sees the checked form
    CameraId: TypeAlias = str
    SceneId: TypeAlias = str
else:
    CameraId, SceneId = _id("camera"), _id("scene")


class _Section(BaseModel):
    # strict: no coercion (2.5 is no integer, "yes" no boolean); floats finite; pydantic's own
    # messages never quote a value (it may hold a password), _build writes the user's.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:  # `engine:` with nothing under it
        return {} if data is None else data

    def __str__(self) -> str:  # as the dataclasses had it: the repr, never pydantic's bare field list
        return repr(self)


class CameraConfig(_Section):
    source: _Text = Field(description="a string (rtsp://..., http(s)://... or a file path)")
    scene: _Text
    # Sampling rate; null keeps every decoded frame (replays of footage at its own rate).
    fps: Optional[float] = Field(5.0, gt=0)
    resolution: Annotated[Optional[tuple[_Positive, _Positive]],
                          BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)] = Field(
        None, description="a [width, height] pair of integers > 0 or null")  # YAML has no tuples
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

    def __repr_args__(self) -> Any:  # a logged config must never show the source's password
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "source" else value


class SceneConfig(_Section):
    bank: _Text = Field(description="a string (path to a reference bank)")
    # Overrides the bank's calibrated flag threshold tau: a frame is flagged when its smoothed
    # score exceeds it. The gate threshold gate_tau is not affected (except with DN2 scores,
    # where gate and flag are one test): engine/decision.py, Thresholds.of_bank.
    tau: Optional[float] = None
    theta: Optional[float] = None  # overrides the bank's pixel threshold


class EngineConfig(_Section):
    device: Annotated[str, _rule(_DEVICE_RE.match)] = Field("auto", description="auto, cpu, mps, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_batch: int = Field(16, ge=1)
    max_wait_ms: float = Field(50.0, ge=0)
    k_image: Optional[int] = Field(None, ge=1)  # None: as stored in the bank
    k_pixel: Optional[int] = Field(None, ge=1)
    escalate: Literal["flagged", "all", "none"] = "flagged"
    # Frames another engine took but did not acknowledge for this long are presumed orphaned.
    claim_idle_s: float = Field(30.0, gt=0)
    # Redis bus: how long a dead engine's cameras stay its own before live engines take them
    # (monitor/ownership.py); leases are renewed every third of it.
    lease_s: float = Field(9.0, gt=0)
    # CPU threads for the backbone; null = torch's default. Where ingest decoding shares the
    # cores, 1 avoids thread oversubscription stalls (README, Performance).
    threads: Optional[int] = Field(None, ge=1)


class BusConfig(_Section):
    kind: Literal["inprocess", "redis"] = "inprocess"
    codec: Literal["jpeg", "raw"] = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_len: int = Field(256, ge=1)  # live cameras drop the oldest beyond it
    max_age_s: float = Field(10.0, gt=0)  # and live frames waiting longer than this


class IngestConfig(_Section):
    watchdog_s: float = Field(5.0, gt=0)  # no frame for this long = reconnect
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)


class RedisConfig(_Section):
    url: Annotated[str, _rule(lambda v: _scheme(v) in ("redis", "rediss", "unix"))] = Field(
        "redis://127.0.0.1:6379/0", description="a redis://, rediss:// or unix:// URL")
    password_env: Optional[_Text] = None  # name of the environment variable holding the password
    stream_maxlen: int = Field(10000, ge=1)
    overlay_ttl_s: int = Field(3600, ge=1)
    # Newest overlays kept per camera: at about 15 KB each, 500 bound a camera to about 7 MB.
    overlays_per_camera: int = Field(500, ge=1)

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

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


class EventsConfig(_Section):
    open_after: int = Field(3, ge=1)  # flagged frames within `window` open an event
    window: int = Field(5, ge=1)
    close_after: int = Field(10, ge=1)  # consecutive normal frames close it


class OutputsConfig(_Section):
    dir: Optional[_Text] = None  # also write JSON Lines and overlays here (no Redis needed)
    overlays: bool = True


class MetricsConfig(_Section):
    address: _Text = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="an integer in 0..65535 (0 disables)")


class ConsoleConfig(_Section):
    enabled: bool = False  # `run` also serves the console (spade-monitor console serves it alone)
    # Off loopback the console asks for SPADE_CONSOLE_USER / SPADE_CONSOLE_PASSWORD.
    address: _Text = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535, description="an integer in 0..65535")


with warnings.catch_warnings():  # the `json` key shadows BaseModel.json(), deprecated and unused here
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class LoggingConfig(_Section):
        json: bool = False  # type: ignore[assignment]  # the config key; BaseModel.json() is unused
        level: Annotated[str, _rule(lambda v: v.upper() in _LOG_LEVELS)] = Field(
            "INFO", description="one of " + ", ".join(_LOG_LEVELS))


class MonitorConfig(_Section):
    cameras: dict[CameraId, CameraConfig]
    scenes: dict[SceneId, SceneConfig]
    engine: EngineConfig = Field(default_factory=EngineConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    _explicit: frozenset = frozenset()  # private (the underscore): not a key a file could set

    @property
    def explicit(self) -> frozenset:
        """Top-level sections present in the file: e.g. an in-process bus publishes to Redis only
        if `redis:` was written out, not because it has a default."""
        return self._explicit


def camera_ids(config: MonitorConfig, enabled_only: bool = True) -> list[str]:
    return [cid for cid, cam in config.cameras.items() if cam.enabled or not enabled_only]


# -- pydantic's errors as one line --------------------------------------------------------------

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


def _did_you_mean(word: Any, choices: typing.Iterable[Any]) -> str:
    hint = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {hint[0]}?)" if hint else ""


def _optional_arg(tp: Any) -> Any | None:
    """X for Optional[X] / X | None, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return args[0] if args[1] is type(None) else args[1]
    return None


def _bare(tp: Any) -> Any:
    """The type without Optional[...] and Annotated[...] around it."""
    tp = _optional_arg(tp) or tp
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _fields(tp: Any) -> dict[str, FieldInfo]:
    """A model's or dataclass's fields by name; {} for any other type."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp.model_fields
    if not dataclasses.is_dataclass(tp):
        return {}
    hints = typing.get_type_hints(tp, include_extras=True)
    return {f.name: FieldInfo.from_annotation(hints[f.name]) for f in dataclasses.fields(tp) if f.init}


def _describe(tp: Any) -> str:
    inner = _optional_arg(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    tp = _bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return "a list of " + plural.get(_bare(args[0]), "items")
    if origin is dict:
        return "a mapping of id -> settings"
    plain = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return plain.get(tp, "a mapping")  # else a section: a model or dataclass


def _expected(tp: Any, info: FieldInfo | None) -> str:
    if info is not None and info.description:
        return info.description
    bounds = {k: getattr(m, k) for m in getattr(info, "metadata", ()) for k in ("gt", "ge", "le")
              if getattr(m, k, None) is not None}
    limits = (f" in {bounds['ge']}..{bounds['le']}" if "le" in bounds
              else "".join(f" {op} {bounds[k]}" for k, op in (("gt", ">"), ("ge", ">=")) if k in bounds))
    inner = _optional_arg(tp)
    return f"{_describe(inner)}{limits} or null" if inner is not None else f"{_describe(tp)}{limits}"


def _locate(tp: Any, loc: tuple, path: str) -> tuple[str, Any, FieldInfo | None, int]:
    """Follow an error's loc through the schema: (dotted path, type there, its field, parts used).
    It stops at a key the schema lacks and inside a value reported whole (a [width, height] pair)."""
    info = None
    for used, part in enumerate(loc):
        base = _bare(tp)
        origin, fields = typing.get_origin(base), _fields(base)
        if part in fields:
            info = fields[part]
            tp, path = info.annotation, _join(path, part)
        elif origin is dict:  # a camera or scene id
            tp, info, path = typing.get_args(base)[1], None, _join(path, part)
        elif origin is list:
            tp, info, path = typing.get_args(base)[0], None, f"{path}[{part}]"
        else:
            return path, tp, info, used
    return path, tp, info, len(loc)


def _message(error: ErrorDetails, cls: type, data: Any, path: str) -> str:
    loc, kind = error["loc"], error["type"]
    if kind == "unsafe_id":  # loc: (..., the id, "[key]")
        where = _locate(cls, loc[:-2], path)[0]
        return f"{where}: invalid {error['ctx']['kind']} id {_got(error['input'])}; expected {NAME_RULE}"
    where, tp, info, used = _locate(cls, loc, path)
    if kind == "extra_forbidden":
        names = list(_fields(_bare(tp)))
        hint = _did_you_mean(loc[-1], names)
        return f"{_join(where, loc[-1])}: " + (f"unknown key{hint}" if hint else
                                                 f"unknown key; expected one of {', '.join(names)}")
    expected = _expected(tp, info)
    if kind == "missing" and used == len(loc):  # not a missing item of a pair: that is a bad pair
        return f"{where}: missing required key; expected {expected}"
    # The value as written (pydantic's input may be converted already), whole where it stopped early.
    value = data
    try:
        for part in loc[:used]:
            value = value[part]
    except (KeyError, IndexError, TypeError):
        value = error.get("input")
    hint = _did_you_mean(value, typing.get_args(_bare(tp))) if kind == "literal_error" else ""
    return f"{where or 'config'}: expected {expected}, got {_got(value)}{hint}"


def _build(cls: type, data: Any, path: str = "") -> Any:
    """Validate `data` against model (or dataclass) `cls`; any error becomes one ConfigError."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        errors = exc.errors()  # an unknown or unsafe key first: a misspelt key also shows up as missing
        first = next((e for e in errors if e["type"] in ("unsafe_id", "extra_forbidden")), errors[0])
        raise ConfigError(_message(first, cls, data, path)) from None


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
    config = _build(MonitorConfig, data)
    config._explicit = frozenset(data)
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
