import json
import time

import pytest
import torch

from engine.bank import Calibration, ReferenceBank, kcenter_greedy, uniform_subsample
from engine.decision import Thresholds
from engine.errors import BankError


def make_bank(n=12):
    g = torch.Generator().manual_seed(0)
    return ReferenceBank(
        global_feats=torch.randn(n, 8, generator=g).half(),
        pyramid={"s8": torch.randn(n, 4, 3, 5, generator=g).half()},
        groups=torch.arange(n, dtype=torch.int32) // 4,
        meta={"backbone": "efficientnet_lite0", "weights_id": "abc", "levels": ["s8"],
              "preprocess": {"size": [24, 40], "resize": None}, "normalize_global": True},
    )


def test_save_load_roundtrip_keeps_tensors_and_metadata(tmp_path):
    bank = make_bank()
    bank.calibration = Calibration(tau=0.5, gate_tau=0.25, theta=2.0, k_image=3)
    bank.save(tmp_path / "scene.bank")
    loaded = ReferenceBank.load(tmp_path / "scene.bank")
    assert torch.equal(loaded.global_feats, bank.global_feats)
    assert torch.equal(loaded.pyramid["s8"], bank.pyramid["s8"])
    assert torch.equal(loaded.groups, bank.groups)
    assert loaded.global_feats.dtype == torch.float16
    assert loaded.calibration == Calibration(tau=0.5, gate_tau=0.25, theta=2.0, k_image=3)
    assert loaded.meta["frame_count"] == 12 and loaded.meta["format_version"] == 1
    assert abs(loaded.created_ts - time.time()) < 60
    assert loaded.input_size == (24, 40) and loaded.backbone_key == ("efficientnet_lite0", "abc", ("s8",))
    assert loaded.scene is None and loaded.fps is None and loaded.stored_config == {}


def test_read_meta_reads_the_header_only(tmp_path):
    bank = make_bank()
    bank.scene = "plaza"
    bank.save(tmp_path / "scene.bank")
    meta = ReferenceBank.read_meta(tmp_path / "scene.bank")
    assert meta["scene"] == "plaza" and meta["frame_count"] == 12
    (tmp_path / "junk.bank").write_bytes(b"\x00" * 64)
    with pytest.raises(BankError, match="corrupt|not a SPADE") as err:
        ReferenceBank.read_meta(tmp_path / "junk.bank")
    assert "\n" not in str(err.value)
    with pytest.raises(BankError, match="reference build"):
        ReferenceBank.read_meta(tmp_path / "nope.bank")


def _save_with_header(path, **changes):
    """A bank whose saved header differs from a good one's by `changes` (None deletes a key)."""
    from safetensors.torch import load_file, save_file

    bank = make_bank()
    bank.save(path)
    meta = {k: v for k, v in {**bank.meta, **changes}.items() if v is not None}
    save_file(load_file(str(path)), str(path), metadata={"spade_bank": json.dumps(meta)})


def test_old_calibration_without_gate_tau_loads_gating_at_tau(tmp_path):
    path = tmp_path / "old.bank"
    _save_with_header(path, thresholds={"tau": 0.5, "theta": 2.0})
    cal = ReferenceBank.load(path).calibration
    assert (cal.tau, cal.gate_tau, cal.theta, cal.image_median) == (0.5, 0.5, 2.0, None)
    th = Thresholds.of_bank(ReferenceBank.load(path), "map_max", tau=0.75)
    assert (th.gate_tau, th.normal_score) == (0.5, 0.75)  # no image_median: unescalated frames score tau


def test_uncalibrated_bank_loads_without_a_calibration(tmp_path):
    path = tmp_path / "raw.bank"
    _save_with_header(path, thresholds={})  # what an older build wrote before calibrating
    assert ReferenceBank.load(path).calibration is None
    with pytest.raises(BankError, match="reference calibrate"):
        Calibration.from_dict({"tau": 1.0}, "raw.bank")


@pytest.mark.parametrize("changes", [
    {"thresholds": {"tau": "high", "theta": 2.0}},
    {"thresholds": {"tau": float("nan"), "theta": 2.0}},
    {"thresholds": {"tau": 0.5, "theta": 2.0, "k_image": "ten"}},
    {"thresholds": [0.5, 2.0]},
    {"preprocess": {"size": [24], "resize": None}},
    {"preprocess": {"size": [24, -40], "resize": None}},
    {"preprocess": None},
    {"levels": "s8"},
    {"fps": "25"},
])
def test_a_bad_header_is_refused_in_one_line_naming_the_file(tmp_path, changes):
    path = tmp_path / "bad.bank"
    _save_with_header(path, **changes)
    with pytest.raises(BankError, match="rebuild it") as err:
        ReferenceBank.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_bank_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(BankError, match="reference build") as err:
        ReferenceBank.load(tmp_path / "nope.bank")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_corrupt_truncated_or_foreign_bank_is_refused(tmp_path, damage):
    path = tmp_path / "scene.bank"
    make_bank().save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + data[64:])
    else:  # a pickle file under a bank's name must never be unpickled
        torch.save({"global": torch.zeros(2)}, path)
    with pytest.raises(BankError, match="corrupt|not a SPADE"):
        ReferenceBank.load(path)


def test_bank_from_other_backbone_or_size_is_refused():
    bank = make_bank()
    ours = dict(bank.meta)
    bank.check_compatible(ours)
    for key, value in [("backbone", "resnet18"), ("preprocess", {"size": [256, 256], "resize": None})]:
        with pytest.raises(BankError, match=key):
            bank.check_compatible({**ours, key: value})


def test_metadata_with_wrong_frame_count_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "scene.bank"
    bank = make_bank()
    bank.save(path)
    meta = dict(bank.meta, frame_count=99)
    save_file(load_file(str(path)), str(path), metadata={"spade_bank": json.dumps(meta)})
    with pytest.raises(BankError, match="inconsistent"):
        ReferenceBank.load(path)


def test_bytes_per_frame_counts_every_stored_tensor():
    bank = make_bank()
    assert bank.bytes_per_frame() == 8 * 2 + 4 * 3 * 5 * 2 + 4


def test_uniform_subsample_spans_the_whole_range():
    idx = uniform_subsample(100, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 99


def test_kcenter_keeps_a_rare_outlier_that_uniform_drops():
    feats = torch.zeros(100, 2)
    feats[:, 0] = torch.linspace(0, 1, 100)
    feats[37] = torch.tensor([50.0, 50.0])  # one rare appearance
    picked = kcenter_greedy(feats, 5)
    assert 37 in picked.tolist()
    assert 37 not in uniform_subsample(100, 5).tolist()
