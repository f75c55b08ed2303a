"""`spade-monitor bench --quick`: the CI smoke test. It checks that every figure is there and sane,
not that the machine meets the performance targets."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monitor.bench import TARGETS

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = _cli("bench", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_bench_reports_every_figure(quick_report):
    report, table = quick_report
    for key in ("pipeline_efficiency", "best_mode_speedup", "pixel_matching_speedup"):
        assert _positive(report[key]), key
        assert key.split("_")[0] in table

    m = report["machine"]
    assert m["cpu_model"] and m["cpu_cores"] >= 1 and m["threads"] >= 1 and m["torch"] == torch.__version__
    assert isinstance(m["bf16_supported"], bool) and m["device_name"]

    bb = report["backbone"]
    batch = str(report["settings"]["engine_max_batch"])
    for mode in ("best", "fp32"):
        assert batch in bb[mode]["frames_per_s"]
        assert all(_positive(v) for v in bb[mode]["frames_per_s"].values())
    assert bb["fp32"]["mode"] == "fp32 eager, one pass per batch"  # the plain baseline

    gate = report["gate"]
    assert set(gate["sizes"]) >= {"1000", "10000"}
    for row in gate["sizes"].values():
        for kind in ("scene_like", "isotropic"):
            assert _positive(row[kind]["knn_ms"]) and _positive(row[kind]["gate_fraction"])
    assert _positive(gate["coarse_gate_ms"]) and _positive(gate["gate_fraction_at_largest"])
    assert gate["sizes"]["10000"]["scene_like"]["index_bytes_per_frame"] > 0  # the cached gate index

    pm = report["pixel_matching"]
    assert pm["bank_frames"] >= 50 and set(pm["K"]) >= {"1", "10"}
    for row in pm["K"].values():
        assert _positive(row["fast_ms"]) and _positive(row["bruteforce_ms"]) and _positive(row["speedup"])
        # the engine's maps are the brute-force maps, within the reduced-precision search's tolerance
        assert math.isfinite(row["max_abs_diff"]) and 0 <= row["max_rel_diff"] < 0.01

    p = report["pipeline"]
    assert _positive(p["backbone_fps_engine_process"])
    runs = p["runs"]
    assert {(r["cameras"], r["rate_target"], r["mode"]) for r in runs} == {
        (n, rate, mode) for n in (1, 4) for rate in (0.01, 0.10) for mode in ("throughput", "latency")}
    for r in runs:
        assert r["frames"] == r["frames_expected"] > 0  # every frame of every camera was published
        assert _positive(r["frames_per_s"]) and _positive(r["latency_p50_ms"])
        assert r["latency_p99_ms"] >= r["latency_p50_ms"]
        assert 0 < r["escalated"] <= 0.2
        assert _positive(r["stage_ms_per_frame"]["backbone"]) and _positive(r["mean_batch_ms"])
        if r["mode"] == "throughput":
            assert _positive(r["efficiency"])
        else:
            assert _positive(r["offered_fps_per_camera"]) and _positive(r["latency_bound_ms"])
            assert isinstance(r["latency_bound_holds"], bool)
    assert set(p["efficiency_by_cameras"]) == {"1", "4"}
    # about 1% and 10% of the frames escalated, as the bank copies' gate_tau asked
    for r in runs:
        assert r["escalated"] == pytest.approx(r["video_escalation"], abs=0.05)

    mem = report["memory"]
    for key in ("engine_peak_rss_mib", "engine_baseline_rss_mib", "bank_file_bytes_per_frame",
                "bank_memory_bytes_per_frame"):
        assert _positive(mem[key]), key

    # the engine with a null backbone: real path, batches of 32, about 1% escalated
    overhead = report["engine_overhead"]
    assert _positive(report["engine_overhead_ms_per_frame"])
    assert overhead["ms_per_frame"] == report["engine_overhead_ms_per_frame"]
    assert overhead["max_batch"] == 32 and overhead["frames"] > 0 and overhead["failed"] == 0
    assert 0 < overhead["escalated"] <= 0.05
    assert _positive(overhead["stage_ms_per_frame"]["batch"])
    if overhead["profile"] is not None:  # over the target: where the time went
        assert overhead["profile"]["top_own"] and _positive(overhead["profile"]["profiled_ms_per_frame"])

    # frames through the Redis frame bus, with a real redis-server where one is installed
    bus = report["redis_bus"]
    if shutil.which("redis-server"):
        assert _positive(report["bus_frames_per_s"])
        assert bus["frames"] > 0 and bus["corrupt"] == 0 and bus["frames"] + bus["frames_shed"] == bus["frames_put"]
        for value in bus["components"].values():
            assert math.isfinite(value) and value >= 0
    else:
        assert report["bus_frames_per_s"] is None and "redis-server" in bus["error"]

    targets = report["targets"]
    assert set(targets) == {"pipeline_efficiency", "best_mode_speedup", "gate_fraction",
                            "pixel_matching_speedup", "latency_bound", "engine_overhead_ms_per_frame",
                            "bus_frames_per_s"}
    for key, met in (("pipeline_efficiency", lambda v, t: v >= t), ("best_mode_speedup", lambda v, t: v >= t),
                     ("gate_fraction", lambda v, t: v <= t), ("pixel_matching_speedup", lambda v, t: v >= t),
                     ("engine_overhead_ms_per_frame", lambda v, t: v <= t), ("bus_frames_per_s", lambda v, t: v >= t)):
        if targets[key]["value"] is None:  # no redis-server
            assert targets[key]["met"] is None, key
            continue
        assert targets[key]["met"] is met(targets[key]["value"], TARGETS[key]), key  # the verdict follows the figure
    bound = targets["latency_bound"]
    assert bound["met"] is (bound["runs_within"] == bound["runs"])
    assert targets["gate_fraction"]["judged"] is False  # --quick stops at 10k reference frames
    assert "stage_seconds" in table and "pipeline efficiency" in table
    assert "engine overhead" in table and "redis bus throughput" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2():
    proc = _cli("bench", "--device", "cuda", "--quick", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spade-monitor: error:") and "CUDA" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
