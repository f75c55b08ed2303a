"""Scoring a batch of frames from many cameras into results.

Frames whose scenes share a model and input size share one backbone pass; each scene then
gates its rows, matches the escalated ones pixel by pixel, and takes the frame decision of
engine/decision.py (smoothing and flag per camera). Escalated frames get regions; flagged ones
an overlay, stills, and the evidence of their peak (engine/evidence.py).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from engine.backbones import Features
from engine.evidence import peak_evidence
from engine.preprocess import encode_jpeg

from .frames import Frame
from .publish import encode_overlay
from .results import FrameResult, Media, Stills, regions_from_map
from .scenes import Scene, SceneSet

STILL_QUALITY = 95  # stills are re-scored when marked normal: close to the frame the engine saw


class BatchScorer:
    """Turns frames into (result, media) pairs. Holds each camera's last pyramid, which the
    temporal features of its next frame compare against, and its last frame."""

    def __init__(self, scenes: SceneSet, camera_scene: dict[str, str], stats, escalate: str, overlays: bool):
        self.scenes = scenes
        self.camera_scene = camera_scene
        self.stats = stats  # EngineStats: counts and stage seconds
        self.escalate = escalate
        self.overlays = overlays
        self._previous: dict = {}  # camera -> pyramid of its last frame
        self._last_image: dict = {}  # camera -> its last frame, the previous still of a flagged one

    def forget(self, camera: str) -> None:
        """Drop the camera's past (a handover): its next frame is scored as a stream's first."""
        self._previous.pop(camera, None)
        self._last_image.pop(camera, None)
        scene = self.camera_scene.get(camera)
        if scene is not None and scene in self.scenes:
            self.scenes[scene].scorer.restart(camera)

    def knows(self, camera: str) -> bool:
        return self.camera_scene.get(camera) in self.scenes

    def score(self, frames: list[Frame], late: bool = False) -> list[tuple[FrameResult, Media]]:
        """late: frames claimed from a dead engine, which later frames of their camera may already
        have passed; they find their predecessors in their own batch only and leave the context alone."""
        previous: list = []  # each frame's predecessor, for its stills
        for f in frames:
            previous.append(None if late else self._last_image.get(f.camera))
            if not late:
                self._last_image[f.camera] = f.image
        groups: dict[tuple, list[int]] = defaultdict(list)  # frames by the backbone pass they share
        for i, f in enumerate(frames):
            scene = self._scene_of(f)
            groups[scene.model.pass_key(scene.bank)].append(i)
        out: list = [None] * len(frames)
        for idx in groups.values():
            first = self._scene_of(frames[idx[0]])
            t0 = time.perf_counter()
            feats = first.model.features([frames[i].image for i in idx], first.model.bank_preprocess(first.bank),
                                         streams=[frames[i].camera for i in idx],
                                         context={} if late else self._previous)
            self.stats.stage_seconds["backbone"] += time.perf_counter() - t0
            by_scene: dict[str, list[int]] = defaultdict(list)
            for j, i in enumerate(idx):
                by_scene[self.camera_scene[frames[i].camera]].append(j)
            for scene_name, rows in by_scene.items():
                sel = torch.tensor(rows, device=feats.global_.device)
                sub = Features(global_=feats.global_[sel], pyramid={k: v[sel] for k, v in feats.pyramid.items()})
                scored = self._score_scene(self.scenes[scene_name], [frames[idx[r]] for r in rows],
                                           [previous[idx[r]] for r in rows], sub, late)
                for j, res in zip(rows, scored):
                    out[idx[j]] = res
        return out

    def _scene_of(self, frame: Frame) -> Scene:
        return self.scenes[self.camera_scene[frame.camera]]

    def _score_scene(self, scene: Scene, frames: list[Frame], previous: list, feats: Features, late: bool):
        th = scene.thresholds
        res = scene.model.score_features(feats, scene.bank, maps=self.escalate, tau=th.gate_tau)
        self.stats.stage_seconds["gate"] += res.gate_seconds
        if res.map_rows:  # batches without escalations would pull the stage's quantiles to zero
            self.stats.stage_seconds["pixel_matching"] += res.match_seconds
        maps = dict(zip(res.map_rows, res.maps if res.maps is not None else []))
        results = []
        for i, frame in enumerate(frames):
            amap = maps.get(i)
            raw = float(res.image_scores[i])
            score, flagged = scene.scorer.alone(raw) if late else scene.scorer(frame.camera, raw)
            result = FrameResult(
                camera=frame.camera, run_id=frame.run_id, seq=frame.seq, source_ts=frame.source_ts,
                capture_ts=frame.capture_ts, published_ts=None, scene=scene.name, image_score=score,
                tau=th.tau, flagged=flagged, escalated=amap is not None,
                max_pixel_score=None, theta=th.theta, anomalous_area=None, boxes=[], overlay_ref=None, late=late,
                dropped=frame.dropped_before,
            )
            media = Media()
            if amap is not None:
                result.max_pixel_score = float(amap.max())
                result.anomalous_area, result.boxes = regions_from_map(amap, th.theta, frame.image.shape[:2])
                if result.flagged and self.overlays:
                    t1 = time.perf_counter()
                    media = self._media(scene, frame, previous[i], amap, feats, i, res.neighbours[i])
                    result.evidence = media.evidence
                    self.stats.stage_seconds["overlay"] += time.perf_counter() - t1
            self.stats.escalated += amap is not None
            self.stats.flagged += result.flagged
            results.append((result, media))
        return results

    def _media(self, scene: Scene, frame: Frame, previous, amap, feats: Features, row: int, neighbours) -> Media:
        """What a flagged frame is reviewed with: overlay, stills, and the nearest normal patch."""
        preprocess = scene.model.bank_preprocess(scene.bank)
        image = preprocess.frame(frame.image)
        stills = Stills(encode_jpeg(image, STILL_QUALITY),
                        None if previous is None else encode_jpeg(preprocess.frame(previous), STILL_QUALITY))
        cfg = scene.model.config
        peak = peak_evidence(amap, {lv: feats.pyramid[lv][row] for lv in cfg.levels}, scene.bank.pyramid,
                             neighbours[: cfg.k_pixel], cfg.levels[0])
        evidence = {**peak.to_json(), "bank_version": scene.bank.version}
        return Media(encode_overlay(image, amap, scene.thresholds.theta), stills, evidence)
