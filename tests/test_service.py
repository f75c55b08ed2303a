"""The monitor as operators run it: `spade-monitor run / ingest / engine` as real processes, with a real
redis-server and a real RTSP camera (tests/rtsp_server.py), including crashes and outages."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import redis
import yaml
from conftest import free_port

from engine.datasets import iter_video_frames
from monitor.cli import main
from monitor.frames import Frame, encode_frame
from monitor.ingest import CameraReader

REPO = Path(__file__).resolve().parents[1]
FPS = 5
FAST_INGEST = {"watchdog_s": 1, "backoff_initial_s": 0.2, "backoff_max_s": 1, "connect_timeout_s": 2,
               "read_timeout_s": 1}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread in this process too (see Proc), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- helpers

def write_config(path: Path, cameras: dict, bank: Path, redis_url: str | None = None, **sections) -> Path:
    data = {
        "cameras": cameras,
        "scenes": {"plaza": {"bank": str(bank)}},
        "engine": {"device": "cpu", "max_batch": 8, **sections.pop("engine", {})},
        "bus": {"kind": "redis" if redis_url else "inprocess"},
        "ingest": {**FAST_INGEST, **sections.pop("ingest", {})},
        "metrics": {"port": 0},
        **sections,
    }
    if redis_url:
        data["redis"] = {"url": redis_url}
    path.write_text(yaml.safe_dump(data))
    return path


def camera(source, **kw) -> dict:
    return {"source": str(source), "scene": "plaza", "fps": FPS, **kw}


class Proc:
    """`python -m monitor.cli ARGS` with stdout+stderr in a file (a pipe could fill up and block it)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._out = log.open("w")
        # One torch thread: on a CPU shared with other jobs, a 2-thread pool runs several times slower.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", *args], cwd=REPO, env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, float]:
        # Typically 2-4 s; the ceiling allows for a CPU shared with other jobs.
        """Signal it and wait: (exit code, seconds it took)."""
        start = time.monotonic()
        if self.alive():
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not exit within {timeout}s of {signal.Signals(sig).name}:\n{self.tail()}")
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.alive():  # a failed test: stop it and its children gracefully, then hard
            try:
                self.stop(timeout=15)
            except AssertionError:
                pass
        self._out.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(args: list[str], log: Path) -> Proc:
        proc = Proc(args, log)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, *watched: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in watched:
            if not proc.alive():
                raise AssertionError(f"process exited ({proc.proc.returncode}) while waiting for {what}:\n"
                                     f"{proc.tail()}")
        time.sleep(0.1)
    logs = "\n---\n".join(p.tail() for p in watched)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def entries(r: redis.Redis, key: str) -> list[dict[str, str]]:
    try:
        return [{k.decode(): v.decode(errors="replace") for k, v in fields.items()}
                for _, fields in r.xrange(key)]
    except redis.ConnectionError:
        return []


def seqs(r: redis.Redis, cam: str) -> list[int]:
    return [int(e["seq"]) for e in entries(r, f"results:{cam}")]


def statuses(r: redis.Redis, cam: str) -> list[str]:
    return [e["status"] for e in entries(r, f"status:{cam}")]


def sampled_frames(video: Path, fps: float = FPS) -> int:
    with CameraReader(video, fps=fps, realtime=False) as reader:
        return sum(1 for _ in reader)


def pending(r: redis.Redis, cam: str) -> int:
    try:
        return int(r.xpending(f"frames:{cam}", "engine")["pending"])
    except redis.ResponseError:  # no group yet
        return 0


def consumer_pending(r: redis.Redis, cam: str, name_suffix: str) -> int:
    """Frames delivered to, and not acked by, the consumers whose name ends with name_suffix."""
    return sum(int(c["pending"]) for c in r.xinfo_consumers(f"frames:{cam}", "engine")
               if c["name"].decode().endswith(name_suffix))


