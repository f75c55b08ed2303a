"""`spade-monitor replay`: one video through ingest, bus, engine and a directory publisher."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.bank import ReferenceBank
from engine.datasets import iter_video_frames
from engine.decision import Thresholds
from engine.evaluate import score_clip
from engine.spade import Spade
from monitor.cli import main
from monitor.ingest import CameraReader
from monitor.replay import _prepare_out_dir, scene_name_for
from monitor.scenes import camera_misfit

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
    # What a reviewer sees of each flagged frame: the frame, its predecessor, the nearest normal patch.
    bank = ReferenceBank.load(scene_bank)
    for r in (r for r in flagged if r["overlay_ref"]):
        assert (out / r["frame_ref"]).is_file() and (r["seq"] == 0 or (out / r["previous_ref"]).is_file())
        ev = r["evidence"]
        assert 0 <= ev["ref_index"] < len(bank) and bank.image(ev["ref_index"]) is not None
        h, w = bank.input_size
        for x, y, bw, bh in (ev["box"], ev["ref_box"]):
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
    timelines = list(out.glob("timeline_*.png"))
    assert len(timelines) == 1 and timelines[0].stat().st_size > 1000
    statuses = [s["status"] for s in _lines(out / "status.jsonl")]
    assert statuses == ["online", "finished"]
    assert {r["scene"] for r in results} == {"plaza"}  # the bank's scene, not a placeholder
    assert "crop geometry" not in captured.err  # a camera bank fits a camera

    summary = captured.out.strip().splitlines()[-1]
    assert f"{expected} frames" in summary and f"{len(flagged)} flagged" in summary
    assert f"{len(starts)} event(s)" in summary and "frames/s" in summary

    # A second replay into the same folder must not mix runs unless asked to.
    rc = main(["-q", "replay", str(video), "--reference", str(scene_bank), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _evaluate_clip(scene_bank, video):
    bank = ReferenceBank.load(scene_bank)
    spade = Spade.for_bank(bank, device="cpu", batch_size=8)
    thresholds = Thresholds.of_bank(bank, spade.config.image_score)
    return score_clip(spade, bank, thresholds, iter_video_frames(video))


def _replayed(out) -> list[dict]:
    return sorted(_lines(out / "results.jsonl"), key=lambda r: r["seq"])


def test_replay_scores_equal_evaluate_scores(scene, scene_bank, tmp_path, capsys):
    """replay --escalate all == evaluate's every-frame-matched scores on the same frames."""
    video = scene.test_videos[1]
    out = tmp_path / "all"
    rc = main(["-q", "replay", str(video), "--reference", str(scene_bank), "--out", str(out),
               "--escalate", "all", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    results = _replayed(out)
    assert all(r["escalated"] for r in results)
    want = _evaluate_clip(scene_bank, video)
    assert len(results) == len(want.matched) == 60
    np.testing.assert_allclose([r["image_score"] for r in results], want.matched, rtol=1e-3)


def test_live_engine_publishes_what_evaluate_reports_as_deployed(scene, scene_bank, tmp_path, capsys):
    """The default replay (the live gate and escalation) publishes, frame by frame, the scores,
    escalations and flags that evaluate reports "as deployed"."""
    video = scene.test_videos[0]
    out = tmp_path / "deployed"
    rc = main(["-q", "replay", str(video), "--reference", str(scene_bank), "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    results = _replayed(out)
    want = _evaluate_clip(scene_bank, video)
    escalated = np.array([r["escalated"] for r in results])
    assert 0 < escalated.sum() < len(results)  # the gate decides: some frames go on, some do not
    np.testing.assert_array_equal(escalated, want.escalated)
    np.testing.assert_allclose([r["image_score"] for r in results], want.deployed, rtol=1e-3)
    np.testing.assert_array_equal([r["flagged"] for r in results], want.deployed_flags)
    assert want.deployed_flags.any()


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


def test_failed_replay_does_not_block_the_next_one(scene, scene_bank, tmp_path, capsys):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    rc = main(["-q", "replay", str(bad), "--reference", str(scene_bank), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("spade-monitor: error: cannot replay"), err
    assert not (out / "results.jsonl").exists() and not (out / "status.jsonl").exists()

    rc = main(["-q", "replay", str(scene.test_videos[0]), "--reference", str(scene_bank), "--out", str(out),
               "--fps", "2", "--escalate", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert _lines(out / "results.jsonl")
    assert [s["status"] for s in _lines(out / "status.jsonl")] == ["online", "finished"]


def test_out_dir_with_only_empty_leftovers_is_reused(tmp_path):
    """Leftovers of a run that produced no result (e.g. from an older version) do not block; results do."""
    from engine.errors import DataError

    (tmp_path / "results.jsonl").write_text("")
    (tmp_path / "events.jsonl").write_text("")
    (tmp_path / "status.jsonl").write_text('{"camera": "x", "status": "failed"}\n')
    _prepare_out_dir(tmp_path, overwrite=False)
    assert not any((tmp_path / n).exists() for n in ("results.jsonl", "events.jsonl", "status.jsonl"))
    (tmp_path / "results.jsonl").write_text('{"seq": 0}\n')
    with pytest.raises(DataError, match="--overwrite"):
        _prepare_out_dir(tmp_path, overwrite=False)


@pytest.mark.parametrize("scene, expected", [
    ("demo", "demo"),
    (None, "replay"),
    ("../../etc", "replay"),
    ("a/b", "replay"),
    ("x" * 65, "replay"),
    ("ok\n", "replay"),
])
def test_replay_scene_name_comes_from_the_bank_and_is_path_safe(scene, expected):
    assert scene_name_for(scene) == expected


def test_camera_misfit_names_crop_geometry():
    assert "crop geometry" in camera_misfit({"geometry": "crop"})
    assert camera_misfit({"geometry": "full"}) is None
    assert camera_misfit({}) is None


@pytest.fixture(scope="module")
def stills_bank(scene, tmp_path_factory):
    """A tiny bank built with the inspection preset (crop geometry) from a few of the scene's frames."""
    from engine.reference import build_reference
    from engine.spade import preset

    root = tmp_path_factory.mktemp("stills")
    for clip in sorted((scene.root / "training" / "frames").iterdir())[:2]:
        (root / clip.name).mkdir()
        for frame in sorted(clip.iterdir())[:6]:
            (root / clip.name / frame.name).symlink_to(frame)
    spade = Spade(preset("inspection", device="cpu", batch_size=8, k_image=2, k_pixel=2))
    path = root / "stills.bank"
    build_reference(spade, [root], "stills", progress=False).save(path)
    return path


def test_replay_warns_once_when_the_bank_is_for_still_images(scene, stills_bank, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "replay", str(scene.test_videos[1]), "--reference", str(stills_bank), "--out", str(out),
               "--fps", "2", "--escalate", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "crop geometry" in line]
    assert len(warnings) == 1, err
    assert "WARNING" in warnings[0] and "stills.bank" in warnings[0] and "reference build" in warnings[0]
    assert {r["scene"] for r in _lines(out / "results.jsonl")} == {"stills"}
