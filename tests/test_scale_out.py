"""Several engines sharing cameras through one Redis (monitor/ownership.py): an engine killed
mid-stream and another added, and still every frame has one result, each camera is scored by
one engine at a time, and events are neither split nor duplicated."""
from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
import redis
from test_service import entries, procs, wait_for, write_config  # noqa: F401 - procs is a fixture

from engine.datasets.synthetic import make_scene
from monitor.ownership import ENGINES_KEY, OWNER_PREFIX

CAMERAS = [f"cam{i}" for i in range(6)]
CLOSE_AFTER = 4


def _owners(r: redis.Redis) -> Counter:
    return Counter(v.decode() for v in (r.get(OWNER_PREFIX + c) for c in CAMERAS) if v is not None)


def _results(r: redis.Redis, cam: str) -> list[dict]:
    return sorted(entries(r, f"results:{cam}"), key=lambda e: int(e["seq"]))


@pytest.mark.slow
def test_engines_share_cameras_and_hand_them_over_without_loss_or_split_events(tmp_path, scene, scene_bank,
                                                                             redis_server, procs):  # noqa: F811
    # The shared scene's training clips (so its bank fits) with longer test clips: 20 s at 10 fps.
    long = make_scene(tmp_path / "scene", seed=3, size=(120, 160), n_train_clips=3, train_len=40, n_test_clips=2,
                      test_len=200, write_videos=True)
    cameras = {c: {"source": str(long.test_videos[i % 2]), "scene": "plaza", "fps": None, "realtime": True}
               for i, c in enumerate(CAMERAS)}
    config = write_config(tmp_path / "monitor.yaml", cameras, scene_bank, redis_server.url,
                          engine={"lease_s": 3, "claim_idle_s": 5, "threads": 1, "max_batch": 4},
                          events={"open_after": 2, "window": 3, "close_after": CLOSE_AFTER})
    r = redis.Redis(port=redis_server.port)
    engines = [procs(["engine", "--config", str(config)], tmp_path / f"engine{i}.log") for i in range(3)]
    wait_for(lambda: r.zcard(ENGINES_KEY) == 3 and sorted(_owners(r).values()) == [2, 2, 2], 180,
             "three engines holding two cameras each", *engines)
    ingest = procs(["ingest", "--config", str(config)], tmp_path / "ingest.log")
    wait_for(lambda: all(len(entries(r, f"results:{c}")) >= 40 for c in CAMERAS), 60, "results from every camera",
             ingest, *engines)

    victim = next(e for e in engines if _owners(r)[f"engine-{_host(r)}-{e.proc.pid}"] > 0)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    time.sleep(4)  # its leases expire (lease_s 3) and the survivors take its cameras
    engines.append(procs(["engine", "--config", str(config)], tmp_path / "engine3.log"))
    live = [e for e in engines if e is not victim]
    wait_for(lambda: not ingest.alive(), 120, "the files to end", *live)
    assert ingest.proc.returncode == 0, ingest.tail()
    frames = {c: int(r.xlen(f"frames:{c}")) for c in CAMERAS}
    wait_for(lambda: all(len(entries(r, f"results:{c}")) == 200 for c in CAMERAS), 120,
             "a result for every frame", *live)
    for engine in live:  # one at a time: the last one ends what is still open
        code, _ = engine.stop(timeout=60)
        assert code == 0, engine.tail()
    assert sorted(_owners(r).values()) == [] and r.zcard(ENGINES_KEY) == 0  # leases given back

    for cam in CAMERAS:
        results = _results(r, cam)
        assert [int(e["seq"]) for e in results] == list(range(200)), f"{cam}: every frame exactly once ({frames})"
        owners = [e["engine"] for e in results]
        changes = sum(a != b for a, b in zip(owners, owners[1:]))
        assert changes <= 3, f"{cam}: scored by {changes + 1} runs of engines: {_runs(owners)}"
        events = entries(r, f"events:{cam}")
        starts = Counter(e["event_id"] for e in events if e["kind"] == "start")
        assert all(n == 1 for n in starts.values()), f"{cam}: an event started twice {starts}"
        ends = {e["event_id"]: int(e["end_seq"]) for e in events if e["kind"] == "end"}
        spans = sorted((int(e["start_seq"]), ends.get(e["event_id"])) for e in events if e["kind"] == "start")
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            # The hysteresis keeps close_after normal frames between two events of one tracker:
            # less would be one event split in two at a handover.
            assert e0 is not None and s1 - e0 > CLOSE_AFTER, f"{cam}: events {spans} overlap or were split"
    handed_over = [c for c in CAMERAS if len({e["engine"] for e in _results(r, c)}) > 1]
    assert handed_over, "no camera changed engine: the test did not exercise a handover"
    for engine in engines:
        assert "Traceback" not in engine.text(), engine.tail()


def _host(r: redis.Redis) -> str:
    """The host part of engine ids (engine-<host>-<pid>), from one registered engine."""
    name = r.zrange(ENGINES_KEY, 0, 0)[0].decode()
    return name[len("engine-"):].rsplit("-", 1)[0]


def _runs(owners: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for o in owners:
        if out and out[-1][0] == o:
            out[-1] = (o, out[-1][1] + 1)
        else:
            out.append((o, 1))
    return out
