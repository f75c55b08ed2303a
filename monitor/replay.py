"""`spade-monitor replay`: one recorded video through the whole pipeline, in one process, no Redis.

The same path as a live deployment (ingest worker -> in-process frame bus -> engine worker ->
publisher), with a directory publisher in place of Redis, so what an analyst sees offline is
what operators would have seen live. DIR gets results.jsonl, events.jsonl, status.jsonl,
overlays/<camera>/<seq>.jpg (flagged frames) and timeline_<camera>.png.
"""
from __future__ import annotations

import math
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.bank import ReferenceBank
from engine.errors import BankError, DataError

from .config import parse_config
from .frames import is_safe_name
from .runner import run_local


@dataclass
class ReplaySummary:
    camera: str
    frames: int
    flagged: int
    escalated: int
    events: int
    seconds: float
    out_dir: Path

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self, video: str | Path) -> str:
        return (f"{Path(video).name}: {self.frames} frames, {self.flagged} flagged, {self.escalated} escalated, "
                f"{self.events} event(s), {self.fps:.1f} frames/s -> {self.out_dir}")


def camera_name_for(video: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", video.stem).lstrip("._-")[:64]
    return name or "video"


def scene_name_for(scene: str | None) -> str:
    """The bank's scene, for results; 'replay' when it has none safe in keys and paths."""
    if is_safe_name(scene):
        return scene
    return "replay"


_OUTPUTS = ("results.jsonl", "events.jsonl", "status.jsonl")
_KEPT = ("results.jsonl", "events.jsonl")  # what makes an earlier run worth protecting


def _has_lines(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    earlier = [name for name in _KEPT if _has_lines(out_dir / name)]
    if earlier and not overwrite:
        raise DataError(f"{out_dir} already holds {earlier[0]} from an earlier run; choose another --out "
                        f"or pass --overwrite")
    if out_dir.is_dir():
        # No earlier results: what is left (empty files, a failed run's status) is worth nothing.
        for name in _OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
    if overwrite and out_dir.is_dir():
        for png in out_dir.glob("timeline_*.png"):
            png.unlink()
        shutil.rmtree(out_dir / "overlays", ignore_errors=True)


def _discard_if_empty(out_dir: Path, created: bool) -> None:
    """After a failed run: remove its outputs if it produced no result, so the next run is not refused."""
    if _has_lines(out_dir / "results.jsonl"):
        return  # partial results are kept for inspection
    paths = [out_dir / name for name in _OUTPUTS] + [out_dir / "overlays"] + ([out_dir] if created else [])
    for path in paths:
        try:  # best effort: the run's own error is what the user must see
            if path.is_dir():
                path.rmdir()  # only if empty
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass


def replay(video: str | Path, bank: str | Path, out_dir: str | Path, *, fps: float | None = None,
           realtime: bool = False, escalate: str = "flagged", device: str = "auto",
           precision: str = "auto", max_batch: int = 16, progress: bool = True, overwrite: bool = False,
           camera: str | None = None, stop: threading.Event | None = None) -> ReplaySummary:
    video, bank, out_dir = Path(video), Path(bank), Path(out_dir)
    if not video.is_file():
        raise DataError(f"video not found: {video} (check the path)")
    if not bank.is_file():
        raise BankError(f"reference bank not found: {bank} (build it with 'spade-monitor reference build')")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise DataError(f"--fps: expected a number > 0, got {fps}")
    camera = camera or camera_name_for(video)
    scene = scene_name_for(ReferenceBank.read_summary(bank).scene)  # the header only: tensors load once, in the engine
    _prepare_out_dir(out_dir, overwrite)
    config = parse_config({
        "cameras": {camera: {"source": str(video.resolve()), "scene": scene, "fps": fps,
                             "mode": "replay", "realtime": realtime}},
        "scenes": {scene: {"bank": str(bank.resolve())}},
        "engine": {"device": device, "precision": precision, "max_batch": max_batch, "escalate": escalate},
        "bus": {"kind": "inprocess"},
        "outputs": {"dir": str(out_dir.resolve())},
        "metrics": {"port": 0},
    }, base_dir=Path.cwd(), check_files=True)
    created = not out_dir.exists()
    bar = _progress(video, fps, progress)
    try:
        try:
            run = run_local(config, stop or threading.Event(), on_frames=bar.update)
        finally:
            bar.close()
        failed = run.ingest.failed_cameras()
        if camera in failed:
            raise DataError(f"cannot replay {video}: {failed[camera]}")
    except BaseException:
        _discard_if_empty(out_dir, created)
        raise
    s = run.engine.stats
    return ReplaySummary(camera=camera, frames=s.frames, flagged=s.flagged, escalated=s.escalated,
                         events=s.events_started, seconds=run.seconds, out_dir=out_dir)


def expected_frames(video: Path, fps: float | None) -> int | None:
    """About how many frames a replay samples, for the progress bar; None if unknown."""
    import av

    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            n = stream.frames
            if not n and stream.duration and stream.time_base and rate:
                n = round(float(stream.duration * stream.time_base) * rate)
    except Exception:  # only a progress estimate: the replay itself reports real errors
        return None
    if not n:
        return None
    if fps and rate > fps:
        n = math.ceil(n * fps / rate)
    return int(n)


def _progress(video: Path, fps: float | None, enabled: bool):
    from engine.progress import Progress

    total = expected_frames(video, fps) if enabled else None
    return Progress(f"replay {video.name}", total, enabled=enabled)
