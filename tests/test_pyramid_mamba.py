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

from memmamba_plugins import pretrained  # noqa: E402
from memmamba_plugins.pyramid_mamba import MVTec, PyramidMamba, PyramidMambaModel  # noqa: E402
from memmamba_plugins.pyramid_mamba import torch_model as tm  # noqa: E402
from memmamba_plugins.pyramid_mamba.data import MVTEC_AD_URL, MVTecDatasetNotFoundError  # noqa: E402
from memmamba_plugins.pyramid_mamba.loss import PyramidMambaLoss  # noqa: E402
from memmamba_plugins.pyramid_mamba.synthetic import make_synthetic_mvtec  # noqa: E402
from memmamba_plugins.ssm import merge_regions, split_regions  # noqa: E402

SIZE = 64
LITE0_BACKBONE = "tf_efficientnet_lite0"
LITE0_LAYERS = ("blocks.1", "blocks.2", "blocks.4")


def pretrained_weights_installed() -> bool:
    return pretrained.OFFLINE_WEIGHTS[LITE0_BACKBONE].source() is not None

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
    assert type(optim) is torch.optim.Adam
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


# -- fidelity to the official code ------------------------------------------------------------
def test_stochastic_depth_one_rate_per_css_module_coarsest_highest() -> None:
    model = PyramidMambaModel(pre_trained=False)  # paper size: 6 CSS modules, 16 SS2D blocks
    per_module = []
    for stage in model.decoder.stages:
        for module in stage:
            rates = {getattr(b.drop_path, "drop_prob", 0.0) for b in module.pss}
            assert len(rates) == 1  # one rate for all blocks of a module
            per_module.append(rates.pop())
    assert per_module == pytest.approx([0.2, 0.16, 0.12, 0.08, 0.04, 0.0])


def test_decoder_linear_layers_trunc_normal_002() -> None:
    torch.manual_seed(0)
    model = PyramidMambaModel(pre_trained=False)
    weights = torch.cat([m.weight.flatten() for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)])
    assert weights.std().item() == pytest.approx(tm.LINEAR_INIT_STD, rel=0.1)
    assert all(m.bias is None or not m.bias.any() for m in model.decoder.modules() if isinstance(m, torch.nn.Linear))


# -- anomaly map --------------------------------------------------------------------------------
def test_anomaly_map_is_mean_of_upsampled_one_minus_cosine() -> None:
    """Hand-computed on 2x2 maps: 1 - cos per pixel, upsampled (constant maps stay constant), averaged."""
    from memmamba_plugins.pyramid_mamba.anomaly_map import AnomalyMapGenerator

    enc = [torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]]), torch.ones(1, 2, 1, 1)]
    dec = [torch.tensor([[[[1.0, 1.0], [-1.0, 2.0]], [[0.0, 0.0], [0.0, 2.0]]]]), torch.tensor([[[[1.0]], [[0.0]]]])]
    # scale 0: pixel (0,0) cos 1 -> 0; (0,1) enc (0,1) dec (1,0): cos 0 -> 1; (1,0) cos -1 -> 2; (1,1) cos 1 -> 0
    # scale 1: enc (1,1), dec (1,0): cos 1/sqrt(2) -> 1 - 0.7071
    generator = AnomalyMapGenerator((2, 2))
    got = generator(enc, dec)
    expected = (torch.tensor([[0.0, 1.0], [2.0, 0.0]]) + (1 - 2**-0.5)) / 2
    torch.testing.assert_close(got[0, 0], expected)
    assert got.shape == (1, 1, 2, 2)


# -- learning ---------------------------------------------------------------------------------
def _auroc(scores_good: torch.Tensor, scores_bad: torch.Tensor) -> float:
    """Probability that a defective image scores above a normal one (ties count half)."""
    diff = scores_bad[:, None] - scores_good[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


@pytest.mark.skipif(
    not pretrained_weights_installed(), reason="ImageNet lite0 weights not installed (the `lite0` extra)"
)
def test_tiny_model_learns_planted_defects() -> None:
    """A few training steps on normal textures give image AUROC >= 0.9 on planted defects.

    The same images scored with a decoder whose output is ignored (a constant reconstruction) or
    with the untrained decoder stay far from that, so the test fails when the model stops learning.
    """
    from memmamba_plugins.pyramid_mamba.synthetic import planted_defect_images

    mean, std = pretrained.normalization(LITE0_BACKBONE)

    def batch(array) -> torch.Tensor:
        x = torch.from_numpy(array)[:, None].repeat(1, 3, 1, 1)
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    train = batch(planted_defect_images(64, SIZE, "checker", defective=False, seed=1)[0])
    good = batch(planted_defect_images(16, SIZE, "checker", defective=False, seed=2)[0])
    bad = batch(planted_defect_images(16, SIZE, "checker", defective=True, seed=3)[0])
    model = tiny_model(backbone=LITE0_BACKBONE, layers=LITE0_LAYERS, pre_trained=True, d_state=4)

    def auroc() -> float:
        model.eval()
        with torch.no_grad():
            value = _auroc(model(good).pred_score, model(bad).pred_score)
        model.train()
        return value

    untrained = auroc()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=1e-4)
    loss_fn = PyramidMambaLoss()
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        enc, dec = model(train[torch.randint(0, len(train), (8,), generator=generator)])
        loss = loss_fn(enc, dec)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = auroc()
    model.reconstruct = lambda features: [torch.ones_like(f) for f in features]
    ignored = auroc()
    assert trained >= 0.9, (untrained, trained, ignored)
    assert untrained < 0.85 and ignored < 0.85, (untrained, trained, ignored)


