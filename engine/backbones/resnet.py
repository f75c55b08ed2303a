"""torchvision ResNets: Wide-ResNet50-2 (the paper's backbone) and ResNet-18 (small and fast)."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from .base import Backbone, Features, register
from .weights import file_id, load_state_dict, torchvision_weights

_LEVEL_LAYER = {"s4": "layer1", "s8": "layer2", "s16": "layer3", "s32": "layer4"}


class TorchvisionResNet(Backbone):
    def __init__(self, name: str, ctor, weights_enum, weights: str | Path | None,
                 level_channels: dict[str, int], global_dim: int):
        super().__init__()
        self.name = name
        self.level_channels = level_channels
        self.global_dim = global_dim
        path = torchvision_weights(weights_enum, weights)
        net = ctor(weights=None)
        net.load_state_dict(load_state_dict(path))
        self.net = net.eval().requires_grad_(False)
        self.weights_id = file_id(path)

    def forward_features(self, x: torch.Tensor, levels: tuple[str, ...]) -> Features:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        pyramid: dict[str, torch.Tensor] = {}
        for level in ("s4", "s8", "s16", "s32"):
            x = getattr(net, _LEVEL_LAYER[level])(x)
            if level in levels:
                pyramid[level] = x
        return Features(global_=x.mean(dim=(2, 3)), pyramid=pyramid)


@register("wide_resnet50_2")
def build_wide_resnet50_2(weights: str | Path | None = None) -> Backbone:
    return TorchvisionResNet(
        "wide_resnet50_2", torchvision.models.wide_resnet50_2,
        torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1, weights,
        {"s4": 256, "s8": 512, "s16": 1024, "s32": 2048}, 2048,
    )


@register("resnet18")
def build_resnet18(weights: str | Path | None = None) -> Backbone:
    return TorchvisionResNet(
        "resnet18", torchvision.models.resnet18,
        torchvision.models.ResNet18_Weights.IMAGENET1K_V1, weights,
        {"s4": 64, "s8": 128, "s16": 256, "s32": 512}, 512,
    )
