"""Engine overhead: the real engine path (monitor/worker.py) with a backbone that costs nothing.

A NullBackbone returns what the real backbone returns for the bank's input size (the global
feature and every pyramid level, with the real channel counts and cell grids: the shapes are
taken from one pass of the real backbone per input size) as cached random tensors expanded to
the batch, materialised once per batch size. Everything else is the service's: EngineWorker
over an InProcessBus, batches of up to OVERHEAD_MAX_BATCH frames, preprocessing, the scene's
temporal channels (change and motion, with each camera's state), the gate, pixel matching of
the escalated frames, results, events, stills and overlays of flagged frames, the folder
publisher, acks. Every frame gets the same appearance features, hence the same neighbours: two
escalated frames in one batch would share one search in anomaly_maps (at 1%, rarely).

Frames: the bench's decoded clip, played in a loop by OVERHEAD_CAMERAS cameras from different
starting points, pre-generated in memory and put on the bus before the clock starts; the figure
is the time from the first get to the last ack, per frame. A first segment of each camera's
sequence warms the worker up (and gives every camera a predecessor frame) and is not timed.
Escalation: the null backbone gives every frame the same appearance, so a frame's gate score
depends on its motion channels only, i.e. on the clip frame and its predecessor; those scores
are computed once with the same null model, and the bank copy's gate_tau lies halfway between
the k-th and (k+1)-th highest scores of the timed frames, k = 1% of them.

Over the target, a second segment of the same sequences runs under cProfile: the functions with
the most own time per frame, and the project's functions with the most cumulative time.
"""
from __future__ import annotations

import cProfile
import logging
import pstats
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.backbones import Backbone, Features

from .common import TARGETS, Plan

log = logging.getLogger(__name__)

OVERHEAD_MAX_BATCH = 32
OVERHEAD_CAMERAS = 4
OVERHEAD_ESCALATION = 0.01
PROFILE_TOP = 15


class NullBackbone(Backbone):
    """The real backbone's output shapes at about no cost: cached random tensors, expanded to
    the batch (every frame gets the same features).

    Not registered: the bench swaps it into a loaded FeatureExtractor. The real backbone is kept
    (outside the module tree) to learn the output shapes of each new input size, once.
    """

    def __init__(self, real: Backbone, seed: int = 0):
        super().__init__()
        self.name = real.name
        self.mean, self.std = real.mean, real.std
        self.level_channels = dict(real.level_channels)
        self.global_dim = real.global_dim
        self.weights_id = real.weights_id
        self.seed = seed
        self.__dict__["_real"] = real  # not a submodule: .to() and .eval() leave it alone
        self._real: Backbone
        self._cache: dict[tuple, Features] = {}  # one frame's outputs, per input size
        self._batches: dict[tuple, Features] = {}  # ...expanded, per batch size

    def forward_features(self, x, levels: tuple[str, ...]) -> Features:
        import torch

        n, c, h, w = x.shape
        key = (c, h, w, tuple(levels), str(x.device))
        if key not in self._cache:
            probe = self._real.forward_features(x.new_zeros((1, c, h, w)), tuple(levels))
            gen = torch.Generator().manual_seed(self.seed)

            def rand(shape) -> torch.Tensor:
                return torch.randn(shape, generator=gen).to(x.device)

            self._cache[key] = Features(global_=rand(tuple(probe.global_.shape)),
                                        pyramid={lv: rand(tuple(t.shape)) for lv, t in probe.pyramid.items()})
        # Expanded once per batch size and kept contiguous, as a real backbone's fp32 outputs are:
        # the extractor's .float().contiguous() then copies nothing a real pass would not. Nothing
        # downstream writes into the features (they are concatenated, indexed and cloned).
        if (key, n) not in self._batches:
            one = self._cache[key]
            self._batches[(key, n)] = Features(
                global_=one.global_.expand(n, -1).contiguous(),
                pyramid={lv: t.expand(n, -1, -1, -1).contiguous() for lv, t in one.pyramid.items()})
        out = self._batches[(key, n)]
        return Features(global_=out.global_, pyramid=dict(out.pyramid))

    def shapes(self) -> dict:
        """Output shape of each cached input size (one frame), for the report."""
        return {f"{k[1]}x{k[2]}": {"global": list(f.global_.shape[1:]),
                                   **{lv: list(t.shape[1:]) for lv, t in f.pyramid.items()}}
                for k, f in self._cache.items()}


