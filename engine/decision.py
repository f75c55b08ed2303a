"""The frame decision, in one place for `evaluate`, calibration and the live engine.

gate score > gate_tau  ->  escalated to pixel matching  ->  image score (from the map, or DN2)
->  causal mean over the stream's last `temporal_window` frames  ->  flagged when > tau.

A frame the gate does not escalate has no map; it gets the scene's typical normal score, so
the smoothed score of a live camera is exactly what `evaluate` reports "as deployed".
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .errors import BankError


@dataclass(frozen=True)
class Thresholds:
    """A scene's operating thresholds, resolved from its bank and any configured overrides."""

    tau: float  # a frame is flagged when its smoothed image score exceeds tau
    gate_tau: float  # a frame is escalated to pixel matching when its gate score exceeds gate_tau
    theta: float  # a pixel is anomalous when its map value exceeds theta
    normal_score: float  # the image score of a frame the gate did not escalate

    @classmethod
    def of_bank(cls, bank, image_score: str, tau: float | None = None,
                theta: float | None = None, where: str = "bank") -> "Thresholds":
        """The bank's calibrated thresholds; `tau`/`theta` override them (a scene's config).

        With DN2 image scores the gate and the flag are the same test, so an overridden tau
        moves the gate too; with map scores the gate keeps its own calibrated threshold.
        """
        cal = bank.calibration
        if cal is None:
            raise BankError(f"reference bank {where} is not calibrated: run 'spade-monitor reference calibrate {where}'")
        flag_tau = float(cal.tau if tau is None else tau)
        gate_tau = flag_tau if image_score == "dn2" else cal.gate_tau
        normal_score = flag_tau if cal.image_median is None else cal.image_median  # banks from before image_median
        return cls(tau=flag_tau, gate_tau=gate_tau, theta=float(cal.theta if theta is None else theta),
                   normal_score=normal_score)


class CausalMean:
    """Mean of each stream's last `window` values: the smoothing a live camera can compute too."""

    def __init__(self, window: int):
        self.window = max(1, int(window))
        self._recent: dict = {}

    def __call__(self, stream, value: float) -> float:
        recent = self._recent.get(stream)
        if recent is None:
            recent = self._recent[stream] = deque(maxlen=self.window)
        recent.append(float(value))
        return sum(recent) / len(recent)

    def restart(self, stream) -> None:
        """Forget a stream's past values (a new run of the camera, a handover)."""
        self._recent.pop(stream, None)


class FrameScorer:
    """Per-stream causal smoothing and the flag: one instance per scene (or per evaluation)."""

    def __init__(self, thresholds: Thresholds, window: int, map_scored: bool):
        self.thresholds = thresholds
        self.map_scored = map_scored  # image scores come from maps: unescalated frames have none
        self._mean = CausalMean(window)

    def __call__(self, stream, raw: float) -> tuple[float, bool]:
        """(smoothed score, flagged) of the stream's next frame; raw is NaN when not escalated."""
        score = self._mean(stream, self._image_score(raw))
        return score, score > self.thresholds.tau

    def restart(self, stream) -> None:
        self._mean.restart(stream)

    def alone(self, raw: float) -> tuple[float, bool]:
        """(score, flagged) of a frame scored out of its stream's order (no smoothing, no state)."""
        score = self._image_score(raw)
        return score, score > self.thresholds.tau

    def _image_score(self, raw: float) -> float:
        if self.map_scored and math.isnan(raw):
            return self.thresholds.normal_score  # below the gate: normal by construction
        return float(raw)
