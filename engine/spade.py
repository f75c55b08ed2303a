"""SPADE: reference banks from normal frames, DN2 image scores, and pixel anomaly maps."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Features, build_backbone
from .bank import ReferenceBank, kcenter_greedy, uniform_subsample
from .decision import Thresholds
from .errors import ConfigError
from .features import FeatureExtractor
from .gate import dn2_scores, knn
from .gate import prepare as prepare_gate
from .matcher import anomaly_maps, match_dtype
from .motion import FlowEstimator, grey_frames, motion_channels, stream_flows
from .preprocess import Preprocess, encode_jpeg
from .progress import Progress

REFERENCE_JPEG_QUALITY = 85  # reference frames are only looked at: small beats exact


@dataclass
class SpadeConfig:
    backbone: str = "efficientnet_lite0"
    weights: str | None = None  # explicit weights file; default: packaged / torch hub cache
    # Geometry: "crop" resizes to `resize` and centre-crops `crop` (MVTec); "full" resizes the whole
    # frame to frame_size, or keeps the native size when frame_size is None (cameras).
    geometry: str = "full"
    resize: int = 256
    crop: int = 224
    frame_size: tuple[int, int] | None = None
    levels: tuple[str, ...] = ("s8", "s16")
    k_image: int = 10  # K of the DN2 gate
    k_pixel: int = 10  # K nearest frames whose galleries pixel matching searches
    normalize_global: bool = True  # L2-normalise the global feature before DN2
    sigma: float = 4.0
    # "dn2" (global kNN), "map_max" (peak of the anomaly map) or "map_top" (mean of the map's
    # top_fraction of pixels: an anomaly covering an area outscores one unusual-looking walker).
    image_score: str = "dn2"
    top_fraction: float = 0.01
    temporal_window: int = 1  # frames averaged into a video frame score (1 = none)
    # Weight of each pyramid cell's change since the stream's previous frame, appended to its
    # features: speed tells a cyclist from a walker where appearance alone does not.
    temporal_diff: float = 0.0
    # Weight of each cell's optical-flow velocity, appended likewise (engine/motion.py). A cell
    # moves 1-3 px a frame while appearance distances are 30-140: weights that matter are 10-50.
    motion_weight: float = 0.0
    image_quantile: float = 0.99  # tau = this quantile of held-out normal image scores
    gate_quantile: float = 0.9  # gate_tau for map scores: the gate-score quantile that escalates
    # "dn2": global-feature kNN; "coarse": the deepest level's cell distances to the nearest
    # frame, which small objects move where they hardly move a global feature.
    gate: str = "dn2"
    # The coarse gate's score: mean of this fraction of the largest cell distances (0 = the peak).
    gate_top_fraction: float = 0.0
    pixel_quantile: float = 0.999  # theta = this quantile of held-out normal pixel scores
    max_frames: int = 5000
    subsample: str = "uniform"  # or "kcenter"
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self):
        self.levels = tuple(self.levels)
        if self.frame_size is not None:
            self.frame_size = tuple(int(v) for v in self.frame_size)
        checks = {
            "geometry": (self.geometry, ("full", "crop")),
            "image_score": (self.image_score, ("dn2", "map_max", "map_top")),
            "subsample": (self.subsample, ("uniform", "kcenter")),
            "gate": (self.gate, ("dn2", "coarse")),
            "precision": (self.precision, ("auto", "fp32", "bf16", "fp16")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
        for level in self.levels:
            if level not in ("s4", "s8", "s16", "s32"):
                raise ConfigError(f"levels: '{level}' is not one of s4, s8, s16, s32")
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction: {self.top_fraction} is not in (0, 1]")
        if not 0 <= self.gate_top_fraction <= 1:
            raise ConfigError(f"gate_top_fraction: {self.gate_top_fraction} is not in [0, 1]")
        if min(self.k_image, self.k_pixel, self.max_frames, self.batch_size, self.temporal_window) < 1:
            raise ConfigError("k_image, k_pixel, max_frames, batch_size and temporal_window must be >= 1")

    @property
    def map_scored(self) -> bool:
        """The image score comes from the anomaly map, so a frame without one has none."""
        return self.image_score != "dn2"

    def replace(self, **changes) -> "SpadeConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        d["frame_size"] = list(self.frame_size) if self.frame_size else None
        return d


# One configuration per kind of data, chosen by what the data is, never per clip.
PRESETS: dict[str, SpadeConfig] = {
    # The paper, as published: Wide-ResNet50-2, layer1-3, K=50, 256 -> 224 crop.
    "paper": SpadeConfig(backbone="wide_resnet50_2", geometry="crop", levels=("s4", "s8", "s16"),
                         k_image=50, k_pixel=50, normalize_global=False, image_score="dn2"),
    # The paper's STC setting: 256x256 full frames, K=1.
    "paper-stc": SpadeConfig(backbone="wide_resnet50_2", geometry="full", frame_size=(256, 256),
                             levels=("s4", "s8", "s16"), k_image=1, k_pixel=1,
                             normalize_global=False, image_score="dn2"),
    # Fixed cameras: native resolution, change and motion channels, frame score = mean of the
    # map's top 1%, smoothed over frames. Chosen on held-out halves of the dev clips (README).
    "camera": SpadeConfig(geometry="full", levels=("s8", "s16"), k_image=10, k_pixel=10,
                          image_score="map_top", temporal_window=5, temporal_diff=1.0, motion_weight=32.0,
                          gate="coarse", gate_top_fraction=0.1),
    # Inspection images (MVTec layout): the paper's crop, deeper levels for large diffuse defects,
    # image score = mean of the map's top 5% (chosen on held-out defect types, README).
    "inspection": SpadeConfig(geometry="crop", levels=("s8", "s16", "s32"), k_image=10, k_pixel=10,
                              image_score="map_top", top_fraction=0.05),
}


def preset(name: str, **overrides) -> SpadeConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return PRESETS[name].replace(**overrides)


@dataclass
class ScoreResult:
    image_scores: np.ndarray  # (B,) DN2 scores, or map scores (map_max, map_top), NaN where no map
    dn2_scores: np.ndarray  # (B,)
    neighbours: np.ndarray  # (B, K) bank indices, nearest first
    maps: np.ndarray | None = None  # (B, H, W) at the model input size, None where not computed
    map_rows: list[int] = field(default_factory=list)  # which frames of the batch have maps
    gate_scores: np.ndarray | None = None  # (B,) what the gate compares with gate_tau; None for maps="none"
    gate_seconds: float = 0.0  # kNN and gate, for the service's stage metrics
    match_seconds: float = 0.0  # pixel matching of the escalated frames


def top_count(fraction: float, n: int) -> int:
    """How many of n values "the top `fraction`" means: at least one (fraction 0 = the peak)."""
    return max(1, int(round(fraction * n)))


def map_image_scores(maps: np.ndarray, config: SpadeConfig) -> np.ndarray:
    """(B,) image scores of (B, H, W) anomaly maps: their peak, or the mean of their top pixels."""
    flat = maps.reshape(len(maps), -1)
    if config.image_score == "map_max":
        return flat.max(1)
    k = top_count(config.top_fraction, flat.shape[1])
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(1)


def coarse_gate_scores(query_pyramid: dict, bank_pyramid: dict, neighbours: torch.Tensor,
                       level: str, top_fraction: float = 0.0,
                       search_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of the largest distances of each frame's `level` cells (the top `top_fraction`; 0 =
    the peak) to the cells of its nearest reference frame.

    At stride 16 this costs a few percent of full pixel matching. A mean over an area lets a
    frame through on a moving object rather than on its single most unusual cell, which any
    walker can supply.
    """
    q = query_pyramid[level]
    maps = anomaly_maps({level: q}, bank_pyramid, neighbours[:, :1], tuple(q.shape[2:]), sigma=0.0,
                        search_dtype=search_dtype).flatten(1)
    return maps.topk(top_count(top_fraction, maps.shape[1]), dim=1).values.mean(1)


