"""The `spade-monitor` command line: help and argument errors answer at once, every option says what it does."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import typing
from pathlib import Path

from monitor.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "numpy", "cv2", "av", "matplotlib", "safetensors", "engine.spade",
         "engine.backbones")

_PROBE = """
import json, sys
from monitor.cli import main
codes = {}
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exc:
        codes[" ".join(argv)] = exc.code
print(json.dumps({"codes": codes, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def test_help_and_argument_errors_import_no_heavy_module():
    """Loading torch takes seconds: --help and usage errors must be answered without it."""
    argvs = [["--help"], ["reference", "build", "--help"], ["evaluate", "mvtec", "--help"], ["replay", "--help"],
             ["replay"], ["reference", "build", "--scene", "s", "--source", "x", "--out", "o", "--preset", "nope"]]
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs), json.dumps(HEAVY)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"imported while parsing: {report['heavy']}"
    assert list(report["codes"].values()) == [0, 0, 0, 0, 2, 2]
    assert "Traceback" not in proc.stderr


def test_console_entry_help_imports_no_torch():
    """The `python -m monitor.cli` path, with every import it makes listed by -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "monitor.cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "reference" in proc.stdout and "replay" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_cli_names_match_the_engine():
    """engine.names lets the parser skip torch; it must list exactly what the engine accepts."""
    from engine.backbones import available
    from engine.names import BACKBONE_NAMES, PRECISIONS, PRESET_NAMES
    from engine.spade import PRESETS
    from monitor.config import EngineConfig

    assert list(PRESET_NAMES) == sorted(PRESETS)
    assert list(BACKBONE_NAMES) == available()
    assert PRECISIONS == typing.get_args(typing.get_type_hints(EngineConfig)["precision"])


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                yield f"{path} {name}", "(the subcommand itself)", name in helped
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            name = "/".join(action.option_strings) or action.dest
            yield path, name, bool(action.help) and action.help != argparse.SUPPRESS


def test_every_option_of_every_subcommand_has_help():
    missing = [f"{path}: {name}" for path, name, ok in _walk(build_parser(), "spade-monitor") if not ok]
    assert not missing, "options without help: " + "; ".join(missing)
