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
# leave the caches (README, Performance). Larger batches are split into passes of this size.
CPU_PIXELS_PER_PASS = 4 * 240 * 320


def cuda_batch_bucket(n: int) -> int:
    """The batch size a CUDA pass of n frames is padded to: the next power of two.

    cuDNN plans its convolutions once per input shape, which takes hundreds of times longer than
    a pass (README, On a GPU). A service's batches
    come in every size up to its maximum, so they are padded to a few sizes that are planned
    at start-up (warm_up); padding wastes at most half a pass.
    """
    return 1 << max(0, n - 1).bit_length()


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
        self.split_passes = split_passes  # False: one pass per batch as given (the benchmark's plain baseline)
        self.backbone = backbone.to(self.device)
        if self.fast:
            # channels_last lets oneDNN / cuDNN pick their fastest convolution kernels.
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        mean = torch.tensor(backbone.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(backbone.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._mean, self._std = mean, std

    def _autocast(self):
        if self.precision == "fp32":
            if self.device.type == "cuda":  # cuDNN rounds fp32 convolutions to TF32 by default
                b = torch.backends.cudnn
                return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic,
                               allow_tf32=False)
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, batch_uint8: torch.Tensor) -> Features:
        n, _, h, w = batch_uint8.shape
        if self.device.type == "cuda" and self.split_passes:
            padded = cuda_batch_bucket(n)
            if padded == n:
                return self._forward(batch_uint8)
            filler = batch_uint8.new_zeros((padded - n, *batch_uint8.shape[1:]))
            feats = self._forward(torch.cat([batch_uint8, filler]))
            return Features(global_=feats.global_[:n], pyramid={k: v[:n] for k, v in feats.pyramid.items()})
        step = n
        if self.split_passes and self.device.type == "cpu":
            step = max(1, min(n, CPU_PIXELS_PER_PASS // (h * w)))
        if step >= n:
            return self._forward(batch_uint8)
        parts = [self._forward(batch_uint8[i : i + step]) for i in range(0, n, step)]
        return Features(global_=torch.cat([f.global_ for f in parts]),
                        pyramid={k: torch.cat([f.pyramid[k] for f in parts]) for k in parts[0].pyramid})

    def warm_up(self, max_batch: int, size: tuple[int, int]) -> None:
        """One pass per batch shape this extractor will run for batches of up to max_batch frames
        of this size, so that no frame waits for kernels to be planned or created."""
        h, w = size
        if self.device.type == "cuda" and self.split_passes:
            sizes = sorted({cuda_batch_bucket(b) for b in range(1, max_batch + 1)})
        else:
            sizes = [max_batch]
        for b in sizes:
            self(torch.zeros(b, 3, h, w, dtype=torch.uint8))  # on a CPU: the split passes' shapes

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
