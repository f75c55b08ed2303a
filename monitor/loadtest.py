"""Throughput and latency of the pipeline on this machine: N copies of one video as N cameras.

    python -m monitor.loadtest --video clip.mp4 --bank plaza.bank --cameras 4 [--realtime] [--redis-url URL]

Without --redis-url everything runs in one process (in-process bus); with it, ingest and engine
run as threads of this process over a Redis frame bus (JPEG on the wire, as deployed). Reports
frames/s end to end (first capture to last publication), latency capture_ts -> published_ts
(p50/p99) and the escalation and flag rates. Without --realtime, files are read as fast as the
engine takes them, so latency then mostly measures time spent waiting in the bus.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import parse_config


@dataclass
class LoadReport:
    cameras: int
    frames: int
    seconds: float
    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    escalation_rate: float
    flag_rate: float
    stage_ms_per_frame: dict | None = None  # engine stages, in-process runs only

    def line(self) -> str:
        text = (f"{self.cameras} camera(s): {self.frames} frames in {self.seconds:.1f}s = {self.fps:.1f} frames/s, "
                f"latency p50 {self.latency_p50_ms:.0f} ms p99 {self.latency_p99_ms:.0f} ms, "
                f"escalated {self.escalation_rate:.0%}, flagged {self.flag_rate:.0%}")
        if self.stage_ms_per_frame:
            text += "; ms/frame " + ", ".join(f"{k} {v:.1f}" for k, v in self.stage_ms_per_frame.items())
        return text


def measure(results: list[dict], cameras: int) -> LoadReport:
    if not results:
        raise RuntimeError("no results were published")
    capture = np.array([r["capture_ts"] for r in results])
    published = np.array([r["published_ts"] for r in results])
    latency = (published - capture) * 1000.0
    seconds = float(published.max() - capture.min())
    return LoadReport(cameras=cameras, frames=len(results), seconds=seconds,
                      fps=len(results) / seconds if seconds > 0 else 0.0,
                      latency_p50_ms=float(np.percentile(latency, 50)),
                      latency_p99_ms=float(np.percentile(latency, 99)),
                      escalation_rate=float(np.mean([r["escalated"] for r in results])),
                      flag_rate=float(np.mean([r["flagged"] for r in results])))


def run_load(video: str | Path, bank: str | Path, cameras: int = 1, *, fps: float | None = 5.0,
             realtime: bool = False, escalate: str = "flagged", device: str = "auto", max_batch: int = 16,
             redis_url: str | None = None, out_dir: str | Path | None = None) -> LoadReport:
    from .runner import run_engine, run_ingest, run_local

    with tempfile.TemporaryDirectory(prefix="spade-load-") as tmp:
        out = Path(out_dir or tmp)
        data = {
            "cameras": {f"cam{i}": {"source": str(Path(video).resolve()), "scene": "s", "fps": fps,
                                    "mode": "replay", "realtime": realtime} for i in range(cameras)},
            "scenes": {"s": {"bank": str(Path(bank).resolve())}},
            "engine": {"device": device, "max_batch": max_batch, "escalate": escalate},
            "bus": {"kind": "redis" if redis_url else "inprocess"},
            "outputs": {"dir": str(out), "overlays": True},
            "metrics": {"port": 0},
        }
        if redis_url:
            data["redis"] = {"url": redis_url}
        config = parse_config(data, base_dir=Path.cwd())
        if redis_url:
            stop_engine, drain_all, ready = threading.Event(), threading.Event(), threading.Event()
            engine = threading.Thread(target=run_engine, args=(config, stop_engine, drain_all, ready), daemon=True)
            engine.start()
            while not ready.wait(0.1):  # model loading is not part of the latency
                if not engine.is_alive():
                    raise RuntimeError("the engine failed to start (see the log)")
            run_ingest(config, list(config.cameras), threading.Event())  # returns when the files end
            drain_all.set()
            stop_engine.set()
            engine.join()
            stages = None
        else:
            local = run_local(config, threading.Event())
            frames = max(1, local.engine.stats.frames)
            stages = {k: 1000.0 * v / frames for k, v in local.engine.stats.stage_seconds.items()}
        results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
    report = measure(results, cameras)
    report.stage_ms_per_frame = stages
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitor.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--video", required=True, type=Path)
    p.add_argument("--bank", required=True, type=Path)
    p.add_argument("--cameras", type=int, nargs="+", default=[1])
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--realtime", action="store_true")
    p.add_argument("--escalate", default="flagged", choices=["flagged", "all", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--redis-url", help="use a Redis frame bus (loopback server) instead of the in-process one")
    args = p.parse_args(argv)
    from .runner import setup_logging

    setup_logging(False, "WARNING")
    for n in args.cameras:
        report = run_load(args.video, args.bank, n, fps=args.fps, realtime=args.realtime, escalate=args.escalate,
                          device=args.device, max_batch=args.max_batch, redis_url=args.redis_url)
        print(report.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
