"""A scene's reference bank: features of normal frames, stored fp16 in one safetensors file.

safetensors holds raw tensors plus a string header, so loading a bank can never run code
(unlike pickle-based torch.save files).
"""
from __future__ import annotations

import calendar
import itertools
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .errors import BankError
from .preprocess import Preprocess

FORMAT_VERSION = 1
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC
_META_KEY = "spade_bank"


@dataclass(frozen=True)
class Calibration:
    """A bank's calibrated thresholds (engine.calibrate), stored under "thresholds" in its header."""

    tau: float  # a frame is flagged when its smoothed image score exceeds tau
    gate_tau: float  # a frame is escalated to pixel matching when its gate score exceeds gate_tau
    theta: float  # a pixel is anomalous when its map value exceeds theta
    gate_quantile: float | None = None
    image_quantile: float | None = None
    pixel_quantile: float | None = None
    image_score: str | None = None
    k_image: int | None = None
    k_pixel: int | None = None
    holdout_frames: int | None = None
    image_median: float | None = None  # the raw image score of a typical normal frame
    image_iqr: float | None = None

    @classmethod
    def from_dict(cls, stored: object, where: str = "bank") -> "Calibration":
        """The calibration in a header's "thresholds"; banks from before gate_tau gate at tau."""
        if not _calibrated(stored) or not isinstance(stored, dict):
            raise BankError(f"reference bank {where} is not calibrated: run 'spade-monitor reference calibrate {where}'")
        values = _calibration_fields(stored, where)
        if values.get("gate_tau") is None:
            values["gate_tau"] = values["tau"]
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


_CALIBRATION_KINDS = {"tau": float, "gate_tau": float, "theta": float, "gate_quantile": float,
                      "image_quantile": float, "pixel_quantile": float, "image_score": str, "k_image": int,
                      "k_pixel": int, "holdout_frames": int, "image_median": float, "image_iqr": float}
_REQUIRED = ("tau", "theta")


def _calibrated(stored: object) -> bool:
    """Whether a header's "thresholds" holds a calibration; `{}` is a bank never calibrated."""
    return isinstance(stored, dict) and all(k in stored for k in _REQUIRED)


def _calibration_fields(stored: dict, where: str) -> dict:
    """The known fields of a stored calibration, type-checked; unknown keys are ignored."""
    values: dict[str, float | int | str | None] = {}
    for name, kind in _CALIBRATION_KINDS.items():
        if name not in stored:
            continue
        value = stored[name]
        if value is None and name not in _REQUIRED:
            values[name] = None
        elif kind is float and _number(value):
            values[name] = float(value)
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            values[name] = value
        elif kind is str and isinstance(value, str):
            values[name] = value
        else:
            raise BankError(f"reference bank {where} has an invalid calibration ({name} = {value!r:.40}): rebuild it")
    return values


