"""Evaluation on MVTec-AD-layout image sets and on video anomaly datasets (Ped2, ShanghaiTech)."""
from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import metrics
from .calibrate import calibrate
from .datasets import VideoDataset, find_mvtec_categories, read_image
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


def smooth_scores(scores: np.ndarray, window: int) -> np.ndarray:
    """Causal moving average over `window` frames: what a live camera can compute too."""
    if window <= 1 or scores.size == 0:
        return scores
    csum = np.cumsum(np.concatenate([[0.0], scores]))
    idx = np.arange(1, scores.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


# -- MVTec AD layout ----------------------------------------------------------------------------
def evaluate_mvtec(root: str | Path, config: SpadeConfig, category: str | None = None,
                   pictures: str | Path | None = None, progress: bool = True, log=print) -> Report:
    cats = find_mvtec_categories(root)
    if category is not None:
        cats = [c for c in cats if c.name == category]
        if not cats:
            from .errors import DataError

            raise DataError(f"category '{category}' not found under {root}")
    spade = Spade(config)
    rows = {}
    for cat in cats:
        rows[cat.name] = _evaluate_category(spade, cat, pictures, progress, log)
    keys = ("image_rocauc", "pixel_rocauc", "pro")
    mean = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in keys}
    payload = {
        "dataset": "mvtec",
        "root": str(root),
        **mean,
        "categories": rows,
        "config": config.as_dict(),
        "precision": spade.extractor.precision,
        "device": str(spade.device),
        "throughput": {
            "test_images_per_s": float(np.mean([r["test_images_per_s"] for r in rows.values()])),
            "seconds": float(sum(r["seconds"] for r in rows.values())),
        },
        "peak_memory_mb": peak_memory_mb(),
    }
    table = _table(["category", "image ROCAUC", "pixel ROCAUC", "PRO", "img/s"],
                   [[n, r["image_rocauc"], r["pixel_rocauc"], r["pro"], r["test_images_per_s"]] for n, r in rows.items()]
                   + [["mean", mean["image_rocauc"], mean["pixel_rocauc"], mean["pro"], payload["throughput"]["test_images_per_s"]]])
    return Report(payload, table)


def _evaluate_category(spade: Spade, cat, pictures, progress, log) -> dict:
    t0 = time.perf_counter()
    c = spade.config
    bank = spade.build_bank(((0, read_image(p)) for p in cat.train_paths), [str(cat.root / "train")],
                            total=len(cat.train_paths), progress=progress)
    thresholds = calibrate(bank, c)
    preprocess = spade.bank_preprocess(bank)
    t_test = time.perf_counter()
    labels, scores, masks, maps, frames = [], [], [], [], []
    samples = cat.test_samples
    for start in range(0, len(samples), c.batch_size):
        chunk = samples[start : start + c.batch_size]
        images = [read_image(s.path) for s in chunk]
        res = spade.score(images, bank, maps="all")
        for s, img, score, amap in zip(chunk, images, res.image_scores, res.maps):
            labels.append(s.label)
            scores.append(float(score))
            masks.append(to_metric_size(preprocess.geometry(cat.load_mask(s), cv2.INTER_NEAREST), nearest=True))
            maps.append(to_metric_size(amap))
            if pictures:
                frames.append(cv2.resize(preprocess.frame(img), METRIC_SIZE[::-1]))
    test_s = time.perf_counter() - t_test
    masks_a, maps_a = np.stack(masks) > 0, np.stack(maps)
    row = {
        "image_rocauc": metrics.rocauc(labels, scores),
        "pixel_rocauc": metrics.pixel_rocauc(masks_a, maps_a),
        "pro": metrics.pro_score(masks_a, maps_a),
        "train_images": len(cat.train_paths),
        "bank_frames": len(bank),
        "test_images": len(samples),
        "test_images_per_s": len(samples) / test_s,
        "seconds": time.perf_counter() - t0,
        "thresholds": {k: thresholds[k] for k in ("tau", "theta")},
    }
    log(f"{cat.name}: image {row['image_rocauc']:.3f} pixel {row['pixel_rocauc']:.3f} pro {row['pro']:.3f}")
    if pictures:
        names = [f"{s.defect}_{s.path.stem}" for s in samples]
        _write_cases(Path(pictures) / _safe(cat.name), frames, maps_a, masks_a, np.array(labels),
                     np.array(scores), names, thresholds)
    return row