def score_features(config: SpadeConfig, feats: Features, bank: ReferenceBank, maps: str = "flagged",
                   tau: float | None = None, search_dtype: torch.dtype | None = None,
                   candidates: torch.Tensor | None = None) -> ScoreResult:
    """kNN, gate and pixel matching of a batch's features against a bank: the one scoring chain
    of evaluate, calibration and the live engine.

    maps: "all" computes anomaly maps for every frame, "flagged" only for frames whose gate
    score exceeds tau (default: the bank's calibrated gate_tau), "none" for none. With
    a map image score, image_scores hold it where a map was computed and NaN
    elsewhere (an unescalated frame is below the gate, hence normal; engine.decision scores it).
    candidates restricts the reference frames searched (calibration's held-out folds).
    """
    c = config
    size = bank.input_size
    t0 = time.perf_counter()
    gallery = bank.global_feats if candidates is None else bank.global_feats[candidates]
    k = min(max(c.k_image, c.k_pixel), gallery.shape[0])
    d2, idx = knn(feats.global_, gallery, k)
    if candidates is not None:
        idx = candidates.to(idx.device)[idx]
    dn2 = d2[:, : c.k_image].mean(1)
    batch = dn2.shape[0]
    gate = None  # maps="none" decides no escalation, so a coarse gate's cost is not paid
    if c.gate == "dn2":
        gate = dn2
    elif maps != "none":
        gate = coarse_gate_scores(feats.pyramid, bank.pyramid, idx, c.levels[-1], c.gate_top_fraction, search_dtype)
    if maps == "all":
        rows = list(range(batch))
    elif maps == "flagged":
        if tau is None:
            tau = Thresholds.of_bank(bank, c.image_score).gate_tau
        assert gate is not None  # set above whenever maps are wanted
        rows = torch.nonzero(gate > tau).flatten().tolist()
    else:
        rows = []
    out_maps = None
    t1 = time.perf_counter()
    if rows:
        sel = torch.tensor(rows, device=dn2.device)
        pyr = {lv: feats.pyramid[lv][sel].float() for lv in c.levels}
        out_maps = anomaly_maps(pyr, bank.pyramid, idx[sel, : c.k_pixel], size, sigma=c.sigma,
                                search_dtype=search_dtype).cpu().numpy()
    t2 = time.perf_counter()
    image_scores = dn2.cpu().numpy()
    if c.map_scored:
        image_scores = np.full(batch, np.nan, dtype=np.float32)
        if out_maps is not None:
            image_scores[rows] = map_image_scores(out_maps, c)
    return ScoreResult(image_scores=image_scores, dn2_scores=dn2.cpu().numpy(),
                       neighbours=idx.cpu().numpy(), maps=out_maps, map_rows=rows,
                       gate_scores=None if gate is None else gate.float().cpu().numpy(), gate_seconds=t1 - t0, match_seconds=t2 - t1)


