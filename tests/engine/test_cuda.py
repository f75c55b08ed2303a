"""The CUDA paths agree with the CPU's fp32 results. They skip on machines without a GPU (CI);
run them where one is lent: `python -m pytest tests/engine/test_cuda.py`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.backbones import build_backbone
from engine.evaluate import evaluate_video
from engine.features import FeatureExtractor
from engine.gate import knn
from engine.matcher import anomaly_maps, anomaly_maps_bruteforce, match_dtype
from engine.spade import preset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_features_match_cpu_fp32(precision):
    frames = torch.randint(0, 255, (5, 3, 240, 320), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    levels = ("s8", "s16", "s32")
    ref = FeatureExtractor(build_backbone("efficientnet_lite0"), levels, device="cpu", precision="fp32")(frames)
    gpu = FeatureExtractor(build_backbone("efficientnet_lite0"), levels, device="cuda", precision=precision)(frames)
    tol = 1e-3 if precision == "fp32" else 0.08  # the same tolerance as the CPU's bf16 features
    for name, a, b in [("global", gpu.global_, ref.global_)] + [(lv, gpu.pyramid[lv], ref.pyramid[lv]) for lv in levels]:
        assert a.device.type == "cuda" and a.dtype == torch.float32
        assert torch.isfinite(a).all(), name
        rel = ((a.cpu() - b).norm() / b.norm()).item()
        assert rel < tol, (name, rel)


@pytest.mark.parametrize("n", [500, 20000])  # below and above the size that gets a cached index
def test_cuda_gate_finds_the_exact_neighbours(n):
    g = torch.Generator().manual_seed(n)
    ref = (5.0 + torch.randn(1, 64, generator=g) + 0.3 * torch.randn(n, 64, generator=g)).half()
    q = ref[:9].float() + 0.01 * torch.randn(9, 64, generator=g)
    true = ((ref.double()[None] - q.double()[:, None]) ** 2).sum(2).topk(10, largest=False).values
    ref_gpu = ref.to(CUDA)
    for _ in range(2):  # the second search goes through the cached index
        d, idx = knn(q.to(CUDA), ref_gpu, 10)
        assert d.device.type == "cuda"
        full = ((ref.double()[None] - q.double()[:, None]) ** 2).sum(2)
        assert torch.allclose(torch.gather(full, 1, idx.cpu()), true, rtol=0, atol=1e-3)
        assert torch.allclose(d.double().cpu(), true, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_maps_match_the_bruteforce_reference(precision):
    g = torch.Generator().manual_seed(1)
    background = {"s8": 3 * torch.randn(1, 48, 12, 16, generator=g), "s16": 3 * torch.randn(1, 64, 6, 8, generator=g)}
    bank = {lv: (b + 0.4 * torch.randn(12, *b.shape[1:], generator=g)).half() for lv, b in background.items()}
    query = {lv: v[[2, 3, 9]].float() + 0.1 for lv, v in bank.items()}
    query["s8"][1, :, 3:6, 4:8] += 30.0  # an anomaly far from everything: d^2 past fp16's range
    neighbours = torch.tensor([[0, 1, 4], [0, 1, 4], [5, 6, 7]])
    reference = anomaly_maps_bruteforce(query, bank, neighbours, (48, 64))
    dtype = match_dtype(precision, CUDA)
    fast = anomaly_maps({lv: v.to(CUDA) for lv, v in query.items()}, {lv: v.to(CUDA) for lv, v in bank.items()},
                        neighbours.to(CUDA), (48, 64), search_dtype=dtype)
    assert fast.device.type == "cuda" and torch.isfinite(fast).all()
    assert ((fast.cpu() - reference).abs() / reference.abs()).max() < 0.005


def test_cuda_evaluation_matches_the_cpu_on_a_generated_scene(scene):
    """The whole engine (bank, calibration, gate, maps) on the GPU at its default precision
    finds the same anomalies as the CPU in fp32."""
    quiet = dict(progress=False, log=lambda *_: None)
    cpu = evaluate_video(scene.root, preset("camera", device="cpu", precision="fp32", batch_size=8), **quiet).payload
    gpu = evaluate_video(scene.root, preset("camera", device="cuda", batch_size=8), **quiet).payload
    assert gpu["config"]["device"] == "cuda" and gpu["frame_rocauc_micro"] > 0.8
    for key in ("frame_rocauc_micro", "frame_rocauc_macro", "pixel_rocauc"):
        assert gpu[key] == pytest.approx(cpu[key], abs=0.02), key


def test_cuda_replay_publishes_every_frame_and_opens_events(scene, tmp_path, capsys):
    from engine.reference import build_reference
    from engine.spade import Spade
    from monitor.cli import main

    bank = tmp_path / "plaza.bank"
    spade = Spade(preset("camera", device="cuda", batch_size=8, max_frames=60))
    build_reference(spade, [scene.root / "training" / "frames"], "plaza", progress=False).save(bank)
    out = tmp_path / "out"
    rc = main(["-q", "replay", str(scene.test_videos[0]), "--reference", str(bank), "--out", str(out),
               "--fps", "5", "--device", "cuda"])
    assert rc == 0, capsys.readouterr().err
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert results and [r["seq"] for r in results] == list(range(len(results)))
    scores = np.array([r["image_score"] for r in results])
    assert np.isfinite(scores).all()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "start" for e in events)


def test_cuda_batches_of_every_size_reuse_the_shapes_planned_at_warm_up():
    """cuDNN plans each new input shape for seconds: the service's batches of 1..max frames are
    padded to the few shapes that warm_up ran, and padding does not change a frame's features."""
    ex = FeatureExtractor(build_backbone("efficientnet_lite0"), ("s8", "s16"), device="cuda")
    shapes = []
    forward = ex.backbone.forward_features
    ex.backbone.forward_features = lambda x, levels: shapes.append(tuple(x.shape)) or forward(x, levels)
    ex.warm_up(12, (120, 160))
    planned = set(shapes)
    assert {s[0] for s in planned} == {1, 2, 4, 8, 16}
    frames = torch.randint(0, 255, (12, 3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    alone = ex(frames[:1]).pyramid["s8"]
    for n in range(1, 13):
        feats = ex(frames[:n])
        assert feats.global_.shape[0] == n and feats.pyramid["s8"].shape[0] == n
        rel = ((feats.pyramid["s8"][:1] - alone).norm() / alone.norm()).item()
        assert rel < 0.01, (n, rel)
    assert set(shapes) == planned
