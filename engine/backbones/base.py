"""The interface every backbone implements, and the registry that names them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Pyramid levels are named by their stride so that configs read the same for every backbone:
# the paper's layer1, layer2 and layer3 of a ResNet are s4, s8 and s16; s32 is layer4.
LEVEL_STRIDES = {"s4": 4, "s8": 8, "s16": 16, "s32": 32}


@dataclass
class Features:
    """What a backbone returns for a batch: the pooled global feature and the feature pyramid."""

    global_: torch.Tensor  # (B, D)
    pyramid: dict[str, torch.Tensor]  # level -> (B, C, h, w)


class Backbone(nn.Module):
    """A frozen ImageNet CNN. Subclasses fill `stages` and say where each level comes out."""

    name: str = ""
    # Input normalisation the weights were trained with (RGB, [0,1] scale).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    level_channels: dict[str, int] = {}
    global_dim: int = 0
    weights_id: str = ""  # short hash of the weights file; banks record it

    def forward_features(self, x: torch.Tensor, levels: tuple[str, ...]) -> Features:
        raise NotImplementedError


BackboneFactory = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneFactory] = {}


def register(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def deco(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def factory(name: str) -> BackboneFactory:
    from ..errors import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone '{name}': choose one of {', '.join(available())}")
    return _REGISTRY[name]