class Spade:
    """The SPADE model: one backbone plus the settings; a bank supplies each scene's data."""

    def __init__(self, config: SpadeConfig, extractor: FeatureExtractor | None = None):
        """`extractor` lets scenes with the same backbone share one model in memory."""
        self.config = config
        if extractor is None:
            backbone = build_backbone(config.backbone, config.weights)
            extractor = FeatureExtractor(backbone, config.levels, config.device, config.precision)
        self.extractor = extractor
        self.backbone = extractor.backbone
        self._flow: FlowEstimator | None = None  # built on first use: only motion configs need it

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    @property
    def search_dtype(self) -> torch.dtype | None:
        """Pixel matching's search dtype: reduced with the backbone's precision, None = fp32."""
        return match_dtype(self.extractor.precision, self.device)

    def preprocess_for(self, frame_shape: tuple[int, ...]) -> Preprocess:
        c = self.config
        if c.geometry == "crop":
            return Preprocess.resize_crop(c.resize, c.crop)
        h, w = c.frame_size or frame_shape[:2]
        return Preprocess.full_frame(h, w)

    @classmethod
    def for_bank(cls, bank: ReferenceBank, extractor: FeatureExtractor | None = None, **overrides) -> "Spade":
        """The model a bank was built with, with run-time settings (device, K...) overridden."""
        fields = SpadeConfig.__dataclass_fields__
        stored = {k: v for k, v in bank.stored_config.items() if k in fields}
        stored.update({k: v for k, v in overrides.items() if v is not None})
        model = cls(SpadeConfig(**stored), extractor=extractor)
        bank.check_compatible(model.model_meta(model.bank_preprocess(bank)), bank.scene or "bank")
        return model

    def pass_key(self, bank: ReferenceBank) -> tuple:
        """Frames of scenes with equal keys share one backbone pass: same extractor, same input
        size, same feature layout."""
        c = self.config
        return id(self.extractor), bank.input_size, c.normalize_global, c.temporal_diff, c.motion_weight

    def model_meta(self, preprocess: Preprocess) -> dict:
        c = self.config
        return {
            "backbone": c.backbone,
            "weights_id": self.backbone.weights_id,
            "preprocess": preprocess.describe(),
            "levels": list(c.levels),
            "normalize_global": c.normalize_global,
            "temporal_diff": c.temporal_diff,
            "motion_weight": c.motion_weight,
        }

    # -- features -------------------------------------------------------------------------------
    def features(self, frames: list[np.ndarray], preprocess: Preprocess, bgr: bool = False,
                 streams: list | None = None, context: dict | None = None) -> Features:
        """Backbone features of a batch, with temporal channels when the config asks for them.

        streams names the stream (camera, clip) of each frame, in order; context maps a stream
        to the raw pyramid of its last frame and is updated here. Without a previous frame
        (the first of a stream) a frame's change is zero.
        """
        batch = preprocess.batch(frames, bgr=bgr)
        feats = self.extractor(batch)
        if self.config.normalize_global:
            feats.global_ = F.normalize(feats.global_, dim=1)
        streams = streams or [None] * len(frames)
        context = {} if context is None else context
        if self.config.temporal_diff > 0:
            feats.pyramid = self._with_change(feats.pyramid, streams, context)
        if self.config.motion_weight > 0:
            feats.pyramid = self._with_motion(feats.pyramid, batch, streams, context)
        return feats

    def _with_motion(self, pyramid: dict[str, torch.Tensor], batch: torch.Tensor, streams: list,
                     context: dict) -> dict:
        if self._flow is None:
            self._flow = FlowEstimator()
        previous = {key: state["grey"] for key, state in context.items() if "grey" in state}
        flows = stream_flows(grey_frames(batch), streams, previous, self._flow)
        for key, grey in previous.items():
            if key is not None:
                context.setdefault(key, {})["grey"] = grey
        return {level: torch.cat([cur, motion_channels(flows, (cur.shape[2], cur.shape[3]), self.config.motion_weight,
                                                       cur.device)], dim=1)
                for level, cur in pyramid.items()}

    def _with_change(self, pyramid: dict[str, torch.Tensor], streams: list, context: dict) -> dict:
        w = self.config.temporal_diff
        prev_index = []  # for each frame: index of its predecessor in the batch, or -1
        last_in_batch: dict = {}
        for i, key in enumerate(streams):
            prev_index.append(last_in_batch.get(key, -1))
            last_in_batch[key] = i
        out = {}
        for level, cur in pyramid.items():
            prev = cur.clone()
            for i, key in enumerate(streams):
                if prev_index[i] >= 0:
                    prev[i] = cur[prev_index[i]]
                elif level in context.get(key, {}):
                    prev[i] = context[key][level].to(cur.device)
            out[level] = torch.cat([cur, w * (cur - prev)], dim=1)
        for key, i in last_in_batch.items():
            if key is not None:
                context.setdefault(key, {}).update({level: cur[i].clone() for level, cur in pyramid.items()})
        return out

    # -- reference banks ------------------------------------------------------------------------
    def build_bank(self, frames: Iterable[tuple[int, np.ndarray]], sources: list[str],
                   total: int | None = None, progress: bool = True, bgr: bool = False) -> ReferenceBank:
        """Features of normal frames given as (group, frame) pairs; group = clip or folder index.

        Memory stays within about twice max_frames: whenever the store reaches that, it is
        reduced to max_frames with the configured subsampling.
        """
        c = self.config
        preprocess = None
        store_g: list[torch.Tensor] = []
        store_p: dict[str, list[torch.Tensor]] = {lv: [] for lv in c.levels}
        store_grp: list[int] = []
        store_img: list[bytes] = []  # each kept frame's JPEG, for reviews of what matched it
        pending: list[np.ndarray] = []
        pending_grp: list[int] = []
        seen = 0

        context: dict = {}

        def flush():
            feats = self.features(pending, preprocess, bgr=bgr, streams=list(pending_grp), context=context)
            store_g.append(feats.global_.half().cpu())
            for lv in c.levels:
                store_p[lv].append(feats.pyramid[lv].half().cpu())
            store_grp.extend(pending_grp)
            store_img.extend(encode_jpeg(preprocess.frame(f, bgr=bgr), REFERENCE_JPEG_QUALITY) for f in pending)
            pending.clear()
            pending_grp.clear()

        def reduce():
            g = torch.cat(store_g)
            keep = self.subsample(g, c.max_frames)
            store_g[:] = [g[keep]]
            for lv in c.levels:
                store_p[lv][:] = [torch.cat(store_p[lv])[keep]]
            store_grp[:] = [store_grp[i] for i in keep.tolist()]
            store_img[:] = [store_img[i] for i in keep.tolist()]

        bar = Progress("reference frames", total, enabled=progress)
        for group, frame in frames:
            if preprocess is None:
                preprocess = self.preprocess_for(frame.shape)
            pending.append(frame)
            pending_grp.append(int(group))
            seen += 1
            if len(pending) == c.batch_size:
                flush()
                bar.update(c.batch_size)
                if len(store_grp) >= 2 * c.max_frames:
                    reduce()
        if pending:
            bar.update(len(pending))
            flush()
        bar.close()
        if preprocess is None:
            from .errors import DataError

            raise DataError(f"no frames found in {', '.join(sources) or 'the given sources'}: nothing to build a bank from")
        if len(store_grp) > c.max_frames:
            reduce()
        meta = self.model_meta(preprocess)
        meta.update({"sources": sources, "frames_seen": seen, "subsample": c.subsample,
                     "config": c.as_dict()})
        return ReferenceBank(
            global_feats=torch.cat(store_g),
            pyramid={lv: torch.cat(store_p[lv]) for lv in c.levels},
            groups=torch.tensor(store_grp, dtype=torch.int32),
            meta=meta,
            images=store_img,
        )

    def subsample(self, global_feats: torch.Tensor, budget: int) -> torch.Tensor:
        if self.config.subsample == "kcenter":
            return kcenter_greedy(global_feats, budget)
        return uniform_subsample(global_feats.shape[0], budget)

    # -- scoring --------------------------------------------------------------------------------
    def bank_preprocess(self, bank: ReferenceBank) -> Preprocess:
        return bank.preprocess

    def warm_up(self, bank: ReferenceBank, batch_size: int) -> None:
        """Run each kernel once and build the gate's index, so the first frames do not pay for
        it (on CUDA, every padded batch size is planned: see cuda_batch_bucket)."""
        self.extractor.warm_up(batch_size, bank.input_size)
        prepare_gate(bank.global_feats, self.device)  # the index lives where the queries are
        one = Features(global_=bank.global_feats[:1].float(),
                       pyramid={lv: bank.pyramid[lv][:1].float() for lv in self.config.levels})
        self.score_features(one, bank, maps="all")

    def score(self, frames: list[np.ndarray], bank: ReferenceBank, maps: str = "flagged",
              bgr: bool = False, tau: float | None = None, streams: list | None = None,
              context: dict | None = None) -> ScoreResult:
        """Score a batch of one scene's frames against its bank (see score_features)."""
        feats = self.features(frames, self.bank_preprocess(bank), bgr=bgr, streams=streams, context=context)
        return self.score_features(feats, bank, maps=maps, tau=tau)

    def score_features(self, feats, bank: ReferenceBank, maps: str = "flagged",
                       tau: float | None = None) -> ScoreResult:
        """Gate, then pixel matching for the frames that need it (see score_features below).

        Features of several scenes can share one backbone pass: slice them per scene.
        """
        return score_features(self.config, feats, bank, maps=maps, tau=tau, search_dtype=self.search_dtype)

    def iter_scores(self, frames: Iterable[np.ndarray], bank: ReferenceBank, maps: str = "all",
                    bgr: bool = False) -> Iterator[tuple[np.ndarray, float, np.ndarray | None, float]]:
        """(frame, raw image score, map or None, gate score or NaN) for each frame of one stream."""
        batch: list[np.ndarray] = []
        context: dict = {}

        def run():
            res = self.score(batch, bank, maps=maps, bgr=bgr, streams=[0] * len(batch), context=context)
            map_of = dict(zip(res.map_rows, res.maps if res.maps is not None else []))
            for i, f in enumerate(batch):
                gate = float("nan") if res.gate_scores is None else float(res.gate_scores[i])
                yield f, float(res.image_scores[i]), map_of.get(i), gate
            batch.clear()

        for frame in frames:
            batch.append(frame)
            if len(batch) == self.config.batch_size:
                yield from run()
        if batch:
            yield from run()


__all__ = ["PRESETS", "ScoreResult", "Spade", "SpadeConfig", "dn2_scores", "preset"]
