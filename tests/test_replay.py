"""`spade-monitor replay`: one video through ingest, bus, engine and a directory publisher."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.bank import ReferenceBank
from engine.datasets import iter_video_frames
from engine.evaluate import smooth_scores
from engine.spade import Spade
from monitor.cli import main
from monitor.ingest import CameraReader

FPS = 5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread, restored afterwards: on a CPU shared with other jobs a 2-thread pool is
    several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sampled(video, fps) -> int:
    with CameraReader(video, fps=fps, realtime=False) as reader:
        return sum(1 for _ in reader)


def test_replay_writes_results_events_overlays_and_timeline(scene, scene_bank, tmp_path, capsys):
    video = scene.test_videos[0]
    out = tmp_path / "out"
    rc = main(["-q", "replay", str(video), "--reference", str(scene_bank), "--out", str(out),
               "--fps", str(FPS), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err

    expected = _sampled(video, FPS)
    results = _lines(out / "results.jsonl")
    assert len(results) == expected
    assert [r["seq"] for r in results] == list(range(expected))
    assert len({r["run_id"] for r in results}) == 1
    assert all(r["published_ts"] >= r["capture_ts"] for r in results)

    # The injected anomalies of clip 01 span these source frames; at 5 of 10 fps, seq = frame // 2.
    first = min(e.first_frame for e in scene.events if e.clip == "01") * FPS / scene.fps
    last = max(e.last_frame for e in scene.events if e.clip == "01") * FPS / scene.fps
    events = _lines(out / "events.jsonl")
    starts = [e for e in events if e["kind"] == "start"]
    ends = [e for e in events if e["kind"] == "end"]
    assert starts and len(ends) == len(starts)
    assert any(first - 2 <= e["start_seq"] <= last for e in starts), events
    flagged = [r for r in results if r["flagged"]]
    assert flagged and all(first - 2 <= r["seq"] <= last + 5 for r in flagged)  # +5: smoothing lag

    overlays = sorted((out / "overlays").rglob("*.jpg"))
    assert overlays and all(p.stat().st_size > 0 for p in overlays)
    refs = {r["overlay_ref"] for r in results if r["overlay_ref"]}
    assert refs and all((out / ref).is_file() for ref in refs)
    timelines = list(out.glob("timeline_*.png"))
    assert len(timelines) == 1 and timelines[0].stat().st_size > 1000
    statuses = [s["status"] for s in _lines(out / "status.jsonl")]
    assert statuses == ["online", "finished"]

    summary = captured.out.strip().splitlines()[-1]
    assert f"{expected} frames" in summary and f"{len(flagged)} flagged" in summary
    assert f"{len(starts)} event(s)" in summary and "frames/s" in summary

    # A second replay into the same folder must not mix runs unless asked to.
    rc = main(["-q", "replay", str(video), "--reference", str(scene_bank), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_replay_scores_equal_evaluate_scores(scene, scene_bank, tmp_path, capsys):
    """replay --escalate all == Spade.iter_scores (smoothed as evaluate does) on the same frames."""
    video = scene.test_videos[1]
    out = tmp_path / "all"
    rc = main(["-q", "replay", str(video), "--reference", str(scene_bank), "--out", str(out),
               "--escalate", "all", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    results = _lines(out / "results.jsonl")
    assert all(r["escalated"] for r in results)
    got = np.array([r["image_score"] for r in sorted(results, key=lambda r: r["seq"])])

    bank = ReferenceBank.load(scene_bank)
    spade = Spade.for_bank(bank, device="cpu", batch_size=8)
    raw = [score for _, score, _ in spade.iter_scores(iter_video_frames(video), bank, maps="all")]
    want = smooth_scores(np.asarray(raw, dtype=np.float64), spade.config.temporal_window)
    assert len(got) == len(want) == 60
    np.testing.assert_allclose(got, want, rtol=1e-3)


@pytest.mark.parametrize("case", ["missing bank", "missing video", "bad fps"])
def test_replay_user_errors_are_one_line(scene, scene_bank, tmp_path, capsys, case):
    video, bank, extra = scene.test_videos[0], scene_bank, []
    if case == "missing bank":
        bank = tmp_path / "nope.bank"
    elif case == "missing video":
        video = tmp_path / "nope.mp4"
    else:
        extra = ["--fps", "0"]
    rc = main(["-q", "replay", str(video), "--reference", str(bank), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spade-monitor: error:"), err
    assert not (tmp_path / "o" / "results.jsonl").exists()
