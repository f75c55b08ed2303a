"""The bench's end-to-end runs: file cameras through the whole pipeline, in a fresh engine process."""
from __future__ import annotations

import json
import logging
import resource
import statistics
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from .common import LATENCY_LOAD, cut_video, decode_video, resolve_bench_device, time_call

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- end to end (engine process)

def _run_config(videos: list[Path], bank: Path, realtime: bool, out: Path, device: str,
                threads: int, max_batch: int):
    from ..config import parse_config

    return parse_config({
        "cameras": {f"cam{i:02d}": {"source": str(video), "scene": "bench", "fps": None, "mode": "replay",
                                    "realtime": realtime} for i, video in enumerate(videos)},
        "scenes": {"bench": {"bank": str(bank)}},
        "engine": {"device": device, "max_batch": max_batch, "escalate": "flagged", "threads": threads},
        "bus": {"kind": "inprocess"},
        "outputs": {"dir": str(out), "overlays": True},
        "metrics": {"port": 0},
    }, base_dir=out.parent)


def _one_run(videos: list[Path], bank: Path, realtime: bool, out: Path, device: str, threads: int,
             max_batch: int, max_wait_ms: float, expected: int) -> dict:
    from ..runner import run_local

    cameras = len(videos)
    out.mkdir(parents=True)
    config = _run_config(videos, bank, realtime, out, device, threads, max_batch)
    per_run_peak = _reset_peak_rss()
    local = run_local(config, threading.Event())
    peak_rss = _status_mib("VmHWM") if per_run_peak else None
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
    if not results:
        raise RuntimeError(f"no results were published ({cameras} camera(s))")
    capture = np.array([r["capture_ts"] for r in results])
    published = np.array([r["published_ts"] for r in results])
    latency = (published - capture) * 1000.0
    seconds = float(published.max() - capture.min())
    later = latency[capture >= np.median(capture)]  # the second half of the run, by capture time
    stats = local.engine.stats
    frames = max(1, stats.frames)
    stage = {k: 1000.0 * v / frames for k, v in stats.stage_seconds.items()}
    batch_ms = 1000.0 * stats.stage_seconds.get("batch", 0.0) / max(1, stats.batches)
    run = {
        "cameras": cameras, "realtime": realtime, "frames": len(results), "frames_expected": expected,
        "seconds": seconds, "frames_per_s": len(results) / seconds if seconds > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(latency, 50)), "latency_p99_ms": float(np.percentile(latency, 99)),
        "latency_max_ms": float(latency.max()),
        "latency_p99_second_half_ms": float(np.percentile(later, 99)),
        "peak_rss_mib": peak_rss,
        "escalated": float(np.mean([r["escalated"] for r in results])),
        "flagged": float(np.mean([r["flagged"] for r in results])),
        "batches": stats.batches, "mean_batch_frames": stats.frames / max(1, stats.batches),
        "mean_batch_ms": batch_ms, "stage_ms_per_frame": stage,
    }
    if realtime:
        bound = max_wait_ms + 3.0 * batch_ms
        run["latency_bound_ms"] = bound
        run["latency_bound_holds"] = bool(run["latency_p99_ms"] <= bound)
    return run


def _status_mib(field_name: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart VmHWM (peak RSS) from the current RSS (Linux >= 4.0), so each run gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def engine_process(job: dict) -> dict:
    """The end-to-end runs, in a process of their own so that its peak memory is the engine's."""
    import torch

    from engine.bank import ReferenceBank
    from engine.spade import Spade

    from ..runner import setup_logging

    setup_logging(False, "WARNING")
    baseline_rss = _status_mib("VmRSS")  # interpreter, torch and the service's modules, before any work
    torch.set_num_threads(job["threads"])
    device = resolve_bench_device(job["device"])
    video, tmp = Path(job["video"]), Path(job["tmp"])
    max_batch, max_wait_ms = job["max_batch"], job["max_wait_ms"]

    # Backbone-only, best mode, engine batch, same process and threads: measured just before and
    # just after each throughput run (the machine's speed drifts), their mean is the run's yardstick.
    bank = ReferenceBank.load(job["bank"])
    frames = decode_video(video)[:max_batch]
    model = Spade.for_bank(bank, device=str(device), batch_size=max_batch)
    batch = model.bank_preprocess(bank).batch([frames[i % len(frames)] for i in range(max_batch)])
    budget = max(0.5, job["min_time_s"] / 2)

    def backbone_fps() -> float:
        return max_batch / time_call(lambda: model.extractor(batch), device, budget, warmup=1)

    backbone_fps()  # first calls create the kernels

    runs, yardsticks = [], []
    for n, per_camera, starts, plans in job["runs"]:
        clips = [cut_video(video, tmp / f"c{n}_{i:02d}.mp4", start, per_camera) for i, start in enumerate(starts)]
        for rate, tau, expected in plans:
            tag = f"c{n}_r{round(rate * 1000)}"
            bank.calibration = replace(bank.calibrated(), gate_tau=tau)
            bank_path = bank.save(tmp / f"{tag}.bank")
            before = backbone_fps()
            thr = _one_run(clips, bank_path, False, tmp / f"{tag}_thr", str(device), job["threads"],
                           max_batch, max_wait_ms, n * per_camera)
            after = backbone_fps()
            yardstick = (before + after) / 2
            yardsticks.append(yardstick)
            thr.update(rate_target=rate, video_escalation=expected, mode="throughput",
                       backbone_fps_before=before, backbone_fps_after=after,
                       efficiency=thr["frames_per_s"] / yardstick)
            runs.append(thr)
            offered = LATENCY_LOAD * thr["frames_per_s"] / n
            paced = [cut_video(video, tmp / f"{tag}_paced_{i:02d}.mp4", start, per_camera, rate=offered)
                     for i, start in enumerate(starts)]
            lat = _one_run(paced, bank_path, True, tmp / f"{tag}_lat", str(device), job["threads"],
                           max_batch, max_wait_ms, n * per_camera)
            lat.update(rate_target=rate, video_escalation=expected, mode="latency",
                       offered_fps_per_camera=offered, offered_fps=offered * n)
            runs.append(lat)
            bank_path.unlink()
            for path in paced:
                path.unlink()
    memory = {"engine_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "engine_baseline_rss_mib": baseline_rss}  # this process runs one camera count
    if device.type == "cuda":
        memory["engine_cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return {"backbone_fps": statistics.mean(yardsticks), "runs": runs, "memory": memory}


def _in_engine_process(job: dict) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(engine_process, job).result()


