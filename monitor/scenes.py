"""The engine's scenes: each scene's reference bank, model, thresholds and scorer, loaded from
the config at start and swapped in when its bank file changes (a broken new file keeps the old
bank serving). Scenes with the same backbone share one feature extractor in memory.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from engine.bank import ReferenceBank
from engine.decision import FrameScorer, Thresholds
from engine.errors import BankError
from engine.spade import Spade

from .telemetry import EngineMetrics

log = logging.getLogger(__name__)


@dataclass
class Scene:
    """A scene's bank, its model and its effective thresholds."""

    name: str
    path: Path
    bank: ReferenceBank
    model: Spade
    thresholds: Thresholds
    scorer: FrameScorer  # per-camera smoothing and flags, as evaluate's "as deployed"
    mtime: float
    load_seconds: float


def camera_misfit(stored_config: dict) -> str | None:
    """Why a bank's stored settings (ReferenceBank.stored_config) do not suit a camera stream, or None."""
    if stored_config.get("geometry") == "crop":
        # Scoring still works, but only the resized centre crop is seen: edges go unwatched.
        return ("was built for still images (crop geometry: only a centre crop of each frame is scored); "
                "build a camera bank with 'spade-monitor reference build' without --preset inspection or paper")
    return None


class SceneSet:
    """The loaded scenes of one config, by name."""

    def __init__(self, config, metrics: EngineMetrics):
        self.config = config
        self.metrics = metrics
        self._scenes: dict[str, Scene] = {}
        self._extractors: dict[tuple, object] = {}

    def __getitem__(self, name: str) -> Scene:
        return self._scenes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._scenes

    def __bool__(self) -> bool:
        return bool(self._scenes)

    def values(self):
        return self._scenes.values()

    def load(self) -> None:
        """Load every scene of the config (at start)."""
        for name, scene_cfg in self.config.scenes.items():
            self.metrics.beat()  # a start with large banks can outlast EngineDown's window
            self._scenes[name] = self._load(name, scene_cfg)
        self.metrics.beat()

    def _load(self, name: str, scene_cfg) -> Scene:
        t0 = time.perf_counter()
        path = Path(scene_cfg.bank)
        eng = self.config.engine
        bank = ReferenceBank.load(path)
        cameras = [cid for cid, cam in self.config.cameras.items() if cam.scene == name and cam.enabled]
        misfit = camera_misfit(bank.stored_config) if cameras else None
        if misfit:
            log.warning("scene %s (camera %s): bank %s %s", name, ", ".join(cameras), path.name, misfit)
        overrides = dict(device=eng.device, precision=eng.precision, k_image=eng.k_image,
                         k_pixel=eng.k_pixel, batch_size=eng.max_batch)
        probe = Spade.for_bank(bank, extractor=self._shared_extractor(bank, overrides), **overrides)
        thresholds = Thresholds.of_bank(bank, probe.config.image_score, tau=scene_cfg.tau, theta=scene_cfg.theta,
                                        where=str(path))
        bank = bank.to(probe.device)
        probe.warm_up(bank, eng.max_batch)
        built_fps = bank.fps
        if (probe.config.temporal_diff > 0 or probe.config.motion_weight > 0) and built_fps is not None:
            for cid, cam in self.config.cameras.items():
                if cam.scene == name and cam.enabled and cam.fps is not None and abs(built_fps - cam.fps) > 1e-3:
                    # Temporal features compare consecutive sampled frames: the spacing must match.
                    log.warning("camera %s samples at %s fps but scene %s's bank was built at %s fps: "
                                "rebuild it with 'reference build --fps %s'", cid, cam.fps, name, built_fps, cam.fps)
        seconds = time.perf_counter() - t0
        log.info("scene %s: %d reference frames from %s loaded in %.2fs", name, len(bank), path.name, seconds)
        self.metrics.observe_scene(name, len(bank), bank.bytes_per_frame() * len(bank), seconds,
                                   bank.created_ts)
        scorer = FrameScorer(thresholds, probe.config.temporal_window, probe.config.map_scored)
        return Scene(name, path, bank, probe, thresholds, scorer, path.stat().st_mtime, seconds)

    def _shared_extractor(self, bank: ReferenceBank, overrides: dict):
        key = (*bank.backbone_key, overrides["device"], overrides["precision"])
        if key not in self._extractors:
            self._extractors[key] = Spade.for_bank(bank, **overrides).extractor
        return self._extractors[key]

    def reload_changed(self) -> list[str]:
        """Swap in banks whose file changed; a broken new bank keeps the old one serving."""
        reloaded = []
        for name, scene in list(self._scenes.items()):
            try:
                mtime = scene.path.stat().st_mtime
            except OSError:  # deleted or moved: keep serving the loaded bank, but say so
                self.metrics.scene_file_missing(name, True)
                continue
            self.metrics.scene_file_missing(name, False)
            if mtime != scene.mtime:
                try:
                    self._scenes[name] = self._load(name, self.config.scenes[name])
                    reloaded.append(name)
                except BankError as exc:
                    scene.mtime = mtime  # do not retry the same broken file every batch
                    log.error("scene %s: keeping the previous bank: %s", name, exc)
        return reloaded

