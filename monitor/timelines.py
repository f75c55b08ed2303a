"""Score timelines of a folder of results: each camera's image scores with τ and its flagged
frames, drawn as timeline_<camera>.png. Bounded: only the most recent points are kept."""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np

from engine.visualize import save_score_timeline

Sample = tuple[str, int, float, bool, float]  # run_id, seq, score, flagged, tau


class ScoreTimelines:
    def __init__(self, points: int):
        self.points = int(points)
        self.samples: dict[str, deque[Sample]] = {}

    def add(self, camera: str, run_id: str, seq: int, score: float, flagged: bool, tau: float) -> None:
        self.samples.setdefault(camera, deque(maxlen=self.points)).append((run_id, seq, score, flagged, tau))

    def save(self, out_dir: Path) -> None:
        for camera, samples in self.samples.items():
            _save(Path(out_dir), camera, samples)


def _save(out_dir: Path, camera: str, samples) -> None:
    if not samples:
        return
    seqs = [s[1] for s in samples]
    first, last = min(seqs), max(seqs)
    title = f"{camera}: image score, flagged frames shaded"
    if len({s[0] for s in samples}) == 1 and last - first + 1 <= 4 * len(samples) + 100:
        # One run: place scores at their seq, gaps (dropped frames) left empty.
        scores = np.full(last - first + 1, np.nan)
        flags = np.zeros(last - first + 1, dtype=np.uint8)
        for _, seq, score, flagged, _ in samples:
            scores[seq - first] = score
            flags[seq - first] = flagged
        if first:
            title += f" (x = seq - {first})"
    else:
        # Several runs (seq restarts) or a sparse sample: plot in arrival order.
        scores = np.array([s[2] for s in samples], dtype=np.float64)
        flags = np.array([s[3] for s in samples], dtype=np.uint8)
        title += " (arrival order)"
    tau = samples[-1][4]
    save_score_timeline(out_dir / f"timeline_{camera}.png", scores, labels=flags,
                        threshold=tau if math.isfinite(tau) else None, title=title,
                        shade_label="flagged")
