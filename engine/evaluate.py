"""Evaluation on MVTec-AD-layout image sets and on video anomaly datasets (Ped2, ShanghaiTech)."""
from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import accuracy
from .calibrate import calibrate
from .datasets import VideoDataset, find_mvtec_categories, read_image
from .datasets.readers import VideoLayout
from .decision import FrameScorer, Thresholds
from .errors import DataError
from .progress import Progress
from .spade import Spade, SpadeConfig

METRIC_SIZE = (256, 256)  # the paper reports every metric at 256x256


@dataclass
class Report:
    """What an evaluation returns: the JSON payload and the table printed for people."""

    payload: dict
    table: str

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.payload, indent=2) + "\n")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def to_metric_size(image: np.ndarray, nearest: bool = False) -> np.ndarray:
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(image, METRIC_SIZE[::-1], interpolation=interp)


# -- MVTec AD layout ----------------------------------------------------------------------------
def evaluate_mvtec(root: str | Path, config: SpadeConfig, category: str | None = None,
                   pictures: str | Path | None = None, progress: bool = True, log=print) -> Report:
    cats = find_mvtec_categories(root)
    if category is not None:
        cats = [c for c in cats if c.name == category]
        if not cats:
            raise DataError(f"category '{category}' not found under {root}")
    spade = Spade(config)
    rows = {}
    for cat in cats:
        rows[cat.name] = _evaluate_category(spade, cat, pictures, progress, log)
    keys = ("image_rocauc", "pixel_rocauc", "pro")
    mean = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in keys}
    images_per_s = float(np.mean([r["test_images_per_s"] for r in rows.values()]))
    payload = {
        "dataset": "mvtec",
        "root": str(root),
        **mean,
        "categories": rows,
        "config": config.as_dict(),
        "precision": spade.extractor.precision,
        "device": str(spade.device),
        "throughput": {
            "test_images_per_s": images_per_s,
            "seconds": float(sum(r["seconds"] for r in rows.values())),
        },
        "peak_memory_mb": peak_memory_mb(),
    }
    table = _table(["category", "image ROCAUC", "pixel ROCAUC", "PRO", "img/s"],
                   [[n, r["image_rocauc"], r["pixel_rocauc"], r["pro"], r["test_images_per_s"]] for n, r in rows.items()]
                   + [["mean", mean["image_rocauc"], mean["pixel_rocauc"], mean["pro"], images_per_s]])
    return Report(payload, table)


def _evaluate_category(spade: Spade, cat, pictures, progress, log) -> dict:
    t0 = time.perf_counter()
    c = spade.config
    bank = spade.build_bank(((0, read_image(p)) for p in cat.train_paths), [str(cat.root / "train")],
                            total=len(cat.train_paths), progress=progress)
    calibration = calibrate(bank, c, progress=progress)
    preprocess = spade.bank_preprocess(bank)
    t_test = time.perf_counter()
    labels, scores, masks, maps, frames = [], [], [], [], []
    samples = cat.test_samples
    bar = Progress(f"{cat.name}: scoring test images", len(samples), unit="image", enabled=progress)
    for start in range(0, len(samples), c.batch_size):
        chunk = samples[start : start + c.batch_size]
        bar.update(len(chunk))
        images = [read_image(s.path) for s in chunk]
        res = spade.score(images, bank, maps="all")
        assert res.maps is not None  # maps="all"
        for s, img, score, amap in zip(chunk, images, res.image_scores, res.maps):
            labels.append(s.label)
            scores.append(float(score))
            masks.append(to_metric_size(preprocess.geometry(cat.load_mask(s), cv2.INTER_NEAREST), nearest=True))
            maps.append(to_metric_size(amap))
            if pictures:
                frames.append(cv2.resize(preprocess.frame(img), METRIC_SIZE[::-1]))
    bar.close()
    test_s = time.perf_counter() - t_test
    masks_a, maps_a = np.stack(masks) > 0, np.stack(maps)
    row = {
        "image_rocauc": accuracy.rocauc(labels, scores),
        "pixel_rocauc": accuracy.pixel_rocauc(masks_a, maps_a),
        "pro": accuracy.pro_score(masks_a, maps_a),
        "train_images": len(cat.train_paths),
        "bank_frames": len(bank),
        "test_images": len(samples),
        "test_images_per_s": len(samples) / test_s,
        "seconds": time.perf_counter() - t0,
        "thresholds": {"tau": calibration.tau, "theta": calibration.theta},
    }
    log(f"{cat.name}: image {row['image_rocauc']:.3f} pixel {row['pixel_rocauc']:.3f} pro {row['pro']:.3f}")
    if pictures:
        names = [f"{s.defect}_{s.path.stem}" for s in samples]
        _write_cases(Path(pictures) / _safe(cat.name), frames, maps_a, masks_a, np.array(labels),
                     np.array(scores), names, calibration.theta)
    return row


