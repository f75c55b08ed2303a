"""Frames/s of 1 and of 2 engine processes on one Redis, where the engine is the bottleneck.

Cameras are files replayed as fast as the bus takes them (realtime off), engines run one torch
thread each, and the rate is results over the span of their publication times, so model loading
is not counted. Usage: python scripts/engines_throughput.py [--cameras 4] [--frames 150]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parents[1]

from small_scene import scene_and_bank  # noqa: E402 - next to this script

sys.path.insert(0, str(REPO / "tests"))
from conftest import RedisServer  # noqa: E402 - the tests' real redis-server on a free port

from monitor.ownership import ENGINES_KEY, OWNER_PREFIX  # noqa: E402


def measure(workdir: Path, scene, bank: Path, cameras: int, engines: int) -> float:
    server = RedisServer(workdir)
    server.start()
    names = [f"cam{i}" for i in range(cameras)]
    config = workdir / f"engines{engines}.yaml"
    config.write_text(yaml.safe_dump({
        "cameras": {c: {"source": str(scene.test_videos[i % 2]), "scene": "plaza", "fps": None, "realtime": False}
                    for i, c in enumerate(names)},
        "scenes": {"plaza": {"bank": str(bank)}},
        "engine": {"device": "cpu", "threads": 1, "max_batch": 16, "lease_s": 3},
        "bus": {"kind": "redis", "max_len": 100000}, "redis": {"url": server.url}, "metrics": {"port": 0}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monitor.cli", "-q", "engine", "--config", str(config)]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(engines)]
    r = redis.Redis(port=server.port)
    try:
        while not (r.zcard(ENGINES_KEY) == engines and all(r.get(OWNER_PREFIX + c) for c in names)
                   and len({r.get(OWNER_PREFIX + c) for c in names}) == engines):
            time.sleep(0.2)
        subprocess.run([sys.executable, "-m", "monitor.cli", "-q", "ingest", "--config", str(config)], env=env,
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        total = scene.n_test_frames // 2 * cameras
        while sum(r.xlen(f"results:{c}") for c in names) < total:
            time.sleep(0.5)
        stamps = [float(f[b"published_ts"]) for c in names for _, f in r.xrange(f"results:{c}")]
        return (len(stamps) - 1) / (max(stamps) - min(stamps))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--frames", type=int, default=150, help="frames per camera")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scene, bank = scene_and_bank(work, args.frames)
        rates = {n: measure(work, scene, bank, args.cameras, n) for n in (1, 2)}
    print(f"{args.cameras} cameras x {args.frames} frames, 1 torch thread per engine, {os.cpu_count()} CPUs")
    print(f"1 engine: {rates[1]:.1f} frames/s; 2 engines: {rates[2]:.1f} frames/s; ratio {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
