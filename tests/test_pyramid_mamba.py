"""Pyramid-Mamba unit tests: shapes, noise, frozen encoder, pyramid scan, sizes, weights, glue.

Everything runs offline on CPU with tiny models (``pre_trained=False``); nothing is downloaded.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("anomalib")
timm = pytest.importorskip("timm")

from anomalib.data import InferenceBatch  # noqa: E402

from memmamba_plugins.pyramid_mamba import MVTec, PyramidMamba, PyramidMambaModel  # noqa: E402
from memmamba_plugins.pyramid_mamba import torch_model as tm  # noqa: E402
from memmamba_plugins.pyramid_mamba.data import MVTEC_AD_URL, MVTecDatasetNotFoundError  # noqa: E402
from memmamba_plugins.pyramid_mamba.loss import PyramidMambaLoss  # noqa: E402
from memmamba_plugins.pyramid_mamba.synthetic import make_synthetic_mvtec  # noqa: E402
from memmamba_plugins.ssm import merge_regions, split_regions  # noqa: E402

SIZE = 64
#: A tiny decoder that keeps every code path (pyramid, LEC, patch expand, heads).
TINY = {
    "backbone": "resnet18",
    "pre_trained": False,
    "decoder_dims": (64, 32, 16, 8),
    "decoder_depths": (1, 2, 1, 1),
    "css_modules": (1, 1, 1, 1),
    "d_state": 4,
    "mff_blocks": 1,
    "drop_path_rate": 0.0,
}


def tiny_model(**overrides) -> PyramidMambaModel:
    torch.manual_seed(0)
    return PyramidMambaModel(**{**TINY, "input_size": (SIZE, SIZE), **overrides})


@pytest.fixture(scope="module")
def model() -> PyramidMambaModel:
    return tiny_model()


def test_shapes_train_and_eval(model: PyramidMambaModel) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)
    model.train()
    enc, dec = model(x)
    assert [f.shape for f in enc] == [f.shape for f in dec]
    assert [f.shape[-1] for f in enc] == [16, 8, 4]
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, InferenceBatch)
    assert out.anomaly_map.shape == (2, 1, SIZE, SIZE)
    assert out.pred_score.shape == (2,)
    assert torch.allclose(out.pred_score, out.anomaly_map.amax(dim=(-2, -1)).flatten())


def test_paper_size_parameter_counts() -> None:
    """Paper/official code: decoder 13.4 M, MFF 1.5 M parameters on a ResNet34 encoder."""
    counts = PyramidMambaModel(pre_trained=False).num_parameters()
    assert round(counts["decoder"] / 1e6, 1) == 13.4
    assert round(counts["bottleneck"] / 1e6, 1) == 1.5


def _decoder_input(model: PyramidMambaModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    handle = model.decoder.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].clone()))
    try:
        model(x)
    finally:
        handle.remove()
    model_was_training = model.training
    model.eval()  # bottleneck BN in eval for the reference, as the hook saw it below
    with torch.no_grad():
        clean = model.bottleneck(model.encode(x))
    model.train(model_was_training)
    return seen["x"], clean


@pytest.mark.parametrize("use_noise", [True, False])
def test_noise_only_in_training(use_noise: bool) -> None:
    model = tiny_model(use_noise=use_noise, noise_std=0.5)
    x = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        fed, clean = _decoder_input(model, x)
    assert torch.equal(fed, clean)
    model.train()
    model.bottleneck.eval()  # same BN statistics as the reference, so only the noise differs
    with torch.no_grad():
        fed, clean = _decoder_input(model, x)
    if use_noise:
        assert abs(float((fed - clean).std()) - 0.5) < 0.05
    else:
        assert torch.allclose(fed, clean)


def test_frozen_encoder_gets_no_gradient() -> None:
    model = tiny_model()
    model.train()
    assert not model.encoder.training  # BatchNorm statistics of the encoder stay fixed
    running = [b.clone() for b in model.encoder.buffers()]
    enc, dec = model(torch.randn(2, 3, SIZE, SIZE))
    PyramidMambaLoss()(enc, dec).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(running, model.encoder.buffers()))
    trainable = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    assert trainable and all(p.grad is not None for p in trainable if p.requires_grad)


def test_pyramid_scan_is_average_of_whole_map_and_quadrants(model: PyramidMambaModel) -> None:
    """PSS (paper Sec. 3.2): level 1 scans each quadrant on its own with the same weights; averaged."""
    mixer = model.decoder.stages[1][0].pss[0].mixer
    assert mixer.pyramid_levels == (0, 1)
    whole_map_only = copy.deepcopy(mixer)
    whole_map_only.pyramid_levels = (0,)
    x = torch.randn(2, 8, 8, mixer.d_inner)  # scan2d works on channel-last maps
    with torch.no_grad():
        pyramid = mixer.scan2d(x)
        whole = whole_map_only.scan2d(x)
        quadrants = [whole_map_only.scan2d(region[None]) for region in split_regions(x, 2)]
        expected = (whole + merge_regions(torch.cat(quadrants), 2)) / 2
    torch.testing.assert_close(pyramid, expected, rtol=1e-4, atol=1e-5)


def test_ablation_flags() -> None:
    plain = tiny_model(use_pyramid=False, use_lec=False)
    css = plain.decoder.stages[0][0]
    assert css.pss[0].mixer.pyramid_levels == (0,)
    assert len(css.lec) == 0 and css.fuse.in_channels == css.fuse.out_channels
    full = tiny_model()
    assert [branch.body[3].kernel_size for branch in full.decoder.stages[0][0].lec] == [(5, 5), (7, 7)]
    assert tiny_model(use_noise=False).noise_std == 0.0


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ((96, 96), ["96x96", "multiples of 64", "128"]),
        ((128, 64), ["square"]),
        ((100, 100), ["multiples of 64"]),
    ],
)
def test_bad_input_sizes_are_rejected_with_valid_sizes(size: tuple[int, int], words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        tiny_model(input_size=size)
    assert all(word in str(info.value) for word in words)


def test_sizes_without_pyramid_need_only_stride_alignment() -> None:
    assert tiny_model(input_size=(96, 64), use_pyramid=False).input_size == (96, 64)


def test_offline_pretrained_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs):  # noqa: ANN202
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(tm.PretrainedWeightsUnavailableError) as info:
        tm.build_encoder("resnet18", ("layer1", "layer2", "layer3"), pre_trained=True)
    assert "pre_trained=False" in str(info.value) and "weights_path" in str(info.value)


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_local_weights_file(tmp_path: Path, source: str) -> None:
    torch.manual_seed(1)
    if source == "timm":
        net = timm.create_model("resnet18", pretrained=False)
    else:
        torchvision = pytest.importorskip("torchvision")
        net = torchvision.models.resnet18(weights=None)
    path = tmp_path / f"{source}_resnet18.pth"
    torch.save(net.state_dict(), path)
    encoder = tm.build_encoder(
        "resnet18", ("layer1", "layer2", "layer3"), pre_trained=True, weights_path=path
    )
    torch.testing.assert_close(
        encoder.state_dict()["layer3.1.conv2.weight"], net.state_dict()["layer3.1.conv2.weight"]
    )
    with pytest.raises(FileNotFoundError):
        tm.build_encoder("resnet18", ("layer1",), pre_trained=True, weights_path=tmp_path / "missing.pth")


def test_any_timm_cnn_works() -> None:
    """Channels come from feature_info; 1x1 heads bridge decoder dims and encoder channels."""
    model = tiny_model(backbone="mobilenetv3_small_050", layers=("blocks.0", "blocks.1", "blocks.3"))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, SIZE, SIZE)).anomaly_map.shape == (1, 1, SIZE, SIZE)


# -- Lightning / anomalib glue ----------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_model() -> PyramidMamba:
    return PyramidMamba(**{k: v for k, v in TINY.items()}, input_size=SIZE)


def test_lightning_defaults(lightning_model: PyramidMamba) -> None:
    assert lightning_model.input_size == (SIZE, SIZE)
    assert "max_epochs" not in lightning_model.trainer_arguments
    assert lightning_model.learning_type.value == "one_class"
    optim = lightning_model.configure_optimizers()["optimizer"]
    assert isinstance(optim, torch.optim.Adam)
    assert optim.defaults["lr"] == 5e-4 and optim.defaults["weight_decay"] == 1e-4
    names = {m.name for m in lightning_model.evaluator.test_metrics}
    assert names == {
        "image_AUROC",
        "image_AUPR",
        "image_F1Max",
        "pixel_AUROC",
        "pixel_AUPR",
        "pixel_F1Max",
        "pixel_AUPRO",
    }
    assert PyramidMamba.__init__.__defaults__ is not None  # every knob is an argument
    assert PyramidMambaLoss().weight == 5.0


def test_mvtec_missing_root_names_download_page(tmp_path: Path) -> None:
    datamodule = MVTec(root=tmp_path / "nowhere", categories=["bottle"], num_workers=0)
    with pytest.raises(MVTecDatasetNotFoundError) as info:
        datamodule.prepare_data()
    assert MVTEC_AD_URL in str(info.value)
    assert not (tmp_path / "nowhere").exists()  # nothing was downloaded or created


def make_mvtec_like(root: Path, categories: tuple[str, ...] = ("alpha", "beta")) -> Path:
    """A tiny MVTec AD layout at the test image size (colour and grey categories, masks)."""
    return make_synthetic_mvtec(root, categories, size=SIZE)


def test_mvtec_multiclass_setup(tmp_path: Path) -> None:
    root = make_mvtec_like(tmp_path / "mvtec")
    datamodule = MVTec(root=root, categories=["alpha", "beta"], num_workers=0)
    datamodule.setup()
    assert datamodule.category == "alpha_beta"
    assert len(datamodule.train_data) == 8 and len(datamodule.test_data) == 8
    assert set(datamodule.test_data.samples["category"]) == {"alpha", "beta"}
    item = datamodule.test_data[0]
    assert item.image.shape[0] == 3  # grey files are read as RGB
    with pytest.raises(ValueError):
        MVTec(root=root, categories=[])


# -- start-up hook ----------------------------------------------------------------------------
def _hook_installed() -> bool:
    return (Path(sysconfig.get_paths()["purelib"]) / "memmamba_plugins_hook.pth").is_file()


@pytest.mark.skipif(not _hook_installed(), reason="package not pip-installed into this interpreter")
def test_startup_hook_is_cheap_and_registers_on_anomalib_import() -> None:
    cheap = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in cheap.stderr.splitlines() if "|" in line]
    assert "memmamba_plugins_hook" in imported
    assert not any(name.split(".")[0] in {"torch", "anomalib", "lightning"} for name in imported)
    code = (
        "import sys, anomalib.models as m; "
        "assert 'memmamba_plugins.pyramid_mamba' in sys.modules; "
        "from anomalib.models.components import AnomalibModule; "
        "print(sorted(c.__name__ for c in AnomalibModule.__subclasses__() if c.__name__ == 'PyramidMamba'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "PyramidMamba" in out.stdout


def test_separable_blur_equals_anomalib_blur() -> None:
    from anomalib.models.components.filters import GaussianBlur2d

    from memmamba_plugins.pyramid_mamba.anomaly_map import SeparableGaussianBlur2d

    x = torch.rand(2, 1, 64, 48)
    reference = GaussianBlur2d(sigma=4.0, channels=1)
    separable = SeparableGaussianBlur2d(sigma=4.0, channels=1)
    torch.testing.assert_close(separable(x), reference(x), rtol=0, atol=1e-5)
    assert list(separable.state_dict()) == list(reference.state_dict())  # checkpoints stay compatible