# -- video anomaly datasets ---------------------------------------------------------------------
@dataclass
class ClipScores:
    """One stream's frame scores, every frame matched and as the live engine decides them."""

    matched: np.ndarray  # smoothed image scores with a map for every frame
    matched_flags: np.ndarray
    deployed: np.ndarray  # smoothed image scores with the live gate and escalation
    deployed_flags: np.ndarray
    escalated: np.ndarray  # the gate let the frame through to pixel matching


def score_clip(spade: Spade, bank, thresholds: Thresholds, frames, on_frame=None) -> ClipScores:
    """Score one stream's frames in order; on_frame(i, frame, map) sees each frame's map.

    Every frame is matched once: the deployed score is the matched one where the gate
    escalates, and the scene's normal score elsewhere, exactly as engine.decision decides it.
    """
    c = spade.config
    matched = FrameScorer(thresholds, c.temporal_window, c.map_scored)
    deployed = FrameScorer(thresholds, c.temporal_window, c.map_scored)
    rows = []
    for i, (frame, raw, amap, gate) in enumerate(spade.iter_scores(frames, bank, maps="all")):
        escalated = gate > thresholds.gate_tau
        rows.append((*matched(None, raw), *deployed(None, raw if escalated or not c.map_scored else float("nan")), escalated))
        if on_frame is not None:
            on_frame(i, frame, amap)
    a = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return ClipScores(a[:, 0], a[:, 1] > 0, a[:, 2], a[:, 3] > 0, a[:, 4] > 0)


