"""The code passes the linter configured in pyproject.toml ([tool.ruff]): unused or undefined
names, shadowed imports and import order fail the suite, as in review."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "engine", "monitor", "tests", "scripts"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
