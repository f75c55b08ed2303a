"""Does an open console slow the engine? Frames/s of `spade-monitor run` (in-process bus, files
replayed as fast as the engine takes them) with the console off, and on with a live page's
event stream open, alternating, several runs each.

Usage: python scripts/console_load.py [--runs 3] [--cameras 2] [--frames 150]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

from small_scene import scene_and_bank  # noqa: E402 - next to this script


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch(url: str, stop: threading.Event) -> None:
    """A browser's live page: the grid, then its event stream, read until stopped."""
    while not stop.is_set():
        try:
            urllib.request.urlopen(url + "/", timeout=2).read()
            with urllib.request.urlopen(url + "/api/stream", timeout=5) as stream:
                while not stop.is_set():
                    stream.readline()
        except OSError:
            time.sleep(0.1)


def one_run(work: Path, scene, bank: Path, cameras: int, console: bool, n: int) -> float:
    out = work / f"out{n}"
    port = _port()
    config = work / f"run{n}.yaml"
    config.write_text(yaml.safe_dump({
        "cameras": {f"cam{i}": {"source": str(scene.test_videos[i % 2]), "scene": "plaza", "fps": None,
                                "realtime": False} for i in range(cameras)},
        "scenes": {"plaza": {"bank": str(bank)}},
        "engine": {"device": "cpu", "threads": 1, "max_batch": 16}, "outputs": {"dir": str(out)},
        "metrics": {"port": 0}, "console": {"enabled": console, "port": port}}))
    stop = threading.Event()
    if console:
        threading.Thread(target=_watch, args=(f"http://127.0.0.1:{port}", stop), daemon=True).start()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "monitor.cli", "-q", "run", "--config", str(config)], cwd=REPO, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop.set()
    stamps = [json.loads(line)["published_ts"] for line in (out / "results.jsonl").read_text().splitlines()]
    return (len(stamps) - 1) / (max(stamps) - min(stamps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--frames", type=int, default=150, help="frames per camera")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scene, bank = scene_and_bank(work, args.frames)
        rates: dict[bool, list[float]] = {False: [], True: []}
        runs = 0
        for _ in range(args.runs):
            for console in (False, True):
                runs += 1
                rates[console].append(one_run(work, scene, bank, args.cameras, console, runs))
    for console, values in rates.items():
        print(f"console {'on ' if console else 'off'}: " + ", ".join(f"{v:.1f}" for v in values)
              + f" frames/s (median {statistics.median(values):.1f}, spread {max(values) - min(values):.1f})")
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"on / off: {on / off:.3f}")


if __name__ == "__main__":
    main()
