"""Packaging: cheap top-level import, consistent version, and a working framework install."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: Scripts installed next to the interpreter running the tests (the virtual environment's bin/).
BIN = Path(sys.executable).parent
HEAVY_MODULES = ("torch", "anomalib", "mmpretrain", "mmengine", "lightning")


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def script(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable} (looked for {path})"
    return str(path)


def test_import_is_cheap(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import memmamba_plugins\n"
        f"heavy = {HEAVY_MODULES!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    result = run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"`import memmamba_plugins` imported {loaded}"


def test_version_matches_pyproject() -> None:
    import memmamba_plugins

    with open(ROOT / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert memmamba_plugins.__version__ == version
    assert importlib.metadata.version("memmamba-plugins") == version, (
        "the installed distribution is stale: run `make setup`"
    )


def test_torchvision_ops_work() -> None:
    import torch
    import torchvision

    assert hasattr(torchvision.ops, "nms")
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # Raises "operator torchvision::nms does not exist" when torch and torchvision do not match.
    keep = torchvision.ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_mim_cli(tmp_path: Path) -> None:
    result = run([script("mim"), "--version"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" in result.stdout


def test_mmpretrain_imports_with_mim_tools() -> None:
    import mmpretrain

    assert mmpretrain.__version__ == "1.2.0"
    # `mim train mmpretrain ...` runs this script from the installed package.
    assert (Path(mmpretrain.__file__).parent / ".mim" / "tools" / "train.py").is_file()


def test_anomalib_cli(tmp_path: Path) -> None:
    result = run([script("anomalib"), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train" in result.stdout


@pytest.mark.parametrize("extra", ["cuda", "dev"])
def test_extras_declared(extra: str) -> None:
    extras = importlib.metadata.metadata("memmamba-plugins").get_all("Provides-Extra") or []
    assert extra in extras