def _null_everywhere(worker) -> NullBackbone:
    """Swap a NullBackbone into every loaded scene's extractor (scenes may share one)."""
    null = None
    for scene in worker.scenes.values():
        ext = scene.model.extractor
        if not isinstance(ext.backbone, NullBackbone):
            ext.backbone = NullBackbone(ext.backbone)
        null = ext.backbone
    if null is None:
        raise RuntimeError("engine overhead: no scene was loaded")
    return null


def _config(bank: Path, cameras: list[str], source: str, out: Path, device: str, threads: int):
    from ..config import parse_config

    return parse_config({
        "cameras": {cid: {"source": source, "scene": "bench", "fps": None, "mode": "replay", "realtime": False}
                    for cid in cameras},
        "scenes": {"bench": {"bank": str(bank)}},
        "engine": {"device": device, "max_batch": OVERHEAD_MAX_BATCH, "escalate": "flagged", "threads": threads},
        "bus": {"kind": "inprocess"},
        "outputs": {"dir": str(out), "overlays": True},
        "metrics": {"port": 0},
    }, base_dir=out.parent)


def _snapshot(stats) -> dict:
    return {"frames": stats.frames, "batches": stats.batches, "escalated": stats.escalated,
            "flagged": stats.flagged, "failed": stats.failed, "stage": dict(stats.stage_seconds)}


