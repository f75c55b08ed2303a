import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.preprocess import Preprocess
from engine.spade import Spade, preset


@pytest.fixture(scope="module")
def camera():
    return Spade(preset("camera", device="cpu", precision="fp32"))


def frames(n, seed=0, hw=(64, 96)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def test_temporal_channels_do_not_depend_on_batch_boundaries(camera):
    fr, pp = frames(5), Preprocess.full_frame(64, 96)
    whole = camera.features(fr, pp, streams=["a"] * 5, context={})
    ctx: dict = {}
    parts = [camera.features(fr[:2], pp, streams=["a"] * 2, context=ctx),
             camera.features(fr[2:], pp, streams=["a"] * 3, context=ctx)]
    for level in ("s8", "s16"):
        joined = torch.cat([p.pyramid[level] for p in parts])
        assert torch.allclose(joined, whole.pyramid[level], atol=1e-4)


def test_first_frame_of_a_stream_has_no_change_and_streams_do_not_mix(camera):
    fr, pp = frames(2), Preprocess.full_frame(64, 96)
    feats = camera.features(fr, pp, streams=["cam1", "cam2"], context={})
    c = 40  # EfficientNet-Lite0 s8 channels; the change channels, then the 2 motion channels follow
    assert feats.pyramid["s8"].shape[1] == 2 * c + 2
    assert feats.pyramid["s8"][:, c:].abs().max() == 0  # two streams: each frame is a first frame
    same = camera.features(fr, pp, streams=["cam1", "cam1"], context={})
    assert same.pyramid["s8"][1, c:].abs().max() > 0


def test_gate_escalates_only_frames_above_tau(camera):
    from engine.bank import ReferenceBank

    pp = Preprocess.full_frame(64, 96)
    ref = frames(6, seed=1)
    bank = camera.build_bank(((i // 3, f) for i, f in enumerate(ref)), ["test"], progress=False)
    assert isinstance(bank, ReferenceBank) and bank.input_size == (64, 96)
    feats = camera.features(ref[:2] + frames(1, seed=9), pp)
    res = camera.score_features(feats, bank, maps="flagged", tau=float("inf"))
    assert res.map_rows == [] and np.isnan(res.image_scores).all()
    res = camera.score_features(feats, bank, maps="flagged", tau=-1.0)
    assert res.map_rows == [0, 1, 2] and res.maps.shape == (3, 64, 96)


def test_coarse_gate_with_a_top_fraction_ranks_a_moving_area_above_one_odd_cell():
    from engine.spade import coarse_gate_scores

    # One reference frame of 10 x 10 cells, all alike; queries: one cell far off (a walker in an
    # odd pose) and a 3 x 4 patch moderately off (a cyclist).
    bank = {"s16": torch.zeros(1, 4, 10, 10)}
    odd_cell, area = torch.zeros(2, 4, 10, 10)
    odd_cell[0, 2, 2] = 10.0
    area[0, 4:7, 4:8] = 4.0
    query = {"s16": torch.stack([odd_cell, area])}
    nearest = torch.zeros(2, 1, dtype=torch.long)
    peak = coarse_gate_scores(query, bank, nearest, "s16", top_fraction=0.0)
    top = coarse_gate_scores(query, bank, nearest, "s16", top_fraction=0.1)
    assert peak.tolist() == pytest.approx([10.0, 4.0], abs=1e-3)
    assert top.tolist() == pytest.approx([1.0, 4.0], abs=1e-3)  # 10 of 100 cells: mean of (10, 0 x 9) and of 4s


@pytest.mark.parametrize("bad, message", [
    (dict(levels=("s3",)), "levels"),
    (dict(geometry="stretch"), "geometry"),
    (dict(k_image=0), "k_image"),
    (dict(gate_top_fraction=1.5), "gate_top_fraction"),
])
def test_invalid_settings_name_the_setting(bad, message):
    with pytest.raises(ConfigError, match=message):
        preset("camera", **bad)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="inspection"):
        preset("fast")
