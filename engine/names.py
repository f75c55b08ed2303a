"""Names the CLI offers before anything heavy is loaded: `--help` must not wait for torch.

The sources of truth are engine.spade.PRESETS and engine.backbones.available();
tests/monitor/test_cli.py fails when these lists drift from them. Import nothing here.
"""

PRESET_NAMES = ("camera", "inspection", "paper", "paper-stc")
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite2", "resnet18", "wide_resnet50_2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