# -- video anomaly datasets ---------------------------------------------------------------------
def evaluate_video(root: str | Path, config: SpadeConfig, layout: str | None = None,
                   pictures: str | Path | None = None, progress: bool = True, log=print) -> Report:
    data = VideoDataset(root, layout)
    spade = Spade(config)
    all_labels, all_scores, clip_rows = [], [], {}
    mask_list, map_list = [], []
    frames_scored, score_seconds, build_seconds = 0, 0.0, 0.0
    for scene in data.scenes():
        t0 = time.perf_counter()
        train = data.train_clips(scene)
        sources = [str(c.video_path or c.frame_paths[0].parent) for c in train]
        pairs = ((i, f) for i, clip in enumerate(train) for f in clip.frames())
        bank = spade.build_bank(pairs, sources, total=sum(len(c) for c in train), progress=progress)
        thresholds = calibrate(bank, config)
        build_seconds += time.perf_counter() - t0
        preprocess = spade.bank_preprocess(bank)
        for clip in data.test_clips(scene):
            t1 = time.perf_counter()
            raw, kept_frames, clip_maps = [], [], []
            for i, (frame, score, amap) in enumerate(spade.iter_scores(clip.frames(), bank, maps="all")):
                raw.append(score)
                m = clip.mask(i)
                clip_maps.append(to_metric_size(amap))
                if m is not None:
                    mask_list.append(to_metric_size(preprocess.geometry(m, cv2.INTER_NEAREST), nearest=True) > 0)
                    map_list.append(clip_maps[-1])
                if pictures:
                    kept_frames.append(cv2.resize(preprocess.frame(frame), METRIC_SIZE[::-1]))
            score_seconds += time.perf_counter() - t1
            frames_scored += len(raw)
            scores = smooth_scores(np.asarray(raw, dtype=np.float64), config.temporal_window)
            labels = np.asarray(clip.labels[: len(scores)])
            all_labels.append(labels)
            all_scores.append(scores)
            clip_rows[f"{scene}/{clip.name}"] = {
                "frames": int(len(scores)), "anomalous": int(labels.sum()),
                "frame_rocauc": metrics.rocauc(labels, scores),
            }
            log(f"{scene}/{clip.name}: {len(scores)} frames, frame ROCAUC {clip_rows[f'{scene}/{clip.name}']['frame_rocauc']:.3f}")
            if pictures:
                out = Path(pictures) / _safe(scene)
                from .visualize import save_score_timeline

                save_score_timeline(out / f"timeline_{_safe(clip.name)}.png", scores, labels=labels,
                                    threshold=None if config.image_score != "dn2" else thresholds["tau"],
                                    title=f"{scene} / {clip.name}")
                masks_clip = np.stack([to_metric_size(preprocess.geometry(clip.mask(i), cv2.INTER_NEAREST), nearest=True) > 0
                                       if clip.mask(i) is not None else np.zeros(METRIC_SIZE, bool)
                                       for i in range(len(scores))])
                _write_cases(out / _safe(clip.name), kept_frames, np.stack(clip_maps), masks_clip, labels,
                             scores, [f"{i:04d}" for i in range(len(scores))], thresholds)
    labels_all, scores_all = np.concatenate(all_labels), np.concatenate(all_scores)
    macro = [r["frame_rocauc"] for r in clip_rows.values() if not np.isnan(r["frame_rocauc"])]
    pixel = metrics.pixel_rocauc(np.stack(mask_list), np.stack(map_list)) if mask_list else float("nan")
    payload = {
        "dataset": "video",
        "layout": data.layout,
        "root": str(root),
        "frame_rocauc_micro": metrics.rocauc(labels_all, scores_all),
        "frame_rocauc_macro": float(np.mean(macro)) if macro else float("nan"),
        "pixel_rocauc": pixel,
        "clips": clip_rows,
        "config": config.as_dict(),
        "precision": spade.extractor.precision,
        "device": str(spade.device),
        "throughput": {"test_frames_per_s": frames_scored / max(score_seconds, 1e-9),
                       "bank_build_seconds": build_seconds, "test_frames": frames_scored},
        "peak_memory_mb": peak_memory_mb(),
    }
    table = _table(["clip", "frames", "anomalous", "frame ROCAUC"],
                   [[n, r["frames"], r["anomalous"], r["frame_rocauc"]] for n, r in clip_rows.items()]
                   + [["micro (pooled)", len(scores_all), int(labels_all.sum()), payload["frame_rocauc_micro"]],
                      ["macro (per clip)", "", "", payload["frame_rocauc_macro"]],
                      ["pixel ROCAUC", "", "", pixel]])
    return Report(payload, table)


# -- pictures and tables ------------------------------------------------------------------------
def _write_cases(out: Path, frames, maps, masks, labels, scores, names, thresholds, top: int = 6) -> None:
    """Overlays for the highest-scoring anomalies, the missed anomalies and the false alarms."""
    from .visualize import heatmap_overlay, save_image

    order = np.argsort(-scores)
    anomalous = [i for i in order if labels[i] == 1]
    normal = [i for i in order if labels[i] == 0]
    cases = {"top": anomalous[:top], "missed": anomalous[::-1][:top], "false_alarm": normal[:top]}
    vmax = float(np.quantile(maps, 0.999))
    for kind, idx in cases.items():
        for i in idx:
            img = heatmap_overlay(frames[i], maps[i], threshold=thresholds["theta"], gt_mask=masks[i],
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
