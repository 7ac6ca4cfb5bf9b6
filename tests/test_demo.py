"""README's first command: ``tools/demo.py`` trains Pyramid-Mamba through the real anomalib CLI, and it learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memmamba_plugins import pretrained

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"
CATEGORIES = ("stripes_like", "checker_like", "grain_like")


@pytest.mark.slow
def test_demo_learns_on_generated_data(tmp_path: Path) -> None:
    if not Path(sys.executable).with_name("anomalib").is_file():
        pytest.skip("the anomalib command is not installed next to this interpreter")
    if pretrained.OFFLINE_WEIGHTS["tf_efficientnet_lite0"].source() is None:
        pytest.skip("ImageNet lite0 weights not installed (the `lite0` extra)")
    result = subprocess.run(
        [sys.executable, str(DEMO), "--synthetic", "--size", "64", "--max-steps", "40", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()[:1]}
    for category in (*CATEGORIES, "mean"):
        assert category in rows, result.stdout[-3000:]
    image_auroc = float(rows["mean"][0])
    assert image_auroc >= 0.8, result.stdout[-3000:]  # chance is 0.5: the demo must show learning
    heatmaps = re.search(r"Heat maps .*: (\S+)", result.stdout)
    assert heatmaps, result.stdout[-3000:]
    saved = list(Path(heatmaps.group(1)).rglob("*.png"))
    assert len(saved) == 3 * 2 * 16  # every test image of every category, none overwritten
    assert list((tmp_path / "out").rglob("*.ckpt"))
