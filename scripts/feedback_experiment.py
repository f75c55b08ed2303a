"""Measure the "not an anomaly" feedback loop on real footage (UCSD Ped2 layout).

Builds the camera-preset bank from the training clips (as `spade-monitor evaluate video`
does), scores the dev clips as deployed, marks the worst false "event" normal exactly as the
console would (stills at model size, JPEG q95, with their predecessors), commits the new bank
version and re-scores every dev clip against it.

    python scripts/feedback_experiment.py --root ../shared/data/ucsd_ped2 --out runs/feedback
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from engine import accuracy
from engine.bank import ReferenceBank
from engine.calibrate import calibrate
from engine.datasets import VideoDataset
from engine.decision import Thresholds
from engine.evaluate import frame_figures, score_clip
from engine.feedback import FeedbackFrame, add_normal_frames, raw_scores
from engine.preprocess import decode_jpeg, encode_jpeg
from engine.spade import Spade, preset
from engine.versions import BankHistory
from monitor.feedback import MAX_FRAMES_PER_CLICK
from monitor.scoring import STILL_QUALITY

TARGET_OTHER_CLIPS = 0.01  # max |delta as-deployed ROC AUC| on clips that were not marked


def build_bank(data: VideoDataset, scene: str, out: Path, device: str, precision: str):
    """Step 1: the scene's bank from its training clips, cached as ped2_built.bank; every run
    starts a fresh live copy (ped2.bank, no history) so reruns measure the same change."""
    built = out / "ped2_built.bank"
    if built.is_file():
        bank = ReferenceBank.load(built)
        spade = Spade.for_bank(bank, device=device, precision=precision)
        reused = True
    else:  # as engine.evaluate.evaluate_video builds it: one calibration group per training clip
        spade = Spade(preset("camera", device=device, precision=precision))
        train = data.train_clips(scene)
        pairs = ((i, f) for i, clip in enumerate(train) for f in clip.frames())
        sources = [str(c.video_path or c.frame_paths[0].parent) for c in train]
        bank = spade.build_bank(pairs, sources, total=sum(len(c) for c in train))
        bank.scene = scene
        calibrate(bank, spade.config, progress=True)
        bank.save(built)
        reused = False
    live = out / "ped2.bank"
    shutil.rmtree(live.with_name(live.name + ".history"), ignore_errors=True)
    shutil.copyfile(built, live)
    return spade, bank, live, reused


def score_dev(spade: Spade, bank: ReferenceBank, clips) -> dict:
    """Steps 2 and 4: each clip as the live engine scores it (gate, escalation, causal mean,
    flag at tau): labels, smoothed scores and flags per frame."""
    th = Thresholds.of_bank(bank, spade.config.image_score)
    out = {}
    for clip in clips:
        res = score_clip(spade, bank, th, clip.frames())
        out[clip.name] = {"labels": np.asarray(clip.labels[: len(res.deployed)]),
                          "scores": res.deployed, "flags": res.deployed_flags}
        print(f"  {clip.name}: {len(res.deployed)} frames, as deployed AUC "
              f"{accuracy.rocauc(out[clip.name]['labels'], res.deployed):.3f}", flush=True)
    return out


def figures(s: dict) -> dict:
    y, f = s["labels"], s["flags"]
    return {"rocauc_as_deployed": accuracy.rocauc(y, s["scores"]),
            "recall_at_tau": float(f[y > 0].mean()) if (y > 0).any() else float("nan"),
            "false_alarm_rate_at_tau": float(f[y == 0].mean()) if (y == 0).any() else float("nan"),
            "false_alarm_frames": int((f & (y == 0)).sum())}


def pick_false_event(scored: dict) -> tuple[str, list[int], list[int]]:
    """Step 3a: the clip with the most flagged-normal frames, its longest run of them (a false
    event), and up to MAX_FRAMES_PER_CLICK of its frames evenly sampled as the console does."""
    name = max(scored, key=lambda n: figures(scored[n])["false_alarm_frames"])
    s = scored[name]
    bad = s["flags"] & (s["labels"] == 0)
    best, start = [], None
    for i, b in enumerate(list(bad) + [False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            best = max(best, list(range(start, i)), key=len)
            start = None
    if not best:
        raise SystemExit("no false alarm on the dev clips: nothing to mark normal")
    step = -(-len(best) // MAX_FRAMES_PER_CLICK)  # monitor/feedback.py's even sampling
    return name, best, best[::step][:MAX_FRAMES_PER_CLICK]


def stills(bank: ReferenceBank, clip, marked: list[int]) -> list[FeedbackFrame]:
    """Step 3b: each marked frame and its predecessor as the engine stores them: model-input
    size, JPEG q95, decoded again (what the console re-scores and adds)."""
    pre, wanted = bank.preprocess, set(marked) | {i - 1 for i in marked if i > 0}
    kept = {i: pre.frame(f) for i, f in enumerate(clip.frames()) if i in wanted}
    jpeg = lambda img: decode_jpeg(encode_jpeg(img, STILL_QUALITY))  # noqa: E731
    return [FeedbackFrame(jpeg(kept[i]), jpeg(kept[i - 1]) if i > 0 else None) for i in marked]


def mark_normal(spade, bank, live: Path, clip_name: str, marked: list[int], frames) -> tuple[ReferenceBank, dict]:
    """Step 3c: what BankFeedback.not_anomaly does: add, recalibrate, commit a new version."""
    before = raw_scores(spade, bank, frames)
    new = add_normal_frames(spade, bank, frames)
    after = raw_scores(spade, new, frames)
    version = BankHistory(live).commit(new, "not_anomaly", "experiment", {
        "camera": clip_name, "seqs": marked, "added": len(frames), "before": before, "after": after})
    return new, {"version": version, "raw_before": before, "raw_after": after}


def report(before: dict, after: dict, marked_clip: str, event: list[int], marked: list[int],
           bank: ReferenceBank, new: ReferenceBank, mark: dict) -> dict:
    """Step 4: per clip before/after/delta, the marked frames, tau, and the target check."""
    clips = {}
    for n in before:
        b, a = figures(before[n]), figures(after[n])
        clips[n] = {"before": b, "after": a, "delta": {k: a[k] - b[k] for k in b}}
    others = [abs(c["delta"]["rocauc_as_deployed"]) for n, c in clips.items() if n != marked_clip]
    pooled = {k: frame_figures({n: (s["labels"], s["scores"], s["flags"]) for n, s in d.items()})
              for k, d in (("before", before), ("after", after))}
    tau_b, tau_a = bank.calibration.tau, new.calibration.tau
    fb, fa = before[marked_clip]["flags"], after[marked_clip]["flags"]
    return {
        "marked": {"clip": marked_clip, "event_frames": event, "frames": marked,
                   "raw_before": mark["raw_before"], "raw_after": mark["raw_after"],
                   "flagged_before": fb[marked].tolist(), "flagged_after": fa[marked].tolist(),
                   "smoothed_before": before[marked_clip]["scores"][marked].tolist(),
                   "smoothed_after": after[marked_clip]["scores"][marked].tolist(),
                   "event_flagged_before": int(fb[event].sum()), "event_flagged_after": int(fa[event].sum()),
                   "bank_version": mark["version"]},
        "tau": {"before": tau_b, "after": tau_a, "gate_before": bank.calibration.gate_tau,
                "gate_after": new.calibration.gate_tau},
        "bank_frames": {"before": len(bank), "after": len(new)},
        "clips": clips,
        "pooled": pooled,
        "per_frame": {n: {"labels": before[n]["labels"].tolist(),  # to see where flags moved
                          "smoothed_before": np.round(before[n]["scores"], 2).tolist(),
                          "smoothed_after": np.round(after[n]["scores"], 2).tolist(),
                          "flagged_before": before[n]["flags"].tolist(), "flagged_after": after[n]["flags"].tolist()}
                      for n in before},
        "other_clips_max_abs_delta_rocauc": max(others) if others else 0.0,
        "target_met": bool(max(others, default=0.0) <= TARGET_OTHER_CLIPS),
    }


def print_table(r: dict) -> None:
    f3 = lambda v: f"{v:.3f}"  # noqa: E731
    sgn = lambda v: f"{v:+.3f}"  # noqa: E731
    print("\n| clip | AUC before | AUC after | ΔAUC | recall before | recall after | Δrecall "
          "| false alarms before | after | Δ |\n|---|---|---|---|---|---|---|---|---|---|")
    for n, c in r["clips"].items():
        b, a, d = c["before"], c["after"], c["delta"]
        mark = " (marked)" if n == r["marked"]["clip"] else ""
        print(f"| {n}{mark} | {f3(b['rocauc_as_deployed'])} | {f3(a['rocauc_as_deployed'])} | "
              f"{sgn(d['rocauc_as_deployed'])} | {f3(b['recall_at_tau'])} | {f3(a['recall_at_tau'])} | "
              f"{sgn(d['recall_at_tau'])} | {f3(b['false_alarm_rate_at_tau'])} | "
              f"{f3(a['false_alarm_rate_at_tau'])} | {sgn(d['false_alarm_rate_at_tau'])} |")
    pb, pa = r["pooled"]["before"], r["pooled"]["after"]
    print(f"| micro (pooled) | {f3(pb['frame_rocauc_micro'])} | {f3(pa['frame_rocauc_micro'])} | "
          f"{sgn(pa['frame_rocauc_micro'] - pb['frame_rocauc_micro'])} | "
          f"{f3(pb['operating_point']['recall'])} | {f3(pa['operating_point']['recall'])} | "
          f"{sgn(pa['operating_point']['recall'] - pb['operating_point']['recall'])} | "
          f"{f3(pb['operating_point']['false_alarm_rate'])} | {f3(pa['operating_point']['false_alarm_rate'])} | "
          f"{sgn(pa['operating_point']['false_alarm_rate'] - pb['operating_point']['false_alarm_rate'])} |")
    m, t = r["marked"], r["tau"]
    n = len(m["frames"])
    print(f"\nmarked: clip {m['clip']}, false event frames {m['event_frames'][0]}-{m['event_frames'][-1]} "
          f"({len(m['event_frames'])} frames), {n} added -> bank v{m['bank_version']} "
          f"({r['bank_frames']['before']} -> {r['bank_frames']['after']} frames)")
    print(f"marked frames raw score mean {np.mean(m['raw_before']):.1f} -> {np.mean(m['raw_after']):.1f} "
          f"(max {max(m['raw_before']):.1f} -> {max(m['raw_after']):.1f}); flagged as deployed "
          f"{sum(m['flagged_before'])}/{n} -> {sum(m['flagged_after'])}/{n}; whole event "
          f"{m['event_flagged_before']}/{len(m['event_frames'])} -> {m['event_flagged_after']}/{len(m['event_frames'])}")
    print(f"tau {t['before']:.2f} -> {t['after']:.2f}, gate tau {t['gate_before']:.2f} -> {t['gate_after']:.2f}")
    print(f"other clips: max |ΔAUC as deployed| {r['other_clips_max_abs_delta_rocauc']:.4f} "
          f"(target <= {TARGET_OTHER_CLIPS}): {'met' if r['target_met'] else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="dataset root in the Ped2 layout")
    ap.add_argument("--clips", default="01,02,03,04,05,06", help="dev test clips (comma-separated)")
    ap.add_argument("--out", required=True, type=Path, help="folder for the bank and feedback.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [c.strip() for c in args.clips.split(",") if c.strip()]
    data = VideoDataset(args.root, "ped2")
    scene = data.scenes()[0]
    clips = [c for c in data.test_clips(scene) if c.name in names]
    timings: dict[str, float] = {}

    def timed(step, fn, *a):
        print(f"[{step}] ...", flush=True)
        t0 = time.perf_counter()
        value = fn(*a)
        timings[step] = time.perf_counter() - t0
        print(f"[{step}] {timings[step]:.0f} s", flush=True)
        return value

    spade, bank, live, reused = timed("1 bank", build_bank, data, scene, args.out, args.device, args.precision)
    setting = {"precision": spade.extractor.precision, "device": str(spade.device), "bank_reused": reused,
               "torch_threads": __import__("torch").get_num_threads()}
    print(f"setting: {setting}", flush=True)
    before = timed("2 score before", score_dev, spade, bank, clips)
    marked_clip, event, marked = pick_false_event(before)
    clip = next(c for c in clips if c.name == marked_clip)
    frames = stills(bank, clip, marked)
    new, mark = timed("3 mark normal + commit", mark_normal, spade, bank, live, marked_clip, marked, frames)
    after = timed("4 score after", score_dev, spade, new, clips)
    result = report(before, after, marked_clip, event, marked, bank, new, mark)
    result.update({"setting": setting, "timings_s": timings, "root": str(args.root), "clips_scored": names,
                   "bank": str(live)})
    print_table(result)
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; {setting['precision']} on {setting['device']}")
    (args.out / "feedback.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'feedback.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