def clean_log(text: str) -> None:
    assert "Traceback" not in text, text


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_run_with_redis_rtsp_and_file_cameras(scene, scene_bank, redis_server, rtsp_server_factory, tmp_path,
                                              procs):
    rtsp = rtsp_server_factory(scene.test_videos[1])
    lobby_video = scene.test_videos[0]
    expected = sampled_frames(lobby_video)
    config = write_config(tmp_path / "monitor.yaml", {
        "gate": camera(rtsp.url, fps=2),  # light: the CPU engine is shared with the lobby burst
        "lobby": camera(lobby_video, mode="replay", realtime=False),
    }, scene_bank, redis_server.url, outputs={"dir": str(tmp_path / "out")})
    r = redis.Redis(port=redis_server.port)
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")

    wait_for(lambda: len(seqs(r, "lobby")) >= expected and len(seqs(r, "gate")) >= 3, 120,
             "results of both cameras", mon)
    wait_for(lambda: any(e["kind"] == "start" for e in entries(r, "events:lobby")), 20, "an event on lobby", mon)
    assert sorted(seqs(r, "lobby")) == list(range(expected))  # one result per sampled frame, none twice
    assert "online" in statuses(r, "gate")
    assert statuses(r, "lobby")[-1] == "finished"
    result = entries(r, "results:lobby")[0]
    assert result["scene"] == "plaza" and float(result["published_ts"]) >= float(result["capture_ts"])

    code, took = mon.stop(signal.SIGTERM)
    log = mon.text()
    assert code == 0, log
    clean_log(log)
    assert pending(r, "gate") == 0 and pending(r, "lobby") == 0  # everything delivered was acked
    assert "monitor stopped" in log
    out = tmp_path / "out"
    assert (out / "results.jsonl").is_file() and list(out.glob("timeline_*.png"))
    assert {"gate", "lobby"} <= {json.loads(line)["camera"] for line in (out / "status.jsonl").read_text().splitlines()}


@pytest.mark.slow
def test_engine_crash_loses_no_frame(scene, scene_bank, redis_server, tmp_path, procs):
    video = scene.test_videos[0]
    expected = sampled_frames(video)
    config = write_config(tmp_path / "monitor.yaml", {"door": camera(video, realtime=True)}, scene_bank,
                          redis_server.url, engine={"claim_idle_s": 1, "escalate": "none"})
    r = redis.Redis(port=redis_server.port)
    engine = procs(["engine", "--config", str(config)], tmp_path / "engine1.log")
    wait_for(lambda: "engine: cameras" in engine.text(), 90, "the engine to load", engine)
    ingest = procs(["ingest", "--config", str(config), "--camera", "door"], tmp_path / "ingest.log")

    # Kill -9 while the engine holds frames it has not acknowledged (frozen first, so the check holds).
    deadline = time.monotonic() + 60
    while True:
        wait_for(lambda: len(seqs(r, "door")) >= 2 and pending(r, "door") > 0, 60, "a batch in flight", engine)
        os.kill(engine.proc.pid, signal.SIGSTOP)
        if pending(r, "door") > 0 or time.monotonic() > deadline:
            break
        os.kill(engine.proc.pid, signal.SIGCONT)
    engine.kill()
    held = pending(r, "door")
    done_before = len(seqs(r, "door"))
    assert held > 0 and done_before < expected

    engine2 = procs(["engine", "--config", str(config)], tmp_path / "engine2.log")
    wait_for(lambda: len(seqs(r, "door")) >= expected, 120, "every frame's result", engine2)
    wait_for(lambda: not ingest.alive(), 30, "the ingest to finish")  # the file ended
    assert ingest.proc.returncode == 0, ingest.text()
    code, _ = engine2.stop()
    assert code == 0, engine2.text()

    got = seqs(r, "door")
    assert sorted(got) == list(range(expected)), "every sampled frame exactly once"
    assert "claimed" in engine2.text()
    assert pending(r, "door") == 0 and r.xlen("frames:door") == 0
    for proc in (engine2, ingest):
        clean_log(proc.text())