# -- pre-processing and optimisers ----------------------------------------------------------
@pytest.mark.parametrize(("backbone", "mean"), [("tf_efficientnet_lite0", 0.5), ("resnet18", 0.485)])
def test_pre_processor_normalises_for_the_encoder(backbone: str, mean: float) -> None:
    processor = PyramidMamba.configure_pre_processor((SIZE, SIZE), backbone=backbone)
    for transform in (processor.transform, processor.export_transform):
        normalize = [t for t in transform.transforms if type(t).__name__ == "Normalize"][0]
        assert normalize.mean[0] == pytest.approx(mean)


def test_adamw_uses_the_code_learning_rate_per_batch_and_warms_up() -> None:
    model = PyramidMamba(**TINY, input_size=SIZE, optimizer="adamw", warmup_steps=4, lr_decay_at=None)
    config = model.configure_optimizers()
    assert type(config["optimizer"]) is torch.optim.AdamW
    assert config["optimizer"].defaults["lr"] == pytest.approx(5e-3)  # batch 16 without a trainer
    scheduler = config["lr_scheduler"]["scheduler"]
    assert [round(f(0), 3) for f in scheduler.lr_lambdas] == [0.25]
    assert scheduler.lr_lambdas[0](10) == 1.0
    with pytest.raises(ValueError, match="optimizer must be one of"):
        PyramidMamba(**TINY, input_size=SIZE, optimizer="sgd")


def test_multiclass_categories_of_different_non_square_sizes(tmp_path: Path) -> None:
    """Real multi-class roots mix image sizes (e.g. 256x256 boards, 629x256 ball screws); batches still form."""
    from PIL import Image

    root = make_synthetic_mvtec(tmp_path / "mixed", ("wide", "square"), size=SIZE, n_train=3, n_test=2)
    for path in (root / "wide").rglob("*.png"):  # stretch one category to a non-square shape
        with Image.open(path) as image:
            image.resize((SIZE + 40, SIZE - 16)).save(path)
    datamodule = MVTec(root=root, categories=["wide", "square"], train_batch_size=6, eval_batch_size=8, num_workers=0)
    datamodule.setup()
    model = PyramidMamba(**TINY, input_size=SIZE).eval()
    for loader in (datamodule.train_dataloader(), datamodule.test_dataloader()):
        batch = next(iter(loader))
        images = model.pre_processor.transform(batch.image)
        assert images.shape[-2:] == (SIZE, SIZE)
        with torch.no_grad():
            assert model.model(images).anomaly_map.shape == (len(images), 1, SIZE, SIZE)
    assert datamodule.name == "mixed"  # heat maps go to images/<category>/test/..., no overwrites


def test_cosine_loss_is_one_minus_cosine_summed_over_scales() -> None:
    enc = [torch.tensor([[[[1.0]], [[0.0]]]]), torch.tensor([[[[0.0]], [[2.0]]]])]
    dec = [torch.tensor([[[[0.0]], [[3.0]]]]), torch.tensor([[[[0.0]], [[5.0]]]])]
    # scale 0: orthogonal -> 1; scale 1: parallel -> 0
    assert PyramidMambaLoss(weight=2.0, loss_type="cosine")(enc, dec).item() == pytest.approx(2.0)
    assert PyramidMambaLoss(weight=1.0)(enc, dec).item() == pytest.approx((1 + 9) / 2 + 9 / 2)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        PyramidMambaLoss(loss_type="l1")


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs" / "pyramid_mamba").glob("*.yaml")))
def test_shipped_configs_build(config: Path) -> None:
    """Every anomalib config builds the model and names only real Trainer arguments."""
    import inspect

    import yaml
    from lightning.pytorch import Trainer

    spec = yaml.safe_load(config.read_text())
    args = dict(spec["model"]["init_args"])
    if args.get("backbone") != LITE0_BACKBONE or not pretrained_weights_installed():
        args["pre_trained"] = False  # other encoders' weights come from the hub, which tests never reach
    model = PyramidMamba(**args)
    assert model.input_size == (args["input_size"], args["input_size"])
    assert set(spec["trainer"]) <= set(inspect.signature(Trainer).parameters)
    assert spec["trainer"]["check_val_every_n_epoch"] == spec["trainer"]["max_epochs"]  # one validation, at the end


def test_blur_scales_with_the_input_size() -> None:
    assert tm.blur_sigma_for((256, 256)) == 4.0 and tm.blur_sigma_for((128, 128)) == 2.0
    assert tiny_model().blur.kernel_x.shape[-1] == 2 * int(4.0 * 1.0 + 0.5) + 1  # 64x64: sigma 1
    assert isinstance(tiny_model(blur_sigma=0).blur, torch.nn.Identity)
