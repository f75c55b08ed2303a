"""Finding and loading weight files without ever executing code from them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import WeightsError


def file_id(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256: banks record it to catch a swapped backbone."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise WeightsError(f"cannot read weights file {path}: {exc.__class__.__name__}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def torchvision_weights(weights_enum, explicit: str | Path | None) -> Path:
    """An explicit path, else the torch hub cache, else a download when online."""
    if explicit:
        return Path(explicit)
    url = weights_enum.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cache.is_file():
        return cache
    if os.environ.get("SPADE_OFFLINE") != "1":
        try:
            torch.hub.download_url_to_file(url, str(cache.with_suffix(".partial")), progress=False)
            cache.with_suffix(".partial").rename(cache)
            return cache
        except Exception:
            pass
    raise WeightsError(
        f"{os.path.basename(url)} is not in the torch hub cache ({cache.parent}) and could not be "
        f"downloaded: copy it there or pass --weights PATH (or use --backbone efficientnet_lite0)"
    )