@pytest.mark.slow
def test_camera_loss_and_engine_crash_within_run(scene, scene_bank, redis_server, rtsp_server_factory, tmp_path,
                                                procs):
    rtsp = rtsp_server_factory(scene.test_videos[1])
    config = write_config(tmp_path / "monitor.yaml", {"gate": camera(rtsp.url)}, scene_bank, redis_server.url,
                          engine={"escalate": "none", "claim_idle_s": 2})
    r = redis.Redis(port=redis_server.port)
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")
    wait_for(lambda: len(seqs(r, "gate")) >= 3 and "online" in statuses(r, "gate"), 90, "gate online", mon)

    rtsp.stop()
    wait_for(lambda: statuses(r, "gate")[-1] in ("offline", "reconnecting"), 10, "the loss to be reported", mon)
    time.sleep(1.5)  # longer than ingest.watchdog_s
    before = max(seqs(r, "gate"))
    rtsp.start()
    wait_for(lambda: statuses(r, "gate")[-1] == "online" and max(seqs(r, "gate")) >= before + 3, 40,
             "results after the camera came back", mon)
    history = statuses(r, "gate")
    assert history[0] == "online" and history.count("online") >= 2

    # A crashed engine process is restarted by the supervisor; what it held is claimed, not lost.
    engine_pid = int(re.search(r"engine: cameras .* \(pid (\d+)\)", mon.text()).group(1))
    os.kill(engine_pid, signal.SIGKILL)
    wait_for(lambda: "engine exited unexpectedly (killed by SIGKILL); restarting" in mon.text(), 10,
             "the restart", mon)
    count = len(seqs(r, "gate"))
    wait_for(lambda: len(seqs(r, "gate")) >= count + 3, 60, "gate results from the new engine", mon)
    wait_for(lambda: consumer_pending(r, "gate", f"-{engine_pid}") == 0, 20, "the dead engine's frames claimed", mon)
    code, _ = mon.stop()
    assert code == 0
    clean_log(mon.text())


@pytest.mark.slow
def test_frames_pending_on_a_dead_engine_are_drained_when_the_cameras_finish(scene, scene_bank, redis_server,
                                                                            tmp_path, procs):
    """The last file ends while the engine is dead, holding a batch it read but never acked: the
    supervisor starts an engine to drain, which claims that batch too. Nothing is left behind."""
    video = scene.test_videos[0]
    config = write_config(tmp_path / "monitor.yaml", {"a": camera(video)}, scene_bank, redis_server.url,
                          engine={"escalate": "none", "claim_idle_s": 600})  # the timer cannot save them
    r = redis.Redis(port=redis_server.port)
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")
    wait_for(lambda: len(seqs(r, "a")) >= 3, 90, "first results", mon)
    engine_pid = int(re.search(r"engine: cameras .* \(pid (\d+)\)", mon.text()).group(1))
    os.kill(engine_pid, signal.SIGSTOP)  # it keeps what it read pending and reads nothing more
    wait_for(lambda: "every camera has finished" in mon.text(), 60, "the camera to finish", mon)
    assert consumer_pending(r, "a", f"-{engine_pid}") > 0
    os.kill(engine_pid, signal.SIGKILL)
    code = mon.proc.wait(120)
    assert code == 0, mon.tail()
    assert sorted(seqs(r, "a")) == list(range(sampled_frames(video)))  # every frame, once
    assert pending(r, "a") == 0


@pytest.mark.slow
def test_redis_restart_mid_run(scene, scene_bank, redis_server, tmp_path, procs):
    # A looping file paced like a live camera: frames keep coming during the outage.
    cams = {"loop": camera(scene.test_videos[0], mode="live", realtime=True, loop=True)}
    config = write_config(tmp_path / "monitor.yaml", cams, scene_bank, redis_server.url,
                          engine={"escalate": "none"})
    r = redis.Redis(port=redis_server.port)
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")
    wait_for(lambda: len(seqs(r, "loop")) >= 3, 90, "first results", mon)

    redis_server.stop()
    time.sleep(2)
    redis_server.start()  # empty: this server keeps nothing on disk
    wait_for(lambda: len(seqs(r, "loop")) >= 5, 40, "results after the restart", mon)
    wait_for(lambda: "dropped (redis_down)" in mon.text(), 15, "the lost frames to be logged", mon)
    assert mon.alive()
    code, _ = mon.stop()
    log = mon.text()
    assert code == 0, log
    assert "unreachable" in log and "reachable again" in log
    assert "restarting" not in log  # reconnected, nothing crashed
    clean_log(log)


# ---------------------------------------------------------------- one process, no Redis