def _profile_summary(prof: cProfile.Profile, frames: int) -> dict:
    """Own time (tottime) and, for the project's functions, cumulative time, in ms per frame."""
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (path, line, func), (_cc, calls, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        short = path
        for marker in ("/site-packages/", "/main/", "/lib/python"):
            if marker in path:
                short = path.split(marker, 1)[1]
                break
        name = f"{short}:{line}({func})" if line else func
        rows.append({"function": name, "own_ms_per_frame": 1000 * tt / frames, "cum_ms_per_frame": 1000 * ct / frames,
                     "calls_per_frame": calls / frames, "own_share": tt / total if total else 0.0,
                     "project": path.startswith(str(Path(__file__).resolve().parents[2]))})
    own = sorted(rows, key=lambda r: -r["own_ms_per_frame"])[:PROFILE_TOP]
    cum = sorted((r for r in rows if r["project"] and "bench" not in r["function"]),
                 key=lambda r: -r["cum_ms_per_frame"])[:PROFILE_TOP]
    return {"frames": frames, "profiled_ms_per_frame": 1000 * total / frames, "top_own": own, "top_cumulative_project": cum}


def _bank_at_escalation(bank_path: Path, frames: list[np.ndarray], timed_idx: np.ndarray, device, batch: int,
                        tmp: Path) -> tuple[Path, float, float]:
    """The bank with gate_tau set so that OVERHEAD_ESCALATION of the timed frames escalate:
    (its file, gate_tau, the escalation it gives on those frames)."""
    from engine.bank import ReferenceBank
    from engine.spade import Spade

    from .sections import gate_scores

    # Gate scores with the null backbone: clip frame j after frame j-1 (the loop wraps), computed
    # on the clip played twice as one stream, the second pass kept.
    clip = len(frames)
    bank = ReferenceBank.load(bank_path)
    probe = Spade.for_bank(bank, device=str(device), batch_size=batch, precision=None)
    probe.extractor.backbone = NullBackbone(probe.extractor.backbone)
    scores = gate_scores(probe, bank.to(device), frames + frames, batch)[clip:]
    ranked = np.sort(scores[timed_idx])
    k = min(len(ranked) - 1, max(1, round(OVERHEAD_ESCALATION * len(ranked))))
    tau = float((ranked[-k - 1] + ranked[-k]) / 2)
    bank.calibration = replace(bank.calibrated(), gate_tau=tau)
    return bank.save(tmp / "overhead.bank"), tau, float(np.mean(ranked > tau))


def _figures(before: dict, after: dict, seconds: float) -> dict:
    """Per frame and per batch, from the worker's stats before and after the timed frames."""
    frames_done = after["frames"] - before["frames"]
    batches = after["batches"] - before["batches"]
    stage = {key: 1000.0 * (v - before["stage"].get(key, 0.0)) / max(1, frames_done)
             for key, v in after["stage"].items()}
    ms = 1000.0 * seconds / max(1, frames_done)
    return {
        "ms_per_frame": ms, "frames": frames_done, "seconds": seconds,
        "batches": batches, "mean_batch_frames": frames_done / max(1, batches),
        "mean_batch_ms": 1000.0 * seconds / max(1, batches),
        "escalated": (after["escalated"] - before["escalated"]) / max(1, frames_done),
        "flagged": (after["flagged"] - before["flagged"]) / max(1, frames_done),
        "failed": after["failed"] - before["failed"],
        "stage_ms_per_frame": stage,
        "unaccounted_ms_per_frame": ms - stage.get("batch", 0.0),
    }


def bench_engine_overhead(bank_path: Path, source: str, frames: list[np.ndarray], plan: Plan, device,
                          threads: int, tmp: Path) -> dict:
    """ms per frame of the engine with a null backbone (see the module docstring)."""
    import torch

    from ..bus import InProcessBus
    from ..frames import Frame
    from ..runner import build_publisher
    from ..worker import EngineWorker

    n_cams, batch = OVERHEAD_CAMERAS, OVERHEAD_MAX_BATCH
    clip = len(frames)
    per_cam = {seg: max(1, n // n_cams) for seg, n in
               (("warm", 2 * batch), ("timed", plan.overhead_frames), ("profile", plan.overhead_profile_frames))}
    starts = [round(i * clip / n_cams) % clip for i in range(n_cams)]
    cameras = [f"ovh{i:02d}" for i in range(n_cams)]

    first_timed = per_cam["warm"]
    timed_idx = np.array([(s + t) % clip for s in starts for t in range(first_timed, first_timed + per_cam["timed"])])
    run_bank, tau, expected = _bank_at_escalation(bank_path, frames, timed_idx, device, batch, tmp)

    out_dir = tmp / "overhead_out"
    config = _config(run_bank, cameras, source, out_dir, str(device), threads)
    publisher = build_publisher(config)
    total = sum(per_cam.values()) * n_cams
    bus = InProcessBus(max_len=total + 1, max_age_s=1e9)
    worker = EngineWorker(config, bus, publisher)
    null = _null_everywhere(worker)
    run_id = uuid.uuid4().hex
    position = {cid: 0 for cid in cameras}

    def put_segment(segment: str) -> int:
        """The segment's frames of every camera, interleaved as cameras deliver them."""
        n = per_cam[segment]
        for _ in range(n):
            for cam, start in zip(cameras, starts):
                seq = position[cam]
                position[cam] += 1
                bus.put(Frame(camera=cam, seq=seq, source_ts=seq / 10.0, capture_ts=time.time(),
                              image=frames[(start + seq) % clip], run_id=run_id), live=False)
        return n * n_cams

    def run_segment(n: int) -> float:
        done = 0
        t0 = time.perf_counter()
        while done < n:
            taken = worker.step(max_wait_s=0.0)
            if not taken:
                raise RuntimeError(f"engine overhead: the bus ran dry after {done} of {n} frames")
            done += taken
        return time.perf_counter() - t0

    try:
        torch.set_num_threads(threads)
        run_segment(put_segment("warm"))
        n = put_segment("timed")
        before = _snapshot(worker.stats)
        seconds = run_segment(n)
        result = {
            **_figures(before, _snapshot(worker.stats), seconds),
            "target_ms_per_frame": TARGETS["engine_overhead_ms_per_frame"], "cameras": n_cams, "max_batch": batch,
            "escalation_target": OVERHEAD_ESCALATION, "gate_tau": tau, "expected_escalation": expected,
            "input_size": list(worker.scenes["bench"].bank.input_size),
            "null_backbone_shapes": null.shapes(),
            "profile": None,
        }
        if result["ms_per_frame"] > TARGETS["engine_overhead_ms_per_frame"] and per_cam["profile"] > 0:
            n = put_segment("profile")
            prof = cProfile.Profile()
            prof.enable()
            try:
                run_segment(n)
            finally:
                prof.disable()
            result["profile"] = _profile_summary(prof, n)
    finally:
        worker.close()
        bus.close()
        publisher.close()
    return result
