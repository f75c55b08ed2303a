"""The bench's component sections: backbone, gate and pixel matching, each against its baseline."""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np

from .common import Plan, _mode_name, time_call

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- sections

def _search(model) -> dict:
    """anomaly_maps' keyword for the reduced-precision search the engine uses with this model."""
    dtype = getattr(model, "search_dtype", None)
    return {} if dtype is None else {"search_dtype": dtype}


def _search_name(model) -> str:
    dtype = getattr(model, "search_dtype", None)
    return "fp32" if dtype is None else str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace(
        "float16", "fp16")


def gate_scores(model, bank, frames: list[np.ndarray], batch: int) -> np.ndarray:
    """The engine's escalation score of each frame of one camera, in order (see Spade.score_features)."""
    import torch

    prep = model.bank_preprocess(bank)
    context: dict = {}
    out = []
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        feats = model.features(chunk, prep, streams=["cam"] * len(chunk), context=context)
        res = model.score_features(feats, bank, maps="flagged", tau=float("inf"))  # the gate alone
        out.append(torch.from_numpy(res.gate_scores))
    return torch.cat(out).numpy()


def bench_backbone(spade, frames, plan: Plan, device, max_batch: int) -> dict:
    from engine.backbones import build_backbone
    from engine.features import FeatureExtractor

    c = spade.config
    prep = spade.preprocess_for(frames[0].shape)
    best = spade.extractor
    # The plain baseline: fp32, eager, one pass per batch, as a straightforward implementation runs.
    plain = FeatureExtractor(build_backbone(c.backbone, c.weights), c.levels, str(device), "fp32",
                             split_passes=False)
    out: dict[str, Any] = {}
    for name, extractor in (("best", best), ("fp32", plain)):
        fps = {}
        for b in plan.batch_sizes:
            batch = prep.batch([frames[i % len(frames)] for i in range(b)])
            seconds = time_call(lambda: extractor(batch), device, plan.min_time_s, warmup=2 if b <= 4 else 1)
            fps[str(b)] = b / seconds
        out[name] = {"mode": _mode_name(extractor.precision), "precision": extractor.precision,
                     "frames_per_s": fps}
    out["input_size"] = list(prep.size)
    out["engine_batch"] = max_batch
    return out


def bench_gate(model, bank, frames, plan: Plan, device, max_batch: int, backbone_s_per_batch: float) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.gate import index_bytes, knn
    from engine.spade import coarse_gate_scores

    c = model.config
    k = max(c.k_image, c.k_pixel)
    dev_bank = bank.to(device)
    feats = model.features([frames[i % len(frames)] for i in range(max_batch)], model.bank_preprocess(bank),
                           streams=["cam"] * max_batch, context={})
    query = feats.global_
    dim = query.shape[1]
    real = bank.global_feats.float()
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"k": k, "batch": max_batch, "dim": dim, "sizes": {}}

    def scene_like(n: int) -> torch.Tensor:
        ref = torch.empty(n, dim, dtype=torch.float16)
        for s in range(0, n, 8192):
            m = min(8192, n - s)
            i, j = torch.randint(0, len(real), (2, m), generator=gen)
            w = torch.rand(m, 1, generator=gen)
            ref[s : s + m] = F.normalize(w * real[i] + (1 - w) * real[j], dim=1).half()
        return ref.to(device)

    def isotropic(n: int) -> torch.Tensor:
        ref = torch.empty(n, dim, dtype=torch.float16)
        for s in range(0, n, 8192):
            m = min(8192, n - s)
            ref[s : s + m] = F.normalize(torch.randn(m, dim, generator=gen), dim=1).half()
        return ref.to(device)

    _, idx = knn(query, dev_bank.global_feats, k)
    level = c.levels[-1]
    coarse_s = time_call(lambda: coarse_gate_scores(feats.pyramid, dev_bank.pyramid, idx, level, c.gate_top_fraction, **_search(model)),
                         device, plan.min_time_s / 2)
    out["coarse_gate_ms"] = 1000 * coarse_s
    out["coarse_gate_level"] = c.levels[-1]
    out["coarse_gate_used"] = c.gate == "coarse"
    extra = coarse_s if c.gate == "coarse" else 0.0
    for n in plan.bank_sizes:
        row: dict[str, Any] = {}
        for kind, make in (("scene_like", scene_like), ("isotropic", isotropic)):
            ref = make(n)
            knn(query, ref, k)  # the first search is plain; the second builds the cached index
            t0 = time.perf_counter()
            knn(query, ref, k)
            build_s = time.perf_counter() - t0
            seconds = time_call(lambda: knn(query, ref, k), device, plan.min_time_s / 2, warmup=0)
            row[kind] = {"knn_ms": 1000 * seconds, "first_indexed_search_ms": 1000 * build_s,
                         "index_bytes_per_frame": index_bytes(ref) / n,
                         "gate_fraction": (seconds + extra) / backbone_s_per_batch}
        row["gate_ms"] = row["scene_like"]["knn_ms"] + 1000 * extra
        row["gate_fraction"] = row["scene_like"]["gate_fraction"]
        out["sizes"][str(n)] = row
    out["backbone_ms_per_batch"] = 1000 * backbone_s_per_batch
    largest = str(plan.bank_sizes[-1])
    out["largest_bank"] = plan.bank_sizes[-1]
    out["gate_fraction_at_largest"] = out["sizes"][largest]["gate_fraction"]
    return out


def bench_matching(model, bank, frames, plan: Plan, device) -> dict:
    from engine.gate import knn
    from engine.matcher import anomaly_maps, anomaly_maps_bruteforce

    c = model.config
    size = bank.input_size
    dev_bank = bank.to(device)
    # frames 1..match_frames: a stream's first frame has no temporal change yet
    n = min(len(frames), plan.match_frames + 1)
    feats = model.features(frames[:n], model.bank_preprocess(bank), streams=["cam"] * n, context={})
    ks = [k for k in plan.ks if k <= len(bank)]
    _, idx = knn(feats.global_, dev_bank.global_feats, max(ks))
    sel = list(range(1, n)) or [0]
    out = {"bank_frames": len(bank), "levels": list(c.levels), "sigma": c.sigma, "search": _search_name(model),
           "cells": {lv: list(feats.pyramid[lv].shape[1:]) for lv in c.levels}, "K": {}}
    for k in ks:
        fast_t, brute_t, diff, rel = [], [], 0.0, 0.0
        for i in sel:
            pyr = {lv: feats.pyramid[lv][i : i + 1] for lv in c.levels}
            nb = idx[i : i + 1, :k]
            fast = lambda: anomaly_maps(pyr, dev_bank.pyramid, nb, size, sigma=c.sigma, **_search(model))  # noqa: E731
            brute = lambda: anomaly_maps_bruteforce(pyr, dev_bank.pyramid, nb, size, sigma=c.sigma)  # noqa: E731
            budget = plan.min_time_s / (2 * len(sel))
            fast_t.append(time_call(fast, device, budget, min_reps=2))
            brute_t.append(time_call(brute, device, budget, min_reps=2))
            a, b = fast(), brute()
            d = float((a - b).abs().max())
            diff, rel = max(diff, d), max(rel, d / max(float(b.abs().max()), 1e-12))
        f, b = statistics.median(fast_t), statistics.median(brute_t)
        out["K"][str(k)] = {"fast_ms": 1000 * f, "bruteforce_ms": 1000 * b, "speedup": b / f,
                            "max_abs_diff": diff, "max_rel_diff": rel}
    return out


