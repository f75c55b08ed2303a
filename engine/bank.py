"""A scene's reference bank: features of normal frames, stored fp16 in one safetensors file.

safetensors holds raw tensors plus a string header, so loading a bank can never run code
(unlike pickle-based torch.save files).
"""
from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BankError

FORMAT_VERSION = 1
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC
_META_KEY = "spade_bank"


@dataclass
class ReferenceBank:
    global_feats: torch.Tensor  # (N, D) fp16
    pyramid: dict[str, torch.Tensor]  # level -> (N, C, h, w) fp16
    groups: torch.Tensor  # (N,) int32: the clip or folder each frame came from, for calibration
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.global_feats.shape[0])

    # Typed views of the header, so a renamed key fails here and not somewhere downstream.
    @property
    def thresholds(self) -> dict:
        return self.meta.setdefault("thresholds", {})

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the frames are brought to before the backbone."""
        height, width = self.meta["preprocess"]["size"]
        return int(height), int(width)

    @property
    def scene(self) -> str | None:
        return self.meta.get("scene")

    @property
    def fps(self) -> float | None:
        """The frame rate the bank's frames were sampled at, where the sources had one."""
        return self.meta.get("fps")

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
        )

    def to(self, device: torch.device | str) -> "ReferenceBank":
        return ReferenceBank(
            global_feats=self.global_feats.to(device),
            pyramid={k: v.to(device) for k, v in self.pyramid.items()},
            groups=self.groups.to(device),
            meta=self.meta,
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
        try:
            data = path.read_bytes()
            meta = _parse_meta(data, path)
            tensors = load_tensors(data)
        except BankError:
            raise
        except Exception as exc:
            raise BankError(f"reference bank {path} is corrupt or truncated ({exc.__class__.__name__}): rebuild it") from None
        finally:
            data = None  # the tensors are copies: free the file's bytes now
        if _file_state(path) != before:
            raise BankError(f"reference bank {path} changed while it was being read: it is read again once the "
                            f"writer is done (replace bank files by rename to avoid this)")
        try:
            bank = cls(
                global_feats=tensors.pop("global"),
                groups=tensors.pop("groups"),
                pyramid={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("pyramid.")},
                meta=meta,
            )
        except KeyError:
            raise BankError(f"{path} is not a SPADE reference bank (tensors missing): rebuild it") from None
        bank._validate(path)
        return bank if str(device) == "cpu" else bank.to(device)

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
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise BankError(f"reference bank {path} has format version {version}, this build reads {FORMAT_VERSION}: rebuild it")
        n = len(self)
        if n == 0 or self.meta.get("frame_count") != n or self.groups.shape[0] != n:
            raise BankError(f"reference bank {path} is inconsistent (frame counts differ): rebuild it")
        for level in self.meta.get("levels", []):
            if level not in self.pyramid or self.pyramid[level].shape[0] != n:
                raise BankError(f"reference bank {path} lacks pyramid level {level}: rebuild it")

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


def _file_state(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a bank file; a missing file is one line saying how to make it."""
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise BankError(f"reference bank not found: {path} (build one with 'spade-monitor reference build')")
    return st.st_size, st.st_mtime_ns


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