def _results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def test_inprocess_run_finishes_when_the_files_end(scene, scene_bank, tmp_path, capsys):
    out = tmp_path / "out"
    videos = {"a": scene.test_videos[0], "b": scene.train_videos[0]}
    config = write_config(tmp_path / "local.yaml", {cid: camera(v, realtime=False) for cid, v in videos.items()},
                          scene_bank, outputs={"dir": str(out)}, engine={"escalate": "none"},
                          logging={"level": "WARNING"})
    assert main(["run", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert " INFO " not in err, err  # logging.level from the config
    results = _results(out)
    for cid, video in videos.items():
        assert sorted(r["seq"] for r in results if r["camera"] == cid) == list(range(sampled_frames(video)))
    assert sorted(p.name for p in out.glob("timeline_*.png")) == ["timeline_a.png", "timeline_b.png"]


@pytest.mark.slow
def test_inprocess_run_stops_cleanly_and_reloads_a_changed_bank(scene, scene_bank, tmp_path, procs):
    from engine.bank import ReferenceBank

    bank = tmp_path / "plaza.bank"
    bank.write_bytes(scene_bank.read_bytes())
    out = tmp_path / "out"
    cams = {"loop": camera(scene.test_videos[0], realtime=True, loop=True, mode="live")}
    config = write_config(tmp_path / "local.yaml", cams, bank, outputs={"dir": str(out)},
                          engine={"escalate": "none"})
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")
    wait_for(lambda: len(_results(out)) >= 3, 90, "first results", mon)

    new = ReferenceBank.load(bank)
    new.calibration = replace(new.calibration, tau=12345.0)
    new.save(bank)  # atomic replace, as 'reference calibrate' does
    wait_for(lambda: any(r["tau"] == 12345.0 for r in _results(out)), 30, "the new bank in use", mon)
    code, took = mon.stop(signal.SIGTERM)
    assert code == 0, mon.text()
    log = mon.text()
    clean_log(log)
    assert log.count("reference frames from plaza.bank loaded") == 2  # loaded, then reloaded
    results = _results(out)
    got = sorted(r["seq"] for r in results)
    assert got == list(range(len(got)))  # every frame the bus accepted was processed
    assert (out / "timeline_loop.png").is_file()


@pytest.mark.slow
def test_a_bank_overwritten_in_place_never_stops_the_engine(scene, scene_bank, tmp_path, procs):
    """`cp other.bank scene.bank` writes into the file the engine loaded from: a truncated copy
    keeps the old bank serving, a complete one is swapped in, and no frame is lost."""
    from engine.bank import ReferenceBank

    bank = tmp_path / "plaza.bank"
    good = scene_bank.read_bytes()
    bank.write_bytes(good)
    out = tmp_path / "out"
    cams = {"loop": camera(scene.test_videos[0], realtime=True, loop=True, mode="live")}
    config = write_config(tmp_path / "local.yaml", cams, bank, outputs={"dir": str(out)},
                          engine={"escalate": "all"})  # every frame reads the pyramids
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")
    wait_for(lambda: len(_results(out)) >= 3, 90, "first results", mon)

    with open(bank, "r+b") as fh:  # in place, same inode, as cp does: a truncated file
        fh.truncate(0)
        fh.write(good[: len(good) // 2])
    wait_for(lambda: "keeping the previous bank" in mon.text(), 30, "the broken bank refused", mon)
    seen = len(_results(out))
    wait_for(lambda: len(_results(out)) >= seen + 3, 30, "results with the old bank", mon)

    other = ReferenceBank.load(scene_bank)
    other.calibration = replace(other.calibration, tau=4321.0)
    other.save(tmp_path / "other.bank")
    with open(bank, "r+b") as fh:  # a complete bank, again in place
        fh.truncate(0)
        fh.write((tmp_path / "other.bank").read_bytes())
    wait_for(lambda: any(r["tau"] == 4321.0 for r in _results(out)), 30, "the new bank in use", mon)
    code, _ = mon.stop(signal.SIGTERM)
    assert code == 0, mon.text()
    assert "SIGBUS" not in mon.text() and "exited unexpectedly" not in mon.text()
    got = sorted(r["seq"] for r in _results(out))
    assert got == list(range(len(got)))


# ---------------------------------------------------------------- bad input

def _error_of(args: list[str], capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spade-monitor: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_config_mistakes_are_one_line_errors(scene, scene_bank, tmp_path, capsys):
    cams = {"lobby": camera(scene.test_videos[0])}
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("cameras:\n  lobby: [\n")
    assert "invalid YAML" in _error_of(["run", "--config", str(bad_yaml)], capsys)

    unknown = write_config(tmp_path / "unknown.yaml", cams, scene_bank, engine={"max_bacth": 4})
    assert "engine.max_bacth: unknown key (did you mean max_batch?)" in _error_of(
        ["run", "--config", str(unknown)], capsys)

    no_bank = write_config(tmp_path / "nobank.yaml", cams, tmp_path / "missing.bank")
    assert "reference bank not found" in _error_of(["run", "--config", str(no_bank)], capsys)

    inprocess = write_config(tmp_path / "inprocess.yaml", cams, scene_bank)
    for command in ("ingest", "engine"):
        assert "needs bus.kind: redis" in _error_of([command, "--config", str(inprocess)], capsys)
    assert "outputs.dir" in _error_of(["run", "--config", str(inprocess)], capsys)  # nowhere to publish

    with_redis = write_config(tmp_path / "redis.yaml", cams, scene_bank, "redis://127.0.0.1:1/0")
    assert "--camera nope: unknown camera" in _error_of(
        ["ingest", "--config", str(with_redis), "--camera", "nope"], capsys)


@pytest.mark.parametrize("bus", ["inprocess", "redis"])
def test_a_run_that_never_reads_a_frame_exits_non_zero(scene_bank, tmp_path, procs, request, bus):
    """Every camera unreadable: the run says so in one line and exits 3, not 0 as if it worked."""
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    redis_url = request.getfixturevalue("redis_server").url if bus == "redis" else None
    config = write_config(tmp_path / "monitor.yaml", {"a": camera(bad), "b": camera(bad)}, scene_bank, redis_url,
                          outputs={"dir": str(tmp_path / "out")})
    mon = procs(["run", "--config", str(config)], tmp_path / "run.log")
    code = mon.proc.wait(120)
    assert code == 3, mon.tail()
    assert mon.text().count("no frame could be read from any camera") == 1, mon.tail()
    clean_log(mon.text())


def _truncated_avi(scene, path: Path) -> Path:
    """The first 60% of an MJPEG AVI of a test clip: the tail is cut mid-frame."""
    import av

    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=int(scene.fps))
        stream.height, stream.width = scene.size
        stream.pix_fmt = "yuvj420p"
        for i, rgb in enumerate(iter_video_frames(scene.test_videos[1])):
            frame = av.VideoFrame.from_ndarray(rgb, "rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.mark.slow
def test_bad_sources_and_corrupt_frames_do_not_stop_other_cameras(scene, scene_bank, redis_server, tmp_path,
                                                                   procs):
    good_video = scene.test_videos[0]
    expected = sampled_frames(good_video)
    truncated = _truncated_avi(scene, tmp_path / "cut.avi")
    secret_url = f"rtsp://user:secretpw@127.0.0.1:{free_port()}/x"  # nobody listens there
    config = write_config(tmp_path / "monitor.yaml", {
        "good": camera(good_video, realtime=False),
        "cut": camera(truncated, realtime=False),
        "dead": camera(secret_url),
    }, scene_bank, redis_server.url, engine={"escalate": "none"})
    r = redis.Redis(port=redis_server.port)
    # A corrupt entry waits on the good camera's stream before the engine starts.
    fields = encode_frame(Frame("good", 10_000, 0.0, time.time(), np.zeros((120, 160, 3), np.uint8), "x" * 32))
    fields[b"data"] = b"\xff\xd8 this is not a JPEG"
    r.xadd("frames:good", fields)

    mon = procs(["--log-json", "run", "--config", str(config)], tmp_path / "run.log")
    wait_for(lambda: len(seqs(r, "good")) >= expected, 120, "all results of the good camera", mon)
    wait_for(lambda: statuses(r, "cut")[-1:] in (["finished"], ["offline"]), 30, "the cut file to end", mon)
    wait_for(lambda: any(s in ("offline", "reconnecting") for s in statuses(r, "dead")), 20, "dead offline", mon)
    wait_for(lambda: "corrupt frame" in mon.text(), 10, "the corrupt entry to be reported", mon)

    assert sorted(seqs(r, "good")) == list(range(expected))  # the corrupt entry made no result
    if statuses(r, "cut")[-1] == "finished":
        assert 5 <= len(seqs(r, "cut")) < sampled_frames(scene.test_videos[1])
    code, _ = mon.stop()
    log = mon.text()
    assert code == 0, log
    assert r.xlen("frames:good") == 0  # acked and deleted, corrupt entry included
    assert '"1 corrupt' in log or " 1 corrupt" in log
    clean_log(log)

    # The password never reaches the logs nor Redis.
    assert "secretpw" not in log
    assert "***@127.0.0.1" in log
    for key in r.scan_iter():
        kind = r.type(key)
        dump = str(key) + (str(r.xrange(key)) if kind == b"stream" else str(r.dump(key)))
        assert b"secretpw" not in dump.encode(), key
    for line in log.splitlines():  # --log-json: every line is one JSON object
        assert line.startswith("{"), line
