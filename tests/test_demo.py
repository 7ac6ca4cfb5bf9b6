"""README's first command: ``tools/demo.py`` trains Pyramid-Mamba through the real anomalib CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"


@pytest.mark.slow
def test_demo_trains_on_generated_data(tmp_path: Path) -> None:
    if not Path(sys.executable).with_name("anomalib").is_file():
        pytest.skip("the anomalib command is not installed next to this interpreter")
    result = subprocess.run(
        [sys.executable, str(DEMO), "--synthetic", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "mean/pixel_AUPRO" in result.stdout
    for category in ("carpet_like", "grid_like", "metal_like"):
        assert f"{category}/image_AUROC" in result.stdout
    assert list((tmp_path / "out").rglob("*.ckpt"))
