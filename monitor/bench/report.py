"""The bench as one command: runs the sections and the pipeline, judges the targets, prints the table."""
from __future__ import annotations

import json
import logging
import math
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import (
    LATENCY_LOAD,
    SCENE_FPS,
    TARGETS,
    Plan,
    camera_starts,
    decode_video,
    default_threads,
    encode_video,
    keyframes,
    machine_info,
    resolve_bench_device,
)
from .overhead import bench_engine_overhead
from .pipeline import _in_engine_process
from .redisbus import bench_redis_bus
from .sections import bench_backbone, bench_gate, bench_matching, gate_scores

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the bench

def run_bench(device: str = "auto", backbone: str | None = None, quick: bool = False,
              threads: int | None = None, json_path: str | Path | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Run every section and return the report (see the module docstring); --json writes it."""
    import torch

    from engine.bank import ReferenceBank
    from engine.errors import ConfigError
    from engine.spade import Spade, preset

    from ..config import EngineConfig

    say = progress or (lambda msg: log.info("bench: %s", msg))
    dev = resolve_bench_device(device)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: expected an integer >= 1, got {threads}")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    engine_defaults = EngineConfig()
    max_batch, max_wait_ms = engine_defaults.max_batch, engine_defaults.max_wait_ms
    plan = Plan.make(quick, max_batch)
    t_start = time.perf_counter()
    report: dict = {"machine": machine_info(dev, threads)}

    with tempfile.TemporaryDirectory(prefix="spade-bench-") as tmp_name:
        tmp = Path(tmp_name)
        spade = Spade(preset("camera", backbone=backbone, device=str(dev), batch_size=max_batch))
        scene, bank_path, bank_build_s = _scene_and_bank(tmp, plan, spade, say)
        bank = ReferenceBank.load(bank_path)
        video = encode_video(decode_video(scene.test_videos[0]), tmp / "bench.mp4", scene.fps)
        frames = decode_video(video)  # exactly what an ingest worker hands the engine
        model = Spade.for_bank(bank, extractor=spade.extractor, device=str(dev), batch_size=max_batch)
        say(f"escalation thresholds from the gate scores of the video's {len(frames)} frames")
        scores = gate_scores(model, bank.to(dev), frames, max_batch)
        report["settings"] = {
            "quick": quick, "backbone": model.config.backbone, "preset": "camera", "scene_size": list(plan.size),
            "bank_frames": len(bank), "video_frames": len(frames), "scene_fps": scene.fps,
            "engine_max_batch": max_batch, "engine_max_wait_ms": max_wait_ms, "threads": threads,
            "gate": model.config.gate, "k_image": model.config.k_image, "k_pixel": model.config.k_pixel,
            "bank_build_s": bank_build_s,
        }

        say("backbone throughput")
        bb = bench_backbone(spade, frames, plan, dev, max_batch)
        report["backbone"] = bb
        best_fps, fp32_fps = bb["best"]["frames_per_s"][str(max_batch)], bb["fp32"]["frames_per_s"][str(max_batch)]
        report["best_mode_speedup"] = best_fps / fp32_fps

        say("pixel matching")
        report["pixel_matching"] = bench_matching(model, bank, frames, plan, dev)
        k10 = report["pixel_matching"]["K"].get("10")
        report["pixel_matching_speedup"] = k10["speedup"] if k10 else None

        runs, escalation = _escalation_plans(model, bank.to(dev), frames, scores, keyframes(video), plan)
        report["pipeline"], memory = _pipeline_runs(runs, escalation, plan, say, {
            "device": str(dev), "threads": threads, "video": str(video), "tmp": str(tmp),
            "bank": str(bank_path), "max_batch": max_batch, "max_wait_ms": max_wait_ms,
            "min_time_s": plan.min_time_s,
        }, dev.type == "cuda")
        report["pipeline_efficiency"] = report["pipeline"]["efficiency_by_cameras"].get(
            str(report["pipeline"]["headline_cameras"]))

        say("gate latency")
        backbone_s = max_batch / best_fps
        report["gate"] = bench_gate(model, bank, frames, plan, dev, max_batch, backbone_s)

        report["memory"] = _memory(memory, bank_path, bank, report["gate"], plan)

        say("engine overhead: the engine with a null backbone")
        report["engine_overhead"] = bench_engine_overhead(bank_path, str(video), frames, plan, dev, threads, tmp)
        report["engine_overhead_ms_per_frame"] = report["engine_overhead"]["ms_per_frame"]
        say("Redis frame bus throughput")
        report["redis_bus"] = bench_redis_bus(frames, plan, tmp)
        report["bus_frames_per_s"] = report["redis_bus"]["frames_per_s"]
    report["targets"] = _targets(report, plan)
    report["seconds"] = time.perf_counter() - t_start
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report



def _scene_and_bank(tmp: Path, plan: Plan, spade, say: Callable[[str], None]):
    """The synthetic scene, its calibrated bank's file, and how long the bank took."""
    from engine.datasets.synthetic import make_scene
    from engine.reference import build_reference

    say(f"synthetic scene {plan.size[0]}x{plan.size[1]}")
    scene = make_scene(tmp / "scene", seed=0, size=plan.size, n_train_clips=plan.train_clips,
                       train_len=plan.train_len, n_test_clips=1, test_len=plan.test_len, fps=SCENE_FPS)
    say("reference bank (camera preset, calibrated)")
    t0 = time.perf_counter()
    bank = build_reference(spade, [scene.root / "training" / "frames"], "bench", progress=False, fps=scene.fps)
    bank_path = bank.save(tmp / "bench.bank")
    return scene, bank_path, time.perf_counter() - t0


def _memory(engine_memory: dict, bank_path: Path, bank, gate: dict, plan: Plan) -> dict:
    return dict(engine_memory, **{
        "bench_process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "bank_file_bytes_per_frame": bank_path.stat().st_size / len(bank),
        "bank_memory_bytes_per_frame": bank.bytes_per_frame(),
        "gate_index_bytes_per_frame": gate["sizes"][str(plan.bank_sizes[-1])]["scene_like"]["index_bytes_per_frame"],
    })


def _escalation_plans(model, bank, frames: list, scores: np.ndarray, keys: list[int], plan: Plan) -> tuple[list, list]:
    """Per camera count: the cameras' start frames and, per escalation rate, the gate_tau that gives it."""
    # Camera i replays frames [start_i, start_i + M) of the clip, the starts spread over it.
    # Their gate scores are the whole clip's (temporal features are causal), except the first
    # frame of each, which has no predecessor: it is scored on its own. gate_tau lies halfway
    # between the k-th and (k+1)-th highest scores of all the frames a run replays,
    # k = rate x frames (at least 1).
    runs, escalation = [], []
    for n in plan.cameras:
        m = plan.frames_per_camera(n)
        starts = camera_starts(keys, len(frames), n, m)
        pooled = []
        for start in starts:
            first = gate_scores(model, bank, [frames[start]], 1)
            pooled.append(np.concatenate([first, scores[start + 1 : start + m]]))
        ranked = np.sort(np.concatenate(pooled))
        total = len(ranked)
        plans = []
        for rate in plan.rates:
            k = min(total - 1, max(1, round(rate * total)))
            tau = float((ranked[-k - 1] + ranked[-k]) / 2)
            expected = float(np.mean(ranked > tau))
            plans.append((rate, tau, expected))
            escalation.append({"cameras": n, "frames_per_camera": m, "starts": starts, "rate_target": rate,
                               "gate_tau": tau, "video_escalation": expected})
        runs.append((n, m, starts, plans))
    return runs, escalation


def _pipeline_runs(runs: list, escalation: list, plan: Plan, say: Callable[[str], None], job: dict,
                   cuda: bool) -> tuple[dict, dict]:
    """The end-to-end runs, one engine process per camera count: (the pipeline section, engine memory)."""
    e2e_runs: list[dict] = []
    yardsticks: list[float] = []
    memory: dict[str, Any] = {}
    for run in runs:
        say(f"end-to-end runs, {run[0]} camera(s): engine process")
        e2e = _in_engine_process({**job, "runs": [run]})
        e2e_runs += e2e["runs"]
        yardsticks.append(e2e["backbone_fps"])
        for key, value in e2e["memory"].items():
            memory.setdefault(key + "_by_cameras", {})[str(run[0])] = value
    for key in ("engine_peak_rss_mib", "engine_baseline_rss_mib", "engine_cuda_peak_allocated_mib"):
        if key + "_by_cameras" in memory:
            values = [v for v in memory[key + "_by_cameras"].values() if v is not None]
            memory[key] = max(values) if values else None
    headline_cameras = 16 if cuda and 16 in plan.cameras else 4
    by_cameras = {str(r["cameras"]): r["efficiency"] for r in e2e_runs
                  if r["mode"] == "throughput" and r["rate_target"] == plan.rates[0]}
    pipeline = {
        "backbone_fps_engine_process": statistics.mean(yardsticks),
        "latency_load": LATENCY_LOAD,
        "escalation": escalation,
        "runs": e2e_runs,
        "efficiency_by_cameras": by_cameras,
        "headline_cameras": headline_cameras,
    }
    return pipeline, memory


def _targets(report: dict, plan: Plan) -> dict:
    lat = [r for r in report["pipeline"]["runs"] if r["mode"] == "latency"]
    out = {
        "pipeline_efficiency": {"value": report["pipeline_efficiency"],
                                "target": f">= {TARGETS['pipeline_efficiency']}",
                                "cameras": report["pipeline"]["headline_cameras"], "escalation": plan.rates[0]},
        "best_mode_speedup": {"value": report["best_mode_speedup"], "target": f">= {TARGETS['best_mode_speedup']}"},
        "gate_fraction": {"value": report["gate"]["gate_fraction_at_largest"],
                          "target": f"<= {TARGETS['gate_fraction']}",
                          "bank_frames": report["gate"]["largest_bank"],
                          "judged": report["gate"]["largest_bank"] >= 100_000},
        "pixel_matching_speedup": {"value": report["pixel_matching_speedup"],
                                   "target": f">= {TARGETS['pixel_matching_speedup']}"},
        "latency_bound": {"value": all(r["latency_bound_holds"] for r in lat), "target": "p99 <= max wait + 3 x batch",
                          "runs_within": sum(r["latency_bound_holds"] for r in lat), "runs": len(lat)},
        "engine_overhead_ms_per_frame": {"value": report["engine_overhead_ms_per_frame"],
                                         "target": f"<= {TARGETS['engine_overhead_ms_per_frame']}",
                                         "max_batch": report["engine_overhead"]["max_batch"],
                                         "escalation": report["engine_overhead"]["escalation_target"]},
        "bus_frames_per_s": {"value": report["bus_frames_per_s"], "target": f">= {TARGETS['bus_frames_per_s']:.0f}",
                             "producers": report["redis_bus"]["producers"], "put": report["redis_bus"]["put"]},
    }
    checks = {"pipeline_efficiency": lambda v: v >= TARGETS["pipeline_efficiency"],
              "best_mode_speedup": lambda v: v >= TARGETS["best_mode_speedup"],
              "gate_fraction": lambda v: v <= TARGETS["gate_fraction"],
              "pixel_matching_speedup": lambda v: v >= TARGETS["pixel_matching_speedup"],
              "latency_bound": bool,
              "engine_overhead_ms_per_frame": lambda v: v <= TARGETS["engine_overhead_ms_per_frame"],
              "bus_frames_per_s": lambda v: v >= TARGETS["bus_frames_per_s"]}
    for key, entry in out.items():
        v = entry["value"]
        entry["met"] = None if v is None else bool(checks[key](v))
    return out


# ---------------------------------------------------------------- the table

def _f(v, digits: int = 1, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}{suffix}"


def _size(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _row(label: str, values, width: int = 10) -> str:
    return f"{label:<33}" + "".join(f"{v:>{width}}" for v in values)


def _run_line(run: dict) -> str:
    thr = run["mode"] == "throughput"
    def lat(text: str) -> str:  # latency-only columns
        return "" if thr else text

    holds = lat("yes" if run.get("latency_bound_holds") else "NO")
    cells = [
        f"{run['cameras']:>4}", f"{run['frames']:>6}", f"{run['rate_target']:>10.0%}", f"{run['mode']:<10}",
        f"{run['frames_per_s']:>8.1f}", f"{(_f(run['efficiency'], 2) if thr else ''):>6}",
        f"{run['escalated']:>9.1%}", f"{lat(_f(run.get('latency_p50_ms'), 0)):>6}",
        f"{lat(_f(run.get('latency_p99_ms'), 0)):>6}", f"{lat(_f(run.get('latency_bound_ms'), 0)):>8}",
        f"{holds:>5}", f"{lat(_f(run.get('offered_fps_per_camera'), 1)):>11}",
        f"{lat(_f(run.get('latency_p99_second_half_ms'), 0)):>12}", f"{_f(run['peak_rss_mib'], 0, ' MiB'):>8}",
    ]
    return "  " + "  ".join(cells)


def _stage_line(run: dict) -> str:
    order = ("backbone", "gate", "pixel_matching", "match", "overlay", "publish")
    st = run["stage_ms_per_frame"]
    keys = [k for k in order if k in st] + sorted(k for k in st if k not in order and k != "batch")
    keys += ["batch"] if "batch" in st else []
    stages = ", ".join(f"{k} {_f(st[k], 2)}" for k in keys)
    return (f"    {run['cameras']:>2} cam {run['rate_target']:>4.0%} {run['mode']:<10}: {stages}; "
            f"mean batch {run['mean_batch_frames']:.1f} frames, {run['mean_batch_ms']:.0f} ms")


def _fn_name(name: str) -> str:
    """A profile entry's function, short: 'cv2.DenseOpticalFlow.calc', 'torch.cat', 'engine/x.py:12(f)'."""
    m = re.fullmatch(r"<method '(\w+)' of '([\w.]+)' objects>", name)
    if m:
        return f"{m.group(2).replace('torch._C.TensorBase', 'Tensor')}.{m.group(1)}"
    m = re.fullmatch(r"<built-in method ([\w.]+)>", name)
    if m:
        return m.group(1).replace("torch._C._nn.", "torch.nn.")
    return name


def _overhead_lines(o: dict, s: dict, add: Callable[[str], None]) -> None:
    shapes: dict[str, list[int]] = next(iter(o["null_backbone_shapes"].values()), {})
    dims = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
    add(f"engine overhead: the engine path with a null backbone ({s['backbone']}'s outputs: {dims}; cached, "
        f"expanded), EngineWorker,")
    add(f"  in-process bus, folder publisher; {o['cameras']} cameras, {o['frames']} frames of "
        f"{o['input_size'][0]}x{o['input_size'][1]}, max batch {o['max_batch']}, first get to last ack")
    add(f"  {o['ms_per_frame']:.3f} ms/frame (target <= {o['target_ms_per_frame']}); escalated {o['escalated']:.1%} "
        f"(target {o['escalation_target']:.0%}), flagged {o['flagged']:.1%}; mean batch {o['mean_batch_frames']:.1f} "
        f"frames, {o['mean_batch_ms']:.0f} ms")
    st = dict(o["stage_ms_per_frame"])
    batch = st.pop("batch", 0.0)
    names = {"backbone": "features (preprocess, null backbone, change, motion)"}
    order = [k for k in ("backbone", "gate", "pixel_matching", "overlay", "publish") if k in st]
    order += sorted(k for k in st if k not in order)
    parts = [f"{names.get(k, k)} {st[k]:.3f}" for k in order]
    parts.append(f"rest of process() {batch - sum(st.values()):.3f}")
    parts.append(f"outside process() {o['unaccounted_ms_per_frame']:.3f}")
    add("  ms/frame: " + ", ".join(parts))
    prof = o.get("profile")
    if prof:
        add(f"  cProfile of {prof['frames']} more frames ({prof['profiled_ms_per_frame']:.2f} ms/frame under the "
            f"profiler), most own time:")
        add("      ms/frame  share  calls/frame  function")
        for row in prof["top_own"][:12]:
            add(f"    {row['own_ms_per_frame']:>10.3f}  {row['own_share']:>5.1%}  {row['calls_per_frame']:>11.2f}  "
                f"{_fn_name(row['function'])}")
        cum = ", ".join(f"{_fn_name(row['function']).split('(')[-1].rstrip(')')} {row['cum_ms_per_frame']:.2f}"
                        for row in prof["top_cumulative_project"][:12])
        add(f"    project functions, cumulative ms/frame: {cum}")


def _bus_lines(b: dict, add: Callable[[str], None]) -> None:
    head = (f"redis frame bus: {b['producers']} producer processes x {b['cameras'] // b['producers']} cameras, "
            f"{b['put']} put, 1 consumer (get_batch {b['batch']} + ack), redis-server on loopback")
    if b.get("frames_per_s") is None:
        add(f"{head}: not measured ({b.get('error', 'no figure')})")
        return
    add(head)
    c, cpu = b["components"], b["cpu_ms_per_frame"]
    h, w = b["frame_size"]
    add(f"  {h}x{w} JPEG q{b['jpeg_quality']} (mean {c['jpeg_bytes'] / 1024:.1f} KiB); {b['frames_put']} frames put, "
        f"{b['frames_shed']} shed (live max_len {b['max_len']}), {b['frames']} taken")
    add(f"  {b['frames_per_s']:.0f} frames/s through the bus (target >= {b['target_frames_per_s']:.0f}); producers put "
        f"{b['put_frames_per_s']:.0f} frames/s")
    add(f"  CPU ms/frame in the run: producers {cpu['producers']:.2f}, redis-server {cpu['redis_server']:.2f}, "
        f"consumer {cpu['consumer']:.2f} = {sum(cpu.values()):.2f} ({b['cores_busy']:.2f} cores busy)")
    add(f"  alone, one frame at a time, ms: JPEG encode {c['jpeg_encode_ms']:.2f}, live put less encode "
        f"{c['live_put_redis_ms']:.2f}; get_batch + ack less decode {c['get_ack_redis_ms']:.2f}, JPEG decode "
        f"{c['jpeg_decode_ms']:.2f}")
    add(f"  with all {b['usable_cores']} cores: {_f(b['cpu_bound_frames_per_s'], 0)} frames/s at the run's CPU per frame, "
        f"{_f(b['jpeg_bound_frames_per_s'], 0)} for JPEG encode + decode alone")


def format_report(r: dict) -> str:
    m, s, bb = r["machine"], r["settings"], r["backbone"]
    lines: list[str] = []
    add = lines.append
    bf16 = "yes" if m["bf16_supported"] else "no"
    cpu_bits = [n for n, f in (("AVX512-BF16", m["cpu_avx512_bf16"]), ("AMX", m["cpu_amx"])) if f]
    add(f"SPADE Monitor bench{' (--quick)' if s['quick'] else ''}: {r['seconds']:.0f}s")
    add(f"machine   {m['cpu_model']}, {m['cpu_cores']} cores ({m['usable_cores']} usable), torch {m['torch']}")
    add(f"          device {m['device']} ({m['device_name']}), bf16 native: {bf16}"
        f"{' (' + ', '.join(cpu_bits) + ')' if cpu_bits else ''}, torch threads {m['threads']} "
        f"(bench and engine alike)")
    add(f"scene     synthetic {s['scene_size'][0]}x{s['scene_size'][1]}, bank {s['bank_frames']} frames "
        f"(camera preset, {s['backbone']}, gate {s['gate']}, K {s['k_image']}/{s['k_pixel']}), "
        f"video {s['video_frames']} frames; engine max batch {s['engine_max_batch']}, "
        f"max wait {s['engine_max_wait_ms']:.0f} ms")
    add("")

    batches = list(bb["best"]["frames_per_s"])
    add(_row(f"backbone frames/s ({bb['input_size'][0]}x{bb['input_size'][1]})", [f"batch {b}" for b in batches]))
    for key in ("best", "fp32"):
        label = f"  {bb[key]['mode']}" + (" (best)" if key == "best" else "")
        add(_row(label, [_f(bb[key]["frames_per_s"][b]) for b in batches]))
    add(f"  best mode / fp32 eager at batch {s['engine_max_batch']}: {_f(r['best_mode_speedup'], 2)}x")
    add("")

    g = r["gate"]
    sizes = list(g["sizes"])
    add(_row(f"gate, batch {g['batch']}, K {g['k']}, dim {g['dim']}", [_size(int(n)) for n in sizes]))
    add(_row("  kNN ms (scene-like bank)", [_f(g["sizes"][n]["scene_like"]["knn_ms"], 2) for n in sizes]))
    add(_row("  kNN ms (isotropic, worst case)", [_f(g["sizes"][n]["isotropic"]["knn_ms"], 2) for n in sizes]))
    if g["coarse_gate_used"]:
        add(_row(f"  + coarse gate ms ({g['coarse_gate_level']})", [_f(g["coarse_gate_ms"], 2) for _ in sizes]))
    add(_row("  gate / backbone per batch", [_f(100 * g["sizes"][n]["gate_fraction"], 1, "%") for n in sizes])
        + f"   (backbone {g['backbone_ms_per_batch']:.0f} ms/batch)")
    add("")

    pm = r["pixel_matching"]
    ks = list(pm["K"])
    add(_row("pixel matching ms/escalated frame", [f"K={k}" for k in ks])
        + f"   (bank {pm['bank_frames']} frames, levels {','.join(pm['levels'])})")
    add(_row(f"  anomaly_maps ({pm.get('search', 'fp32')} search)", [_f(pm["K"][k]["fast_ms"], 2) for k in ks]))
    add(_row("  brute force (torch.cdist)", [_f(pm["K"][k]["bruteforce_ms"], 2) for k in ks]))
    add(_row("  speedup", [_f(pm["K"][k]["speedup"], 2, "x") for k in ks]))
    add(_row("  max |difference| of the maps", [f"{pm['K'][k]['max_abs_diff']:.1e}" for k in ks]))
    add(_row("    relative to the map peak", [f"{100 * pm['K'][k]['max_rel_diff']:.2f}%" for k in ks]))
    add("")

    p = r["pipeline"]
    add(f"end to end: N file cameras, in-process bus, folder publisher. Backbone-only in the engine process, "
        f"batch {s['engine_max_batch']}:")
    add(f"  {p['backbone_fps_engine_process']:.1f} frames/s (mean; measured around each throughput run, whose "
        f"efficiency uses its own)")
    add("  cams  frames  esc.target  mode        frames/s  effic.  escalated  p50 ms  p99 ms  bound ms  holds"
        "  offered/cam  p99 2nd half  peak RSS")
    for run in p["runs"]:
        add(_run_line(run))
    add("  engine worker stage_seconds, ms per frame (batch = the whole of process(); the rest is waiting):")
    for run in p["runs"]:
        add(_stage_line(run))
    add("")

    _overhead_lines(r["engine_overhead"], r["settings"], add)
    add("")
    _bus_lines(r["redis_bus"], add)
    add("")

    _memory_lines(r["memory"], add)
    add("")
    _target_lines(r["targets"], add)
    return "\n".join(lines)



def _memory_lines(mem: dict, add: Callable[[str], None]) -> None:
    cuda = ""
    if mem.get("engine_cuda_peak_allocated_mib") is not None:
        cuda = f", CUDA peak allocated {mem['engine_cuda_peak_allocated_mib']:.0f} MiB"
    by = ", ".join(f"{n} cam {_f(v, 0)}" for n, v in mem["engine_peak_rss_mib_by_cameras"].items())
    add(f"memory    engine process peak RSS {_f(mem['engine_peak_rss_mib'], 0)} MiB ({by}; "
        f"{_f(mem['engine_baseline_rss_mib'], 0)} MiB once torch and the service are imported){cuda}")
    add(f"          per reference frame: file {mem['bank_file_bytes_per_frame'] / 1024:.0f} KiB, tensors "
        f"{mem['bank_memory_bytes_per_frame'] / 1024:.0f} KiB, + gate index "
        f"{mem['gate_index_bytes_per_frame'] / 1024:.1f} KiB (banks >= 2048 frames)")


def _target_lines(t: dict, add: Callable[[str], None]) -> None:
    def verdict(entry) -> str:
        return "-" if entry["met"] is None else ("met" if entry["met"] else "NOT met")

    pe = t["pipeline_efficiency"]
    add(f"pipeline efficiency     {_f(pe['value'], 2)} ({pe['cameras']} cameras, {pe['escalation']:.0%} escalation; "
        f"target {pe['target']}: {verdict(pe)})")
    bm = t["best_mode_speedup"]
    add(f"best mode speedup       {_f(bm['value'], 2)}x (target {bm['target']}x: {verdict(bm)})")
    gf = t["gate_fraction"]
    judged = verdict(gf) if gf["judged"] else f"{verdict(gf)} at {_size(gf['bank_frames'])}; target is for 100k"
    add(f"gate / backbone         {_f(100 * gf['value'], 1, '%')} at {_size(gf['bank_frames'])} frames "
        f"(target {gf['target']}: {judged})")
    ms = t["pixel_matching_speedup"]
    add(f"pixel matching speedup  {_f(ms['value'], 2)}x at K=10 (target {ms['target']}x: {verdict(ms)})")
    lb = t["latency_bound"]
    add(f"latency p99 bound       {lb['runs_within']}/{lb['runs']} latency runs within max wait + 3 x mean batch "
        f"time ({verdict(lb)})")
    eo = t["engine_overhead_ms_per_frame"]
    add(f"engine overhead         {_f(eo['value'], 2)} ms/frame (null backbone, batch {eo['max_batch']}, "
        f"{eo['escalation']:.0%} escalation, in-process bus; target {eo['target']}: {verdict(eo)})")
    bf = t["bus_frames_per_s"]
    add(f"redis bus throughput    {_f(bf['value'], 0)} frames/s ({bf['producers']} producers, {bf['put']} put, "
        f"240x320 JPEG; target {bf['target']}: {verdict(bf)})")


def main(args) -> int:
    """The `bench` subcommand (monitor.cli)."""
    report = run_bench(device=args.device, backbone=args.backbone, quick=args.quick, threads=args.threads,
                       json_path=args.json)
    print(format_report(report), flush=True)
    if args.json:
        print(f"wrote {args.json}")
    return 0


__all__ = ["Plan", "format_report", "main", "run_bench"]
