"""Redis memory per camera at the default stream caps, measured on a real redis-server:
a full frame stream (bus.max_len JPEG frames), a full results stream (redis.stream_maxlen
results) and the overlays kept (redis.overlays_per_camera). Frames are a Ped2-like 240x360
scene from the synthetic generator, JPEG at bus.jpeg_quality.

Usage: python scripts/redis_sizing.py [--size 240x360]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import RedisServer  # noqa: E402 - the tests' real redis-server on a free port

from engine.datasets import iter_video_frames  # noqa: E402
from engine.datasets.synthetic import make_scene  # noqa: E402
from monitor.config import BusConfig, RedisConfig  # noqa: E402
from monitor.frames import Frame  # noqa: E402
from monitor.publish import RedisPublisher, encode_overlay  # noqa: E402
from monitor.redis_bus import RedisFrameBus  # noqa: E402
from monitor.results import FrameResult  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="240x360", help="frame HxW (default: Ped2's 240x360)")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    bus_cfg, red_cfg = BusConfig(), RedisConfig()
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp) / "scene", size=(h, w), n_train_clips=1, train_len=10, n_test_clips=1,
                           test_len=40)
        frames = list(iter_video_frames(scene.test_videos[0]))
        server = RedisServer(Path(tmp))
        server.start()
        try:
            client = redis.Redis(port=server.port)
            bus = RedisFrameBus(server.url, max_len=100000, codec=bus_cfg.codec, jpeg_quality=bus_cfg.jpeg_quality,
                                cameras=["cam"])
            for seq in range(bus_cfg.max_len):
                bus.put(Frame("cam", seq, seq / 5, time.time(), frames[seq % len(frames)], run_id="r" * 32), live=False)
            frame_mb = client.memory_usage("frames:cam") / 1e6
            pub = RedisPublisher(server.url, stream_maxlen=red_cfg.stream_maxlen)
            yy, xx = np.mgrid[:h, :w]
            blob = np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / (2 * (h / 10) ** 2)).astype(np.float32)
            overlay = encode_overlay(frames[0], blob, 0.5)  # a map as anomalies make them: one smooth region
            for seq in range(red_cfg.stream_maxlen):
                result = FrameResult(camera="cam", run_id="r" * 32, seq=seq, source_ts=seq / 5, capture_ts=time.time(),
                                     scene="plaza", image_score=1.5, tau=2.0, flagged=False, escalated=False)
                pub.publish_result(result, overlay if seq < red_cfg.overlays_per_camera else None)
            results_mb = client.memory_usage("results:cam") / 1e6
            overlay_mb = sum(client.memory_usage(k) for k in client.scan_iter("overlay:*")) / 1e6
            dedupe_mb = sum(client.memory_usage(k) for k in client.scan_iter("dedupe:*")) / 1e6
        finally:
            server.stop()
    print(f"{h}x{w} frames, JPEG q{bus_cfg.jpeg_quality}; per camera at the default caps:")
    print(f"  frames:<camera>, {bus_cfg.max_len} frames waiting (bus.max_len): {frame_mb:.1f} MB")
    print(f"  results:<camera>, {red_cfg.stream_maxlen} results (redis.stream_maxlen): {results_mb:.1f} MB")
    print(f"  overlays, {red_cfg.overlays_per_camera} kept (redis.overlays_per_camera): {overlay_mb:.1f} MB")
    print(f"  dedupe keys for {red_cfg.stream_maxlen} results (1 h TTL): {dedupe_mb:.1f} MB")
    print(f"  total: {frame_mb + results_mb + overlay_mb + dedupe_mb:.1f} MB")


if __name__ == "__main__":
    main()