def _number(value: object) -> bool:
    """A finite int or float (JSON's true/false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class BankSummary:
    scene: str | None
    version: int
    frames: int


@dataclass
class ReferenceBank:
    global_feats: torch.Tensor  # (N, D) fp16
    pyramid: dict[str, torch.Tensor]  # level -> (N, C, h, w) fp16
    groups: torch.Tensor  # (N,) int32: the clip or folder each frame came from, for calibration
    meta: dict = field(default_factory=dict)
    # JPEG of each frame at model-input size (b"" where unknown), so a review can show the normal
    # frame an anomaly was matched against; None for banks built before they were kept.
    images: list[bytes] | None = None

    def __len__(self) -> int:
        return int(self.global_feats.shape[0])

    # Typed views of the header, so a renamed key fails here and not somewhere downstream.
    # ReferenceBank.load checks the header once (_check_header), so these do not re-check.
    @property
    def calibration(self) -> Calibration | None:
        """The calibrated thresholds, or None for a bank never calibrated."""
        stored = self.meta.get("thresholds")
        return Calibration.from_dict(stored, self.scene or "bank") if _calibrated(stored) else None

    @calibration.setter
    def calibration(self, value: Calibration | None) -> None:
        if value is None:
            self.meta.pop("thresholds", None)
        else:
            self.meta["thresholds"] = value.to_dict()

    def calibrated(self) -> Calibration:
        """The calibration; BankError with the one-line fix for a bank never calibrated."""
        return Calibration.from_dict(self.meta.get("thresholds"), self.scene or "bank")

    @property
    def preprocess(self) -> Preprocess:
        """The geometry from a frame to the backbone input the bank's features were made with."""
        p = self.meta["preprocess"]
        height, width = p["size"]
        return Preprocess(size=(int(height), int(width)), resize=p.get("resize"))

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the frames are brought to before the backbone."""
        return self.preprocess.size

    @property
    def scene(self) -> str | None:
        return self.meta.get("scene")

    @scene.setter
    def scene(self, value: str | None) -> None:
        self.meta["scene"] = value

    @property
    def fps(self) -> float | None:
        """The frame rate the bank's frames were sampled at, where the sources had one."""
        fps = self.meta.get("fps")
        return None if fps is None else float(fps)

    @fps.setter
    def fps(self, value: float | None) -> None:
        self.meta["fps"] = None if value is None else float(value)

    @property
    def created_ts(self) -> float | None:
        """Unix time the bank was written, or None for a bank without a readable date."""
        try:
            return float(calendar.timegm(time.strptime(self.meta["created"], CREATED_FORMAT)))
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def stored_config(self) -> dict:
        """The SpadeConfig fields the bank was built with."""
        return self.meta.get("config") or {}

    @property
    def backbone_key(self) -> tuple:
        """What a feature extractor must match to serve this bank: backbone, weights, levels."""
        return self.meta["backbone"], self.meta["weights_id"], tuple(self.meta["levels"])

    @property
    def version(self) -> int:
        """The bank's version (engine/versions.py); banks never changed are version 1."""
        return int(self.meta.get("version", 1))

    def as_version(self, number: int) -> None:
        """Stamp the bank as version `number`, written now."""
        self.meta["version"] = int(number)
        self.meta["created"] = time.strftime(CREATED_FORMAT, time.gmtime())

    def image(self, index: int) -> bytes | None:
        """The JPEG of reference frame `index`, or None where the bank has none."""
        if self.images is None or not 0 <= index < len(self.images):
            return None
        return self.images[index] or None

    def bytes_per_frame(self) -> int:
        tensors = [self.global_feats, self.groups, *self.pyramid.values()]
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total // max(1, len(self))

    def subset(self, index: torch.Tensor) -> "ReferenceBank":
        return ReferenceBank(
            global_feats=self.global_feats[index],
            pyramid={k: v[index] for k, v in self.pyramid.items()},
            groups=self.groups[index],
            meta=json.loads(json.dumps(self.meta)),
            images=None if self.images is None else [self.images[i] for i in torch.as_tensor(index).tolist()],
        )

    def to(self, device: torch.device | str) -> "ReferenceBank":
        return ReferenceBank(
            global_feats=self.global_feats.to(device),
            pyramid={k: v.to(device) for k, v in self.pyramid.items()},
            groups=self.groups.to(device),
            meta=self.meta,
            images=self.images,
        )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.meta["frame_count"] = len(self)
        self.meta.setdefault("format_version", FORMAT_VERSION)
        self.meta.setdefault("created", time.strftime(CREATED_FORMAT, time.gmtime()))
        tensors = {"global": self.global_feats.contiguous(), "groups": self.groups.contiguous()}
        tensors.update({f"pyramid.{k}": v.contiguous() for k, v in self.pyramid.items()})
        if self.images is not None:
            tensors.update(_pack(self.images))
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(self.meta)})
        tmp.replace(path)  # a crash mid-write never leaves a half bank under the real name
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ReferenceBank":
        """Read a bank whole into memory and check it.

        Never memory-mapped: a file overwritten in place while mapped kills the process with
        SIGBUS. A file that changes while it is read is refused, so a reload only ever swaps
        in a complete file.
        """
        from safetensors.torch import load as load_tensors

        path = Path(path)
        before = _file_state(path)
        data = b""
        try:
            data = path.read_bytes()
            meta = _parse_meta(data, path)
            tensors = load_tensors(data)
        except BankError:
            raise
        except Exception as exc:
            raise BankError(f"reference bank {path} is corrupt or truncated ({exc.__class__.__name__}): rebuild it") from None
        finally:
            data = b""  # the tensors are copies: free the file's bytes now
        if _file_state(path) != before:
            raise BankError(f"reference bank {path} changed while it was being read: it is read again once the "
                            f"writer is done (replace bank files by rename to avoid this)")
        try:
            bank = cls(
                global_feats=tensors.pop("global"),
                groups=tensors.pop("groups"),
                pyramid={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("pyramid.")},
                meta=meta,
                images=_unpack(tensors, path),
            )
        except KeyError:
            raise BankError(f"{path} is not a SPADE reference bank (tensors missing): rebuild it") from None
        bank._validate(path)
        return bank if str(device) == "cpu" else bank.to(device)

    @staticmethod
    def read_summary(path: str | Path) -> "BankSummary":
        """Scene, version and size from the bank's checked header alone, without its tensors."""
        path = Path(path)
        meta = ReferenceBank.read_meta(path)
        _check_header(meta, path)
        return BankSummary(meta.get("scene"), int(meta.get("version", 1)), int(meta.get("frame_count", 0)))

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        """The bank's JSON header alone, without reading its tensors."""
        path = Path(path)
        _file_state(path)
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                head = fh.read(min(size, _MAX_HEADER_BYTES))
        except OSError as exc:
            raise BankError(f"reference bank {path} cannot be read ({exc.strerror}): check its permissions") from None
        return _parse_meta(size.to_bytes(8, "little") + head, path)

    def _validate(self, path: Path) -> None:
        _check_header(self.meta, path)
        n = len(self)
        if n == 0 or self.meta.get("frame_count") != n or self.groups.shape[0] != n:
            raise BankError(f"reference bank {path} is inconsistent (frame counts differ): rebuild it")
        for level in self.meta["levels"]:
            if level not in self.pyramid or self.pyramid[level].shape[0] != n:
                raise BankError(f"reference bank {path} lacks pyramid level {level}: rebuild it")
        if self.images is not None and len(self.images) != n:
            raise BankError(f"reference bank {path} is inconsistent (image and frame counts differ): rebuild it")

    def check_compatible(self, model_meta: dict, path: str | Path = "bank") -> None:
        """Refuse a bank whose features came from another backbone, weights or input geometry."""
        defaults = {"temporal_diff": 0.0, "motion_weight": 0.0}  # banks from before these features had none
        for key in ("backbone", "weights_id", "preprocess", "levels", "normalize_global", "temporal_diff",
                    "motion_weight"):
            ours, theirs = model_meta.get(key, defaults.get(key)), self.meta.get(key, defaults.get(key))
            if ours != theirs:
                raise BankError(
                    f"reference bank {path} was built with {key}={theirs}, but the model uses "
                    f"{key}={ours}: rebuild the bank with this model, or configure the model to match"
                )


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def _pack(images: list[bytes]) -> dict[str, torch.Tensor]:
    """Variable-length JPEGs as one byte tensor and the offsets between them."""
    offsets = torch.tensor([0, *itertools.accumulate(len(b) for b in images)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(images)) or bytearray(1), dtype=torch.uint8)
    return {"images.data": data, "images.offsets": offsets}


