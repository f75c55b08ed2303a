"""The bench's plan, timers, machine facts and the video helpers every section uses."""
from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

TARGETS = {
    "pipeline_efficiency": 0.85,  # >=, 4 cameras at 1% escalation
    "best_mode_speedup": 3.0,  # >=
    "gate_fraction": 0.10,  # <=, at 100k reference frames
    "pixel_matching_speedup": 5.0,  # >=, K = 10
    "engine_overhead_ms_per_frame": 0.25,  # <=, null backbone, batch 32, 1% escalation, in-process bus
    "bus_frames_per_s": 2000.0,  # >=, Redis frame bus, 240x320 JPEG frames
}
LATENCY_LOAD = 0.7  # offered load in latency mode, as a fraction of the measured throughput
SCENE_FPS = 10.0
GOP = 8  # keyframe interval of the bench's clip


@dataclass
class Plan:
    quick: bool
    size: tuple[int, int]
    train_clips: int
    train_len: int
    test_len: int
    batch_sizes: list[int]
    bank_sizes: list[int]
    ks: list[int]
    cameras: list[int]
    frames_per_run: int  # end to end: about this many frames per run, split over the cameras...
    min_frames_per_camera: int  # ...but at least this many per camera (at most test_len)
    rates: list[float] = field(default_factory=lambda: [0.01, 0.10])
    min_time_s: float = 2.0  # per timed figure
    match_frames: int = 8
    overhead_frames: int = 3200  # engine overhead (null backbone): frames timed, over all cameras
    overhead_profile_frames: int = 1600  # ...and profiled, when over the target
    bus_frames: int = 8000  # Redis bus throughput: frames put, over all producers
    bus_producers: int = 2  # ingest-side producer processes

    @classmethod
    def make(cls, quick: bool, max_batch: int) -> "Plan":
        if quick:
            return cls(True, (120, 160), 3, 20, 120, sorted({1, 4, max_batch}), [1000, 10_000], [1, 10],
                       [1, 4], frames_per_run=120, min_frames_per_camera=30, min_time_s=0.3, match_frames=3,
                       overhead_frames=640, overhead_profile_frames=320, bus_frames=800)
        return cls(False, (240, 320), 4, 30, 480, sorted({1, 4, 8, 16, max_batch}), [1000, 10_000, 100_000],
                   [1, 10, 50], [1, 4, 16], frames_per_run=480, min_frames_per_camera=40, min_time_s=2.0,
                   match_frames=3, overhead_profile_frames=800)

    def frames_per_camera(self, cameras: int) -> int:
        return min(self.test_len, max(self.min_frames_per_camera, math.ceil(self.frames_per_run / cameras)))


# ---------------------------------------------------------------- helpers

def _timer(device) -> Callable[[], float]:
    import torch

    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def time_call(fn: Callable[[], object], device, min_time_s: float, min_reps: int = 3,
              warmup: int = 1) -> float:
    """Median seconds of one call of fn, after `warmup` calls; repeats for at least min_time_s."""
    now = _timer(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = now()
    while len(times) < min_reps or (now() - start < min_time_s and len(times) < 1000):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(1, _usable_cores() - 1)


def resolve_bench_device(device: str):
    import re

    import torch

    from engine.errors import ConfigError

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device or ""):
        raise ConfigError(f"--device: '{device}' is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def machine_info(device, threads: int) -> dict:
    import torch

    from engine.features import cpu_has_fast_bf16, resolve_precision

    cpu = getattr(torch, "cpu", None)
    probe = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_avx512_bf16": probe("_is_avx512_bf16_supported"),
        "cpu_amx": probe("_is_amx_tile_supported"),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "bf16_supported": (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()),
        "threads": threads,
        "best_precision": resolve_precision("auto", device),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def _mode_name(precision: str) -> str:
    return "fp32 eager, one pass per batch" if precision == "fp32" else f"{precision} + channels_last"


def decode_video(path: Path) -> list[np.ndarray]:
    """The frames an ingest worker hands on for this file (same reader, every frame)."""
    from ..ingest import CameraReader

    with CameraReader(str(path)) as reader:
        return [image for image, _ in reader]


def encode_video(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    """The bench's clip: a keyframe every GOP frames, so runs can start there."""
    from engine.datasets.video import write_video

    return write_video(frames, path, fps, gop=GOP)


def keyframes(path: Path) -> list[int]:
    """Indices of the key frames of a clip made by encode_video (packet i is frame i)."""
    import av

    with av.open(str(path)) as inp:
        stream = inp.streams.video[0]
        return [i for i, p in enumerate(p for p in inp.demux(stream) if p.dts is not None) if p.is_keyframe]


def cut_video(src: Path, dst: Path, start: int, count: int, rate: float | None = None) -> Path:
    """Frames [start, start + count) of `src` (made by encode_video; `start` a key frame), played
    at `rate` frames/s (default: its own). Packets are copied and their timestamps moved and
    stretched, so the decoded pixels are identical."""
    import av

    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        native = Fraction(stream.average_rate or stream.guessed_rate or SCENE_FPS)
        scale = native / Fraction(rate).limit_denominator(1000) if rate else Fraction(1)
        with av.open(str(dst), "w") as out:
            out_stream = out.add_stream_from_template(stream)
            first = None
            packets = (p for p in inp.demux(stream) if p.dts is not None)  # not the flush packet
            for i, packet in enumerate(packets):
                if i < start:
                    continue
                if i >= start + count:
                    break
                if first is None:
                    if not packet.is_keyframe:
                        raise RuntimeError(f"bench clip: frame {start} is not a key frame")
                    first = packet.pts
                packet.pts -= first
                packet.dts -= first
                packet.time_base = stream.time_base * scale
                packet.stream = out_stream
                out.mux(packet)
    return dst


def camera_starts(keys: list[int], length: int, cameras: int, per_camera: int) -> list[int]:
    """Where each camera's clip starts: key frames spread over the clip, so that cameras show
    different moments (copies in step would escalate the same frames at once, and frames with
    the same neighbours share work in anomaly_maps, which real cameras would not)."""
    usable = [k for k in keys if k + per_camera <= length] or [0]
    if cameras == 1:
        return [0]
    pick = np.linspace(0, len(usable) - 1, cameras).round().astype(int)
    return [usable[i] for i in pick]