def frame_figures(per_clip: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Frame ROC AUC micro, macro and worst clip, and the operating point at tau, from
    (labels, scores, flags) per clip. Macro and worst count clips that have both classes."""
    labels = np.concatenate([v[0] for v in per_clip.values()])
    scores = np.concatenate([v[1] for v in per_clip.values()])
    per = [accuracy.rocauc(y, s) for y, s, _ in per_clip.values()]
    per = [a for a in per if not np.isnan(a)]
    return {
        "frame_rocauc_micro": accuracy.rocauc(labels, scores),
        "frame_rocauc_macro": float(np.mean(per)) if per else float("nan"),
        "frame_rocauc_worst_clip": float(np.min(per)) if per else float("nan"),
        "operating_point": accuracy.operating_point([(y, f) for y, _, f in per_clip.values()]),
    }


def evaluate_video(root: str | Path, config: SpadeConfig, layout: VideoLayout | None = None,
                   pictures: str | Path | None = None, progress: bool = True, log=print,
                   clips: list[str] | None = None) -> Report:
    """Frame and pixel figures per test clip; `clips` keeps only the test clips of those names
    (e.g. one half of the clips, to report settings chosen on the other half)."""
    data = VideoDataset(root, layout)
    spade = Spade(config)
    clip_rows: dict[str, dict] = {}
    matched, deployed = {}, {}
    pixel_auc = accuracy.StreamingPixelAUC()
    frames_scored, escalated, score_seconds, build_seconds = 0, 0, 0.0, 0.0
    for scene in data.scenes():
        test_clips = [c for c in data.test_clips(scene) if clips is None or c.name in clips]
        if not test_clips:
            continue
        t0 = time.perf_counter()
        bank = _scene_bank(spade, data.train_clips(scene), progress)
        thresholds = Thresholds.of_bank(bank, config.image_score)
        build_seconds += time.perf_counter() - t0
        preprocess = spade.bank_preprocess(bank)
        bar = Progress(f"{scene}: scoring test frames", sum(len(c) for c in test_clips), enabled=progress)
        for clip in test_clips:
            t1 = time.perf_counter()
            kept_frames, clip_maps, clip_masks = [], [], []

            def on_frame(i, frame, amap):
                bar.update()
                m = clip.mask(i)
                amap = to_metric_size(amap)
                mask = (to_metric_size(preprocess.geometry(m, cv2.INTER_NEAREST), nearest=True) > 0
                        if m is not None else None)
                if mask is not None:
                    pixel_auc.add(mask, amap)
                if pictures:
                    kept_frames.append(cv2.resize(preprocess.frame(frame), METRIC_SIZE[::-1]))
                    clip_maps.append(amap)
                    clip_masks.append(mask if mask is not None else np.zeros(METRIC_SIZE, bool))

            res = score_clip(spade, bank, thresholds, clip.frames(), on_frame)
            score_seconds += time.perf_counter() - t1
            frames_scored += len(res.matched)
            escalated += int(res.escalated.sum())
            labels = np.asarray(clip.labels[: len(res.matched)])
            name = f"{scene}/{clip.name}"
            matched[name] = (labels, res.matched, res.matched_flags)
            deployed[name] = (labels, res.deployed, res.deployed_flags)
            r = clip_rows[name] = _clip_row(labels, res)
            log(f"{name}: {len(labels)} frames, frame ROCAUC {r['frame_rocauc']:.3f} "
                f"(as deployed {r['frame_rocauc_as_deployed']:.3f})")
            if pictures:
                from .visualize import save_score_timeline

                out = Path(pictures) / _safe(scene)
                save_score_timeline(out / f"timeline_{_safe(clip.name)}.png", res.deployed, labels=labels,
                                    threshold=thresholds.tau, title=f"{scene} / {clip.name} (as deployed)")
                _write_cases(out / _safe(clip.name), kept_frames, np.stack(clip_maps), np.stack(clip_masks), labels,
                             res.matched, [f"{i:04d}" for i in range(len(labels))], thresholds.theta)
        bar.close()
    if not clip_rows:
        raise DataError(f"no test clip of {root} matches --clips {','.join(clips or [])}")
    every = frame_figures(matched)
    as_deployed = frame_figures(deployed)
    as_deployed["escalated_fraction"] = escalated / max(frames_scored, 1)
    payload = {
        "dataset": "video",
        "layout": data.layout,
        "root": str(root),
        **every,
        "pixel_rocauc": pixel_auc.value(),
        "as_deployed": as_deployed,
        "clips": clip_rows,
        "config": config.as_dict(),
        "precision": spade.extractor.precision,
        "device": str(spade.device),
        "throughput": {"test_frames_per_s": frames_scored / max(score_seconds, 1e-9),
                       "bank_build_seconds": build_seconds, "test_frames": frames_scored},
        "peak_memory_mb": peak_memory_mb(),
    }
    return Report(payload, _video_table(clip_rows, every, as_deployed, payload["pixel_rocauc"], thresholds.tau))


def _scene_bank(spade: Spade, train: list, progress: bool):
    """The scene's calibrated bank from its training clips."""
    pairs = ((i, f) for i, clip in enumerate(train) for f in clip.frames())
    bank = spade.build_bank(pairs, [str(c.source) for c in train], total=sum(len(c) for c in train),
                            progress=progress)
    calibrate(bank, spade.config, progress=progress)
    return bank


def _clip_row(labels: np.ndarray, res) -> dict:
    """One test clip's figures, with every frame matched and as deployed."""
    return {
        "frames": int(len(labels)), "anomalous": int(labels.sum()),
        "frame_rocauc": accuracy.rocauc(labels, res.matched),
        "frame_rocauc_as_deployed": accuracy.rocauc(labels, res.deployed),
        "escalated": int(res.escalated.sum()),
        "recall_at_tau": float(res.deployed_flags[labels > 0].mean()) if labels.any() else float("nan"),
        "false_alarm_rate_at_tau": float(res.deployed_flags[labels == 0].mean()) if (labels == 0).any() else float("nan"),
    }


def _video_table(clip_rows: dict, every: dict, as_deployed: dict, pixel_rocauc: float, tau: float) -> str:
    n_frames = sum(r["frames"] for r in clip_rows.values())
    n_anom = sum(r["anomalous"] for r in clip_rows.values())
    table = _table(["clip", "frames", "anomalous", "frame ROCAUC", "as deployed", "recall@tau", "false alarms@tau"],
                   [[n, r["frames"], r["anomalous"], r["frame_rocauc"], r["frame_rocauc_as_deployed"],
                     r["recall_at_tau"], r["false_alarm_rate_at_tau"]] for n, r in clip_rows.items()]
                   + [["micro (pooled)", n_frames, n_anom, every["frame_rocauc_micro"], as_deployed["frame_rocauc_micro"],
                        as_deployed["operating_point"]["recall"], as_deployed["operating_point"]["false_alarm_rate"]],
                      ["macro (per clip)", "", "", every["frame_rocauc_macro"], as_deployed["frame_rocauc_macro"], "", ""],
                      ["worst clip", "", "", every["frame_rocauc_worst_clip"], as_deployed["frame_rocauc_worst_clip"], "", ""],
                      ["pixel ROCAUC", "", "", pixel_rocauc, "", "", ""]])
    op = as_deployed["operating_point"]
    return table + (f"\nas deployed at tau {tau:.4g}: {op['recall']:.1%} of anomalous frames flagged, "
                    f"{op['false_alarm_rate']:.1%} of normal frames; {op['stretches_flagged']}/{op['stretches_total']} "
                    f"anomalous stretches flagged, median {op['median_frames_to_flag']} frames after their start; "
                    f"{as_deployed['escalated_fraction']:.0%} of frames escalated")


# -- pictures and tables ------------------------------------------------------------------------
def _write_cases(out: Path, frames, maps, masks, labels, scores, names, theta: float, top: int = 6) -> None:
    """Overlays for the highest-scoring anomalies, the missed anomalies and the false alarms."""
    from .visualize import heatmap_overlay, save_image

    order = np.argsort(-scores)
    anomalous = [i for i in order if labels[i] == 1]
    normal = [i for i in order if labels[i] == 0]
    cases = {"top": anomalous[:top], "missed": anomalous[::-1][:top], "false_alarm": normal[:top]}
    vmax = float(np.quantile(maps, 0.999))
    for kind, idx in cases.items():
        for i in idx:
            img = heatmap_overlay(frames[i], maps[i], threshold=theta, gt_mask=masks[i],
                                  vmin=0.0, vmax=vmax)
            save_image(out / f"{kind}_{_safe(names[i])}_score{scores[i]:.3f}.png", img)


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:80] or "_"


def _table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.3f}"
        return str(v)

    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