def _unpack(tensors: dict, path: Path) -> list[bytes] | None:
    if "images.offsets" not in tensors:
        return None
    offsets = tensors.pop("images.offsets").tolist()
    data = tensors.pop("images.data").numpy().tobytes()
    if offsets != sorted(offsets) or offsets[-1] > len(data):
        raise BankError(f"reference bank {path} has corrupt reference images: rebuild it")
    return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _file_state(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a bank file; a missing file is one line saying how to make it."""
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise BankError(f"reference bank not found: {path} (build one with 'spade-monitor reference build')")
    return st.st_size, st.st_mtime_ns


def _check_header(meta: dict, path: Path) -> None:
    """Refuse a header the typed accessors could not read, in one line naming the file."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BankError(f"reference bank {path} has format version {version}, this build reads {FORMAT_VERSION}: rebuild it")

    def bad(what: str) -> BankError:
        return BankError(f"reference bank {path} has {what}: rebuild it")

    for key in ("backbone", "weights_id"):
        if not isinstance(meta.get(key), str):
            raise bad(f"no valid {key}")
    prep = meta.get("preprocess")
    size = prep.get("size") if isinstance(prep, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
        raise bad("no valid preprocess size (a [height, width] pair of positive integers)")
    assert isinstance(prep, dict)  # a valid size was found in it
    if prep.get("resize") is not None and not _positive_int(prep["resize"]):
        raise bad("an invalid preprocess resize (a positive integer or null)")
    levels = meta.get("levels")
    if not (isinstance(levels, list) and all(isinstance(lv, str) for lv in levels)):
        raise bad("invalid levels (a list of level names)")
    if meta.get("scene") is not None and not isinstance(meta["scene"], str):
        raise bad("an invalid scene (a name or null)")
    if meta.get("fps") is not None and not (_number(meta["fps"]) and meta["fps"] > 0):
        raise bad("an invalid fps (a number > 0 or null)")
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise bad("an invalid config (a mapping)")
    stored = meta.get("thresholds")
    if stored is not None and not isinstance(stored, dict):
        raise bad("invalid thresholds (a mapping)")
    if stored:
        _calibration_fields(stored, str(path))  # a partial one too: the bank is usable once calibrated


def _parse_meta(data: bytes, path: Path) -> dict:
    """The bank metadata in a safetensors header (8-byte length, then JSON)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size <= 0 or size > _MAX_HEADER_BYTES or len(data) < 8 + size:
        raise BankError(f"reference bank {path} is corrupt or truncated (no complete header): rebuild it")
    try:
        header = json.loads(data[8 : 8 + size])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError):
        meta = None
    if not isinstance(meta, dict):
        raise BankError(f"{path} is not a SPADE reference bank (metadata missing): rebuild it")
    return meta


def kcenter_greedy(features: torch.Tensor, budget: int, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center coreset: each pick is the point farthest from those picked.

    Covers rare normal appearances (a bus, a lighting change) that uniform sampling can skip.
    """
    n = features.shape[0]
    if budget >= n:
        return torch.arange(n)
    feats = features.float()
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    picked = [first]
    min_d = ((feats - feats[first]) ** 2).sum(1)
    for _ in range(budget - 1):
        nxt = int(torch.argmax(min_d))
        picked.append(nxt)
        min_d = torch.minimum(min_d, ((feats - feats[nxt]) ** 2).sum(1))
    return torch.tensor(sorted(picked))


def uniform_subsample(n: int, budget: int) -> torch.Tensor:
    if budget >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, budget).round().long().unique()
