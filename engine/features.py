"""Running a backbone on a device in the fastest mode that keeps results within tolerance."""
from __future__ import annotations

import contextlib

import torch

from .backbones import Backbone, Features


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off only with native bf16 dot products (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, p, lambda: False)() for p in probes)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device '{device}' requested but CUDA is not available: use --device cpu")
    return torch.device(device)


# On a CPU, a backbone pass over more pixels than this is slower per frame: the activations
# leave the caches (EfficientNet-Lite0 bf16, 1 thread, 240x320: 60 frames/s in passes of 4
# frames, 30-38 in one pass of 16). Larger batches are split into passes of this size.
CPU_PIXELS_PER_PASS = 4 * 240 * 320


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' picks fp16 on CUDA, bf16 on a CPU with native bf16, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


class FeatureExtractor:
    """Normalises uint8 batches on the device and returns fp32 features.

    Reduced precision is used for the convolutions only; outputs are cast back to fp32 so that
    distances downstream are computed in full precision.
    """

    def __init__(self, backbone: Backbone, levels: tuple[str, ...], device: str = "auto",
                 precision: str = "auto", split_passes: bool = True):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.levels = tuple(levels)
        self.fast = self.precision != "fp32"
        self.split_passes = split_passes  # False: one pass per batch (the benchmark's plain baseline)
        self.backbone = backbone.to(self.device)
        if self.fast:
            # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        mean = torch.tensor(backbone.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(backbone.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._mean, self._std = mean, std

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, batch_uint8: torch.Tensor) -> Features:
        n, _, h, w = batch_uint8.shape
        step = n
        if self.split_passes and self.device.type == "cpu":
            step = max(1, min(n, CPU_PIXELS_PER_PASS // (h * w)))
        if step >= n:
            return self._forward(batch_uint8)
        parts = [self._forward(batch_uint8[i : i + step]) for i in range(0, n, step)]
        return Features(global_=torch.cat([f.global_ for f in parts]),
                        pyramid={k: torch.cat([f.pyramid[k] for f in parts]) for k in parts[0].pyramid})

    def _forward(self, batch_uint8: torch.Tensor) -> Features:
        x = batch_uint8.to(self.device, non_blocking=True).float()
        x = (x - self._mean) / self._std
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            feats = self.backbone.forward_features(x, self.levels)
        return Features(
            global_=feats.global_.float(),
            pyramid={k: v.float().contiguous() for k, v in feats.pyramid.items()},
        )
