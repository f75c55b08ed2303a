import pytest
import torch
import torchvision

from engine.backbones import available, build_backbone
from engine.errors import ConfigError, WeightsError
from engine.features import FeatureExtractor


def test_registry_lists_the_backbones():
    assert {"efficientnet_lite0", "efficientnet_lite2", "resnet18", "wide_resnet50_2"} <= set(available())


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        build_backbone("vgg99")


@pytest.mark.parametrize("name, channels", [
    ("efficientnet_lite0", {"s4": 24, "s8": 40, "s16": 112, "s32": 320}),
    ("efficientnet_lite2", {"s4": 24, "s8": 48, "s16": 120, "s32": 352}),
])
@pytest.mark.parametrize("size", [(224, 224), (120, 176)])
def test_efficientnet_lite_pyramid_shapes(name, channels, size):
    bb = build_backbone(name)
    assert bb.name == name and bb.level_channels == channels
    fe = FeatureExtractor(bb, ("s4", "s8", "s16", "s32"), device="cpu", precision="fp32")
    feats = fe(torch.randint(0, 255, (2, 3, *size), dtype=torch.uint8))
    h, w = size
    cells = lambda stride: (-(-h // stride), -(-w // stride))  # TF "same" padding rounds up
    assert feats.global_.shape == (2, 1280)
    for level, stride in (("s4", 4), ("s8", 8), ("s16", 16), ("s32", 32)):
        assert feats.pyramid[level].shape == (2, channels[level], *cells(stride))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_weights_are_imagenet(shared_data, name):
    """The packaged weights classify a real photo correctly (guards the key mapping)."""
    import cv2

    bb = build_backbone(name)
    img = cv2.imread(str(shared_data / "imagenet_samples" / "parrot.jpg"))[:, :, ::-1]
    x = torch.from_numpy(cv2.resize(img, (224, 224)).copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        logits = bb.net(x)
    macaw = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"].index("macaw")
    assert macaw in logits.topk(5).indices[0].tolist()


def test_resnet18_from_explicit_weights_file(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    bb = build_backbone("resnet18", weights=path)
    fe = FeatureExtractor(bb, ("s4", "s8", "s16"), device="cpu", precision="fp32")
    feats = fe(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert feats.global_.shape == (1, 512)
    assert [tuple(feats.pyramid[k].shape[1:]) for k in ("s4", "s8", "s16")] == [(64, 56, 56), (128, 28, 28), (256, 14, 14)]
    assert len(bb.weights_id) == 12


def test_wide_resnet_without_weights_offline_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("SPADE_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        build_backbone("wide_resnet50_2")
    msg = str(err.value)
    assert "\n" not in msg and "--weights" in msg and "wide_resnet50_2-" in msg


def test_bf16_features_match_fp32_within_tolerance():
    bb = build_backbone("efficientnet_lite0")
    x = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    ref = FeatureExtractor(bb, ("s8", "s16"), device="cpu", precision="fp32")(x)
    fast = FeatureExtractor(build_backbone("efficientnet_lite0"), ("s8", "s16"), device="cpu", precision="bf16")(x)
    for level in ("s8", "s16"):
        rel = (fast.pyramid[level] - ref.pyramid[level]).norm() / ref.pyramid[level].norm()
        assert rel < 0.08  # documented tolerance for bf16 features


def test_cpu_batches_split_into_cache_sized_passes_give_the_same_features():
    bb = build_backbone("efficientnet_lite0")
    frames = torch.randint(0, 255, (6, 3, 240, 320), dtype=torch.uint8)  # 6 frames: passes of 4 and 2
    split = FeatureExtractor(bb, ("s8", "s16"), device="cpu", precision="fp32")(frames)
    whole = FeatureExtractor(bb, ("s8", "s16"), device="cpu", precision="fp32", split_passes=False)(frames)
    assert torch.allclose(split.global_, whole.global_, atol=1e-4)
    for level in ("s8", "s16"):
        assert split.pyramid[level].shape == whole.pyramid[level].shape
        assert torch.allclose(split.pyramid[level], whole.pyramid[level], atol=1e-3)
