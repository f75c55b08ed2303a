"""Backbones behind one interface. Adding one means adding a module that calls `register`."""
from __future__ import annotations

from pathlib import Path

from . import efficientnet_lite, resnet  # noqa: F401  (modules register themselves)
from .base import LEVEL_STRIDES, Backbone, Features, available, factory


def build_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    return factory(name)(weights)


__all__ = ["Backbone", "Features", "LEVEL_STRIDES", "available", "build_backbone"]
