"""The console's review actions on a scene's bank: "not an anomaly" adds the frames to the
bank as a new version (engine/feedback.py, engine/versions.py); "confirmed" only labels.

The engine notices the changed bank file and hot-reloads it (monitor/scenes.py), so the next
such frame is scored against the new reference.
"""
from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

from engine.bank import ReferenceBank
from engine.errors import SpadeError
from engine.feedback import FeedbackFrame, add_normal_frames, raw_scores
from engine.preprocess import decode_jpeg
from engine.spade import Spade
from engine.versions import BankHistory

from .publish import media_path

log = logging.getLogger(__name__)

MAX_FRAMES_PER_CLICK = 32  # an event's flagged frames, evenly sampled: bounds the work of one click


class FeedbackError(SpadeError):
    """A review action that cannot be done; the message is for the operator."""


class BankFeedback:
    def __init__(self, scene_banks: dict[str, str], out_dir: str | Path, device: str = "cpu"):
        self.scene_banks = {scene: Path(path) for scene, path in scene_banks.items()}
        self.out_dir = Path(out_dir)
        self.device = device
        self._lock = threading.Lock()  # one bank change at a time: each builds on the last version
        self._banks: dict[tuple, ReferenceBank] = {}  # (path, mtime) -> bank, for reference images

    def reference_image(self, scene: str, index: int, version: int | None = None) -> bytes | None:
        """The JPEG of a reference frame of the scene's bank (at `version`, default the live one)."""
        path = self.scene_banks.get(scene)
        if path is None:
            return None
        try:
            bank = self._bank(path, version)
        except SpadeError as exc:
            log.warning("scene %s: no reference image: %s", scene, exc)
            return None
        return bank.image(index) if 0 <= index < len(bank) else None

    def _bank(self, path: Path, version: int | None) -> ReferenceBank:
        history = BankHistory(path)
        live = history.current()
        if version is None or version == live:
            source, load = path, functools.partial(ReferenceBank.load, path)
        else:
            source, load = history.file_of(version), functools.partial(history.load, version)
        key = (str(source), source.stat().st_mtime_ns if source.exists() else 0)
        if key not in self._banks:
            self._banks = {k: v for k, v in self._banks.items() if k[0] != key[0]}  # one copy per file
            self._banks[key] = load()
        return self._banks[key]

    def confirm(self, event: dict, results: list[dict], user: str) -> dict:
        return {"frames": len(results)}

    def not_anomaly(self, event: dict, results: list[dict], user: str) -> dict:
        """Add the frames of `results` to their scene's bank; returns the versions and the frames'
        scores against the bank before and after."""
        usable = [r for r in results if r.get("frame_ref")]
        if not usable:
            raise FeedbackError("these frames have no stills to add (published before stills were kept, or "
                                "overlays are off): nothing was changed")
        scene = usable[0].get("scene")
        if scene not in self.scene_banks:
            raise FeedbackError(f"scene {scene!r} is not in this console's config: nothing was changed")
        step = max(1, len(usable) // MAX_FRAMES_PER_CLICK + (len(usable) % MAX_FRAMES_PER_CLICK > 0))
        usable = usable[::step][:MAX_FRAMES_PER_CLICK]
        frames = [self._still(r) for r in usable]
        path = self.scene_banks[scene]
        with self._lock:
            bank = ReferenceBank.load(path)
            model = Spade.for_bank(bank, device=self.device)
            before = raw_scores(model, bank, frames)
            new = add_normal_frames(model, bank, frames)
            after = raw_scores(model, new, frames)
            # Before the commit: a bank never calibrated is refused with its one line, unchanged.
            tau_before, tau_after = bank.calibrated().tau, new.calibrated().tau
            history = BankHistory(path)
            version_before = history.current()
            seqs = [int(r["seq"]) for r in usable]
            version = history.commit(new, "not_anomaly", user, {
                "event_id": event.get("event_id"), "camera": usable[0].get("camera"), "seqs": seqs,
                "added": len(frames), "before": before, "after": after})
        log.info("scene %s: %d frame(s) of %s marked normal by %s: bank v%d -> v%d", scene, len(frames),
                 event.get("event_id") or "a frame", user or "-", version_before, version)
        return {"scene": scene, "version_before": version_before, "version_after": version,
                "tau_before": tau_before, "tau": tau_after,
                "before": [{"seq": s, "score": b} for s, b in zip(seqs, before)],
                "after": [{"seq": s, "score": a} for s, a in zip(seqs, after)]}

    def _still(self, record: dict) -> FeedbackFrame:
        images = []
        for ref in (record.get("frame_ref"), record.get("previous_ref")):
            path = media_path(self.out_dir, ref) if ref else None
            image = decode_jpeg(path.read_bytes()) if path is not None and path.is_file() else None
            images.append(image)
        if images[0] is None:
            raise FeedbackError(f"the still of frame {record.get('seq')} is missing from {self.out_dir}: "
                                "nothing was changed")
        return FeedbackFrame(images[0], images[1])
