"""Pyramid-Mamba end to end: the real ``anomalib`` CLI, checkpoint reload, ONNX, anomalib datamodules.

A tiny MVTec-layout dataset (2 categories, 64x64, colour and grey) is generated in ``tmp_path``;
the model is tiny and ``pre_trained=False``, so everything runs offline on CPU in a few minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("anomalib")

from test_pyramid_mamba import (  # noqa: E402
    LITE0_BACKBONE,
    LITE0_LAYERS,
    SIZE,
    TINY,
    make_mvtec_like,
    pretrained_weights_installed,
)

from memmamba_plugins.pyramid_mamba import PyramidMamba  # noqa: E402
from memmamba_plugins.pyramid_mamba.synthetic import DEFECT  # noqa: E402

CATEGORIES = ("alpha", "beta")
METRICS = (
    "image_AUROC",
    "image_AUPR",
    "image_F1Max",
    "pixel_AUROC",
    "pixel_AUPR",
    "pixel_F1Max",
    "pixel_AUPRO",
)
KSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "ksdd_ad"
#: The tiny model as CLI arguments (short names: exercises the start-up registration hook).
TINY_CLI = [
    "--model.backbone", "resnet18",
    "--model.pre_trained", "false",
    "--model.input_size", str(SIZE),
    "--model.decoder_dims", "[64, 32, 16, 8]",
    "--model.decoder_depths", "[1, 2, 1, 1]",
    "--model.css_modules", "[1, 1, 1, 1]",
    "--model.d_state", "4",
    "--model.mff_blocks", "1",
]  # fmt: skip


def _anomalib_cli() -> list[str]:
    script = Path(sys.executable).with_name("anomalib")
    if script.is_file():
        return [str(script)]
    found = shutil.which("anomalib")
    if found is None:
        pytest.skip("the anomalib CLI is not installed")
    return [found]


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def _metrics(output: str) -> dict[str, float]:
    """Parse Lightning's result table (``│ name │ value │``)."""
    found = {}
    for name, value in re.findall(r"│\s*([\w/]+)\s*│\s*([-+0-9.eE]+|nan)\s*│", output):
        found[name] = float(value)
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_like(tmp_path_factory.mktemp("data") / "mvtec", CATEGORIES)


