"""Redis frame bus throughput: producer processes putting JPEG frames, one consumer taking batches.

A real redis-server on a free loopback port (no persistence, data in a temporary folder). Each
of Plan.bus_producers spawned producer processes owns BUS_CAMERAS_PER_PRODUCER cameras and puts
its share of Plan.bus_frames 240x320 frames on them with RedisFrameBus.put(live=True), the live
Lua put cameras use (it sheds, oldest first, frames no engine has been given beyond max_len or
max_age_s), as fast as it can, in turn over its cameras. The frames are pre-generated in memory
(the bench's clip, resized to 240x320); JPEG encoding is the put's own, at the bus's default
quality. One consumer (this process) takes batches of up to BUS_BATCH with get_batch and acks
each, as the engine does, until the producers are done and the bus is empty. frames/s = frames
the consumer got / (last ack - start signal).

Where the limit is: CPU seconds per frame during the run of the producers (time.process_time
in each), of redis-server (INFO cpu) and of the consumer, and, alone on an idle machine and one
frame at a time: JPEG encode and decode (monitor.frames), a live put less its encode, and a
get_batch + ack less the decodes.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np

from .common import TARGETS, Plan, _usable_cores

log = logging.getLogger(__name__)

BUS_SIZE = (240, 320)
BUS_CAMERAS_PER_PRODUCER = 2
BUS_BATCH = 32
BUS_IMAGES = 32  # distinct frames each producer cycles through
COMPONENT_FRAMES = 192  # single-process timings; < the bus's max_len, so nothing is shed
RUN_LIMIT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(workdir: Path):
    """A throwaway redis-server on a free loopback port; yields its URL, or None without one."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _server_cpu(url: str) -> float:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _producer(url: str, cameras: list[str], images: list[np.ndarray], count: int, max_len: int, max_age_s: float,
              quality: int, ready, go, results) -> None:
    """One ingest-side process: `count` live puts over its cameras, in turn, as fast as it can."""
    from monitor.frames import Frame, encode_frame
    from monitor.redis_bus import RedisFrameBus

    bus = RedisFrameBus(url, max_len=max_len, max_age_s=max_age_s, jpeg_quality=quality)
    run_id = uuid.uuid4().hex
    try:
        encode_frame(Frame(cameras[0], 0, 0.0, 0.0, images[0]), "jpeg", quality)  # codec's first-call costs
        ready.release()
        go.wait()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(count):
            seq, c = divmod(i, len(cameras))
            bus.put(Frame(camera=cameras[c], seq=seq, source_ts=seq / 10.0, capture_ts=time.time(),
                          image=images[i % len(images)], run_id=run_id), live=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stats = bus.stats.snapshot()
        results.put({"put": sum(stats.put.values()), "shed": sum(stats.dropped.values()), "seconds": seconds,
                     "cpu_s": cpu})
    except Exception as exc:  # reported to the bench, which raises
        results.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        bus.close()


def _images(frames: list[np.ndarray]) -> list[np.ndarray]:
    import cv2

    h, w = BUS_SIZE
    step = max(1, len(frames) // BUS_IMAGES)
    picked = frames[::step][:BUS_IMAGES]
    return [f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in picked]


def _components(url: str, images: list[np.ndarray], max_len: int, quality: int) -> dict:
    """One frame at a time, nothing else running: codec and Redis round trips, ms per frame."""
    from monitor.frames import Frame, decode_frame, encode_frame
    from monitor.redis_bus import RedisFrameBus

    frames = [Frame("components", i, i / 10.0, time.time(), images[i % len(images)], run_id="c")
              for i in range(COMPONENT_FRAMES)]
    encode, decode, sizes = [], [], []
    for f in frames:
        t0 = time.perf_counter()
        fields = encode_frame(f, "jpeg", quality)
        t1 = time.perf_counter()
        decode_frame(fields)
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        decode.append(t2 - t1)
        sizes.append(len(fields[b"data"]))
    with RedisFrameBus(url, max_len=max_len, jpeg_quality=quality, cameras=["components"]) as bus:
        bus.put(frames[0], live=True)  # script load, group creation
        bus.ack([m.id for m in bus.get_batch(1, 0.5)])
        puts = []
        for f in frames:
            t0 = time.perf_counter()
            bus.put(f, live=True)
            puts.append(time.perf_counter() - t0)
        gets = []  # per frame, of each full batch
        while True:
            t0 = time.perf_counter()
            msgs = bus.get_batch(BUS_BATCH, 0.0)
            if not msgs:
                break
            bus.ack([m.id for m in msgs])
            if len(msgs) == BUS_BATCH:
                gets.append((time.perf_counter() - t0) / len(msgs))
    # medians: this machine is shared, and a preempted call says nothing about the bus
    enc, dec = statistics.median(encode), statistics.median(decode)
    put_s, get_s = statistics.median(puts), statistics.median(gets) if gets else float("nan")
    return {"jpeg_encode_ms": 1000 * enc, "jpeg_decode_ms": 1000 * dec, "jpeg_bytes": float(np.mean(sizes)),
            "live_put_ms": 1000 * put_s, "live_put_redis_ms": 1000 * max(0.0, put_s - enc),
            "get_ack_ms": 1000 * get_s, "get_ack_redis_ms": 1000 * max(0.0, get_s - dec)}


def _consume(bus, results, procs: list, t0: float) -> tuple[int, int, list[dict], float]:
    """Take and ack batches until every producer reported and the bus is empty:
    (frames taken, of them corrupt, the producers' reports, when the last frame came)."""
    got, corrupt, done, t_last = 0, 0, [], t0
    while True:
        msgs = bus.get_batch(BUS_BATCH, 0.05)
        if msgs:
            corrupt += sum(m.frame is None for m in msgs)
            bus.ack([m.id for m in msgs])
            got += len(msgs)
            t_last = time.perf_counter()
            continue
        while not results.empty():
            done.append(results.get())
        if len(done) == len(procs) and bus.pending() == 0:
            return got, corrupt, done, t_last
        if time.perf_counter() - t0 > RUN_LIMIT_S or (not all(p.is_alive() for p in procs)
                                                       and len(done) < len(procs) and results.empty()):
            raise RuntimeError(f"Redis bus bench: producers stalled ({len(done)}/{len(procs)} done, {got} got)")


def bench_redis_bus(frames: list[np.ndarray], plan: Plan, tmp: Path) -> dict:
    """frames/s through RedisFrameBus (see the module docstring); frames_per_s is None without redis-server."""
    from ..config import BusConfig
    from ..redis_bus import RedisFrameBus

    defaults = BusConfig()
    max_len, max_age_s, quality = defaults.max_len, defaults.max_age_s, defaults.jpeg_quality
    images = _images(frames)
    n_prod = plan.bus_producers
    per_producer = plan.bus_frames // n_prod
    cameras = [[f"bus{p}-{c}" for c in range(BUS_CAMERAS_PER_PRODUCER)] for p in range(n_prod)]
    out: dict = {"frames_per_s": None, "target_frames_per_s": TARGETS["bus_frames_per_s"], "producers": n_prod,
                 "cameras": n_prod * BUS_CAMERAS_PER_PRODUCER, "put": "live", "batch": BUS_BATCH,
                 "frame_size": list(BUS_SIZE), "codec": "jpeg", "jpeg_quality": quality, "max_len": max_len}
    with redis_server(tmp / "redis") as url:
        if url is None:
            out["error"] = "redis-server not found"
            return out
        ctx = multiprocessing.get_context("spawn")
        ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_producer, args=(url, cams, images, per_producer, max_len, max_age_s, quality,
                                                     ready, go, results), daemon=True) for cams in cameras]
        for p in procs:
            p.start()
        bus = RedisFrameBus(url, max_len=max_len, jpeg_quality=quality, cameras=[c for cams in cameras for c in cams])
        try:
            deadline = time.monotonic() + 120
            for _ in procs:
                while not ready.acquire(timeout=0.5):
                    if not all(p.is_alive() for p in procs) or time.monotonic() > deadline:
                        raise RuntimeError("Redis bus bench: a producer process did not start")
            bus.get_batch(1, 0.0)  # consumer groups created before the clock starts
            server_cpu0, cpu0 = _server_cpu(url), time.process_time()
            t0 = time.perf_counter()
            go.set()
            got, corrupt, done, t_last = _consume(bus, results, procs, t0)
            consumer_cpu, server_cpu = time.process_time() - cpu0, _server_cpu(url) - server_cpu0
        finally:
            go.set()
            bus.close()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
        errors = [d["error"] for d in done if "error" in d]
        if errors:
            raise RuntimeError(f"Redis bus bench: a producer failed: {errors[0]}")
        seconds = t_last - t0
        put = sum(d["put"] for d in done)
        shed = sum(d["shed"] for d in done)
        frames_got = max(1, got)
        producer_cpu = sum(d["cpu_s"] for d in done)
        out.update({
            "frames_per_s": got / seconds if seconds > 0 else None,
            "frames": got, "corrupt": corrupt, "seconds": seconds, "frames_put": put, "frames_shed": shed,
            "put_frames_per_s": put / max(d["seconds"] for d in done),
            # producers per frame put, the rest per frame taken
            "cpu_ms_per_frame": {"producers": 1000 * producer_cpu / max(1, put), "redis_server": 1000 * server_cpu / frames_got,
                                 "consumer": 1000 * consumer_cpu / frames_got},
            "cores_busy": (producer_cpu + server_cpu + consumer_cpu) / seconds if seconds > 0 else None,
        })
        comp = out["components"] = _components(url, images, max_len, quality)
        cores = _usable_cores()
        total_cpu = sum(out["cpu_ms_per_frame"].values())
        # What this machine's cores could carry if the bench had them all: every frame is encoded
        # and decoded once, and costs what the run measured in all.
        out["usable_cores"] = cores
        out["jpeg_bound_frames_per_s"] = 1000 * cores / (comp["jpeg_encode_ms"] + comp["jpeg_decode_ms"])
        out["cpu_bound_frames_per_s"] = 1000 * cores / total_cpu if total_cpu > 0 else None
    return out