@pytest.mark.slow
def test_cli_train_then_test_from_checkpoint(dataset: Path, tmp_path: Path) -> None:
    cli = _anomalib_cli()
    if "memmamba_plugins.pyramid_mamba" not in sys.modules and not any(
        (Path(p) / "memmamba_plugins_hook.pth").is_file() for p in sys.path if p
    ):
        pytest.skip("package not pip-installed: the short names need the start-up hook")
    common = [
        "--data.root", str(dataset),
        "--data.categories", "[alpha, beta]",
        "--data.train_batch_size", "4",
        "--data.eval_batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    train = _run(
        [
            *cli,
            "train",
            "--model",
            "PyramidMamba",
            *TINY_CLI,
            "--data",
            "MVTec",
            *common,
            "--trainer.max_epochs",
            "1",
        ],
        tmp_path,
    )
    trained = _metrics(train)
    for metric in METRICS:
        assert metric in trained
        assert f"mean/{metric}" in trained
        for category in CATEGORIES:
            assert f"{category}/{metric}" in trained
    assert trained["mean/image_AUROC"] == pytest.approx(
        (trained["alpha/image_AUROC"] + trained["beta/image_AUROC"]) / 2, abs=1e-6
    )
    checkpoints = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, train[-3000:]

    # Full class paths work too, and the reloaded checkpoint gives the same numbers.
    tested = _metrics(
        _run(
            [
                *cli, "test",
                "--model", "memmamba_plugins.pyramid_mamba.PyramidMamba", *TINY_CLI,
                "--data", "memmamba_plugins.pyramid_mamba.MVTec", *common,
                "--ckpt_path", str(checkpoints[-1]),
            ],
            tmp_path,
        )
    )  # fmt: skip
    for metric in METRICS:
        assert tested[f"mean/{metric}"] == pytest.approx(trained[f"mean/{metric}"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["resnet18", "lite0"])
def test_onnx_export_matches_eager(tmp_path: Path, encoder: str) -> None:
    """The exported graph holds the encoder's own normalisation ([-1, 1] for lite0) and the same maps."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    tiny = {**TINY, "decoder_depths": (1, 1, 1, 1)}  # export time grows with the number of SS2D blocks
    if encoder == "lite0":
        if not pretrained_weights_installed():
            pytest.skip("ImageNet lite0 weights not installed (the `lite0` extra)")
        tiny.update(backbone=LITE0_BACKBONE, layers=LITE0_LAYERS, pre_trained=True)
    model = PyramidMamba(**tiny, input_size=SIZE, post_processor=False, visualizer=False).eval()
    path = model.to_onnx(tmp_path, input_size=(SIZE, SIZE))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        eager = model(images)
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()})))
    onnx_map = torch.from_numpy(outputs["anomaly_map"]).reshape(eager.anomaly_map.shape)
    torch.testing.assert_close(onnx_map, eager.anomaly_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        torch.from_numpy(outputs["pred_score"]).flatten(), eager.pred_score, rtol=0, atol=1e-4
    )


@pytest.mark.slow
def test_anomalib_folder_datamodule_with_grey_images(dataset: Path, tmp_path: Path) -> None:
    from anomalib.data import Folder
    from anomalib.engine import Engine

    datamodule = Folder(
        name="grey_beta",
        root=dataset / "beta",  # the grey category
        normal_dir="train/good",
        abnormal_dir=f"test/{DEFECT}",
        normal_test_dir="test/good",
        mask_dir=f"ground_truth/{DEFECT}",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )
    model = PyramidMamba(**TINY, input_size=SIZE, visualizer=False)
    engine = Engine(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)[0]
    assert "image_AUROC" in results and "grey_beta/pixel_AUPRO" in results and "mean/pixel_AUPRO" in results


@pytest.mark.skipif(not (KSDD / "ksdd").is_dir(), reason="KolektorSDD (shared/data/ksdd_ad) not available")
def test_ksdd_with_anomalib_mvtecad_datamodule() -> None:
    """anomalib's own MVTecAD datamodule on the real grey KSDD images (one eval batch)."""
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=KSDD, category="ksdd", eval_batch_size=2, num_workers=0)
    datamodule.setup()
    model = PyramidMamba(**TINY, input_size=SIZE).eval()
    datamodule.test_data.augmentations = model.pre_processor.transform
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        out = model(batch.image)
    assert out.anomaly_map.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(out.pred_score).all()


@pytest.mark.slow
def test_cli_ddp_train_predict_heatmaps_and_onnx_export(dataset: Path, tmp_path: Path) -> None:
    """``--trainer.strategy ddp --trainer.devices 2`` on CPU (gloo), then predict and export from its checkpoint."""
    cli = _anomalib_cli()
    # one SS2D block per stage keeps the ONNX export (traced torch scan) short
    model = [*TINY_CLI, "--model.decoder_depths", "[1, 1, 1, 1]"]
    train = _run(
        [
            *cli, "train", "--model", "PyramidMamba", *model,
            "--data", "MVTec", "--data.root", str(dataset), "--data.categories", "[alpha, beta]",
            "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--default_root_dir", str(tmp_path / "results"),
        ],
        tmp_path,
    )  # fmt: skip
    trained = _metrics(train)
    for metric in METRICS:
        assert {metric, f"mean/{metric}", f"alpha/{metric}", f"beta/{metric}"} <= set(trained), metric
    checkpoint = sorted((tmp_path / "results").rglob("*.ckpt"))[-1]

    defects = dataset / "alpha" / "test" / DEFECT
    _run(
        [
            *cli, "predict", "--model", "PyramidMamba", *model, "--ckpt_path", str(checkpoint),
            "--data", str(defects), "--default_root_dir", str(tmp_path / "predict"),
        ],
        tmp_path,
    )  # fmt: skip
    heatmaps = sorted((tmp_path / "predict").rglob("*.png"))
    assert [p.name for p in heatmaps] == sorted(p.name for p in defects.glob("*.png"))

    _run(
        [
            *cli, "export", "--model", "PyramidMamba", *model, "--ckpt_path", str(checkpoint),
            "--export_type", "onnx", "--export_root", str(tmp_path / "export"),
        ],
        tmp_path,
    )  # fmt: skip
    assert list((tmp_path / "export").rglob("model.onnx"))
