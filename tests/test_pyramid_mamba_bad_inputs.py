"""What bad input gets from Pyramid-Mamba: one table, one row per case.

Each row is ``(setup, expected exception, message pattern)``. ``setup`` builds the bad input in a fresh
folder and runs what a user would run on it (the torch model, the Lightning model, the ``MVTec``
datamodule, ``Engine.fit``/``Engine.test``, ``load_from_checkpoint``). A row whose exception is
``None`` is input that must work; its ``setup`` asserts the result itself. Everything is tiny (32 px
files, a 64 px model without ImageNet weights, a step or two of training) and runs offline on CPU.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("anomalib")

from anomalib.data.utils import read_image  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import Resize  # noqa: E402

from memmamba_plugins.pyramid_mamba import MVTec, PyramidMamba, PyramidMambaModel  # noqa: E402
from memmamba_plugins.pyramid_mamba.checkpoint import CorruptCheckpointError  # noqa: E402
from memmamba_plugins.pyramid_mamba.data import (  # noqa: E402
    EXIF_ORIENTATION_TAG,
    MVTecDataError,
    MVTecDatasetNotFoundError,
)
from memmamba_plugins.pyramid_mamba.lightning_model import NonFiniteLossError  # noqa: E402
from memmamba_plugins.pyramid_mamba.synthetic import DEFECT, make_synthetic_mvtec  # noqa: E402

#: Side of the generated files, and the (smallest valid) side the model is built for.
FILE_SIDE = 32
MODEL_SIDE = 64
#: A tiny decoder that keeps every code path (as in test_pyramid_mamba.py).
TINY = {
    "backbone": "resnet18",
    "pre_trained": False,
    "decoder_dims": (64, 32, 16, 8),
    "decoder_depths": (1, 1, 1, 1),
    "css_modules": (1, 1, 1, 1),
    "d_state": 4,
    "mff_blocks": 1,
    "drop_path_rate": 0.0,
}
#: EXIF orientation 6: the viewer rotates the stored pixels by 90 degrees.
EXIF_ROTATE_90 = 6


@dataclass
class Case:
    """What a row's ``setup`` gets: its own folder and a folder shared by the module (trained checkpoint)."""

    tmp: Path
    shared: Path

    def data(self, categories: tuple[str, ...] = ("alpha",)) -> Path:
        """A fresh, valid MVTec AD layout: 2 train images, 1 good and 1 defect test image per category."""
        return make_synthetic_mvtec(self.tmp / "mvtec", categories, size=FILE_SIDE, n_train=2, n_test=1)

    def checkpoint(self) -> Path:
        """A real Lightning checkpoint of the tiny model, trained once per module."""
        found = sorted(self.shared.rglob("*.ckpt"))
        if not found:
            root = make_synthetic_mvtec(
                self.shared / "mvtec", ("alpha",), size=FILE_SIDE, n_train=2, n_test=1
            )
            _engine(self.shared / "results").fit(_tiny(), datamodule=_datamodule(root))
            found = sorted(self.shared.rglob("*.ckpt"))
        return found[-1]


def _tiny(**overrides) -> PyramidMamba:
    torch.manual_seed(0)
    return PyramidMamba(**{**TINY, "input_size": MODEL_SIDE, "visualizer": False, **overrides})


@functools.cache  # built once: every use is in eval mode, without gradients
def _tiny_torch_model() -> PyramidMambaModel:
    torch.manual_seed(0)
    return PyramidMambaModel(**TINY, input_size=(MODEL_SIDE, MODEL_SIDE)).eval()


def _datamodule(root: Path, categories: tuple[str, ...] = ("alpha",)) -> MVTec:
    return MVTec(root=root, categories=list(categories), train_batch_size=2, eval_batch_size=2, num_workers=0)


def _engine(root: Path, **trainer_arguments) -> Engine:
    """One epoch on CPU, no sanity validation (a forward pass that no case needs)."""
    return Engine(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **trainer_arguments,
    )


def _images(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# -- 1. input size, channels ---------------------------------------------------------------------------
def other_input_size(case: Case) -> None:
    """Built for 64, fed 128 or 96x80: map at the input's size, score as for the pre-processed image."""
    model = _tiny_torch_model()
    for height, width in ((2 * MODEL_SIDE, 2 * MODEL_SIDE), (96, 80)):
        images = torch.rand(2, 3, height, width)
        with torch.no_grad():
            out = model(images)
            # what the pre-processor does: Resize((64, 64), antialias=True)
            reference = model(Resize((MODEL_SIDE, MODEL_SIDE), antialias=True)(images))
        assert out.anomaly_map.shape == (2, 1, height, width)
        torch.testing.assert_close(out.pred_score, reference.pred_score)


def grey_tensor(case: Case) -> None:
    with torch.no_grad():
        _tiny_torch_model()(torch.rand(1, 1, MODEL_SIDE, MODEL_SIDE))


def rgba_tensor(case: Case) -> None:
    with torch.no_grad():
        _tiny_torch_model()(torch.rand(1, 4, MODEL_SIDE, MODEL_SIDE))


def rgba_tensor_through_pre_processor(case: Case) -> None:
    """Through anomalib's pipeline the check runs before Normalize, which would fail to broadcast."""
    with torch.no_grad():
        _tiny().eval()(torch.rand(1, 4, MODEL_SIDE, MODEL_SIDE))


def unbatched_image(case: Case) -> None:
    with torch.no_grad():
        _tiny_torch_model()(torch.rand(3, MODEL_SIDE, MODEL_SIDE))


# -- 3.-10. data --------------------------------------------------------------------------------------
def no_ground_truth(case: Case) -> None:
    root = case.data()
    for mask in (root / "alpha" / "ground_truth" / DEFECT).iterdir():
        mask.unlink()
    (root / "alpha" / "ground_truth" / DEFECT).rmdir()
    (root / "alpha" / "ground_truth").rmdir()
    _datamodule(root).setup()


def missing_mask(case: Case) -> None:
    root = make_synthetic_mvtec(case.tmp / "mvtec", ("alpha",), size=FILE_SIDE, n_train=2, n_test=2)
    _images(root / "alpha" / "ground_truth" / DEFECT)[0].unlink()
    _datamodule(root).setup()


def _to_jpeg(folder: Path) -> None:
    for path in _images(folder):
        with Image.open(path) as image:
            image.convert("RGB").save(path.with_suffix(".jpg"), quality=95)
        path.unlink()


def jpeg_images(case: Case) -> None:
    """JPEG images (PNG masks) are read through anomalib's make_mvtec_ad_dataset with JPEG extensions."""
    root = case.data()
    for folder in ("train/good", "test/good", f"test/{DEFECT}"):
        _to_jpeg(root / "alpha" / folder)
    datamodule = _datamodule(root)
    datamodule.setup()
    assert len(datamodule.train_data) == 2 and len(datamodule.test_data) == 2
    item = datamodule.test_data[int(np.argmax(datamodule.test_data.samples.label_index))]
    assert Path(item.image_path).suffix == ".jpg" and item.gt_mask.any()


def jpeg_masks(case: Case) -> None:
    root = case.data()
    _to_jpeg(root / "alpha" / "ground_truth" / DEFECT)
    _datamodule(root).setup()


def empty_train_folder(case: Case) -> None:
    """Before: Lightning's RandomSampler failed with ``num_samples=0``; now setup names the folder."""
    root = case.data()
    for path in _images(root / "alpha" / "train" / "good"):
        path.unlink()
    _engine(case.tmp / "results").fit(_tiny(), datamodule=_datamodule(root))


def no_defect_images(case: Case) -> None:
    """Before: every metric came out 0.0 without a word."""
    root = case.data()
    for folder in (root / "alpha" / "test" / DEFECT, root / "alpha" / "ground_truth" / DEFECT):
        for path in _images(folder):
            path.unlink()
    _datamodule(root).setup(TrainerFn.TESTING)


def good_test_images_in_one_category_only(case: Case) -> None:
    root = case.data(("alpha", "beta"))
    for path in _images(root / "beta" / "test" / "good"):
        path.unlink()
    _datamodule(root, ("alpha", "beta")).setup(TrainerFn.TESTING)


def root_is_a_file(case: Case) -> None:
    path = case.tmp / "MVTecAD.tar.xz"
    path.write_bytes(b"not a folder")
    _datamodule(path).prepare_data()


def root_does_not_exist(case: Case) -> None:
    _datamodule(case.tmp / "nowhere").prepare_data()
    assert not (case.tmp / "nowhere").exists()


def mixed_image_sizes(case: Case) -> None:
    """Files of different (non-square) sizes in one category: the pre-processor resizes every batch."""
    root = case.data()
    for index, path in enumerate(sorted((root / "alpha").rglob("*.png"))):
        # a defect image and its mask (same stem) get the same size
        index = sum(path.stem.removesuffix("_mask").encode()) if DEFECT in path.parts else index
        with Image.open(path) as image:
            image.resize((FILE_SIDE + 8 * (index % 4), FILE_SIDE + 4 * (index % 2))).save(path)
    datamodule = _datamodule(root)
    datamodule.setup()
    transform = _tiny().pre_processor.transform
    for loader in (datamodule.train_dataloader(), datamodule.test_dataloader()):
        batch = next(iter(loader))
        images, masks = transform(batch.image, batch.gt_mask)
        assert images.shape[-2:] == masks.shape[-2:] == (MODEL_SIDE, MODEL_SIDE)


def sixteen_bit_grey_png(case: Case) -> None:
    """Before: anomalib's Image.convert("RGB") clipped 16-bit grey to white, silently."""
    root = case.data()
    path = _images(root / "alpha" / "train" / "good")[0]
    with Image.open(path) as image:
        deep = np.asarray(image.convert("L")).astype(np.uint16) * 257
    Image.fromarray(deep).save(path)
    _datamodule(root).setup()


def sixteen_bit_rgb_png(case: Case) -> None:
    """16-bit RGB PNGs open as 8-bit RGB in PIL: read correctly (to 8-bit precision)."""
    cv2 = pytest.importorskip("cv2")
    pixel = np.array([1000, 30000, 65535], np.uint16)  # R, G, B
    path = case.tmp / "rgb16.png"
    cv2.imwrite(str(path), np.broadcast_to(pixel[::-1], (FILE_SIDE, FILE_SIDE, 3)).copy())  # cv2 writes BGR
    image = read_image(path, as_tensor=True)
    torch.testing.assert_close(image[:, 0, 0], torch.from_numpy(pixel / 65535).float(), rtol=0, atol=1 / 255)


def _exif_rotated_jpeg(path: Path, pixels: np.ndarray) -> None:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_90
    image.save(path, exif=exif.tobytes(), quality=95)


def exif_rotated_jpeg(case: Case) -> None:
    """anomalib reads pixels as stored and ignores the EXIF orientation (no exif_transpose)."""
    root = case.data()
    pixels = np.zeros((FILE_SIDE, FILE_SIDE + 16, 3), np.uint8)  # stored: wide
    pixels[:, :8] = 255  # a white band on the stored left edge
    for path in _images(root / "alpha" / "train" / "good"):
        _exif_rotated_jpeg(path.with_suffix(".jpg"), pixels)
        path.unlink()
    datamodule = _datamodule(root)
    datamodule.setup()
    image = datamodule.train_data[0].image
    assert image.shape[-2:] == pixels.shape[:2]  # not rotated to tall
    assert image[0, :, :8].mean() > 0.95 and image[0, :, 8:].mean() < 0.05


def exif_rotated_defect_with_mask_of_the_rotated_view(case: Case) -> None:
    root = case.data()
    image_path = _images(root / "alpha" / "test" / DEFECT)[0]
    mask_path = _images(root / "alpha" / "ground_truth" / DEFECT)[0]
    _exif_rotated_jpeg(image_path.with_suffix(".jpg"), np.zeros((FILE_SIDE, FILE_SIDE + 16, 3), np.uint8))
    image_path.unlink()
    Image.new("L", (FILE_SIDE, FILE_SIDE + 16)).save(mask_path)  # drawn on the rotated (tall) view
    _datamodule(root).setup()


def unreadable_image(case: Case) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file whatever its permissions")
    root = case.data()
    _images(root / "alpha" / "train" / "good")[0].chmod(0)
    _datamodule(root).setup()


def corrupt_image(case: Case) -> None:
    root = case.data()
    _images(root / "alpha" / "train" / "good")[0].write_bytes(b"\x89PNG but not really")
    _datamodule(root).setup()


# -- 11. checkpoints ---------------------------------------------------------------------------------
def _truncated(case: Case) -> Path:
    data = case.checkpoint().read_bytes()
    path = case.tmp / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _bit_flipped(case: Case) -> Path:
    """One flipped bit inside a weight tensor: torch.load would load it silently (it checks no CRC)."""
    source = case.checkpoint()
    with zipfile.ZipFile(source) as archive:
        entry = max(archive.infolist(), key=lambda e: e.file_size)  # the biggest tensor's storage
    data = bytearray(source.read_bytes())
    data[
        entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + entry.file_size // 2
    ] ^= 1
    path = case.tmp / "bitflip.ckpt"
    path.write_bytes(bytes(data))
    return path


def valid_checkpoint_still_loads(case: Case) -> None:
    checkpoint = case.checkpoint()
    model = PyramidMamba.load_from_checkpoint(checkpoint)
    assert model.input_size == (MODEL_SIDE, MODEL_SIDE)
    root = case.data()
    results = _engine(case.tmp / "results").test(_tiny(), datamodule=_datamodule(root), ckpt_path=checkpoint)
    assert "image_AUROC" in results[0]


def truncated_checkpoint_load_from_checkpoint(case: Case) -> None:
    PyramidMamba.load_from_checkpoint(_truncated(case))


def truncated_checkpoint_engine_test(case: Case) -> None:
    """``anomalib test --ckpt_path``: the Trainer's restore goes through the checked checkpoint IO."""
    path = _truncated(case)
    _engine(case.tmp / "results").test(_tiny(), datamodule=_datamodule(case.data()), ckpt_path=path)


def bit_flipped_checkpoint(case: Case) -> None:
    PyramidMamba.load_from_checkpoint(_bit_flipped(case))


def not_a_checkpoint_engine_predict(case: Case) -> None:
    """``anomalib predict --ckpt_path`` on some other file (before: ``KeyError: 101`` from the unpickler)."""
    path = case.tmp / "model.ckpt"
    path.write_text("hello")
    _engine(case.tmp / "results").predict(_tiny(), datamodule=_datamodule(case.data()), ckpt_path=path)


def missing_checkpoint(case: Case) -> None:
    PyramidMamba.load_from_checkpoint(case.tmp / "model.ckpt")


# -- 12. divergence ------------------------------------------------------------------------------------
def infinite_loss(case: Case) -> None:
    engine = _engine(case.tmp / "results", limit_val_batches=0)
    engine.fit(_tiny(loss_weight=float("inf")), datamodule=_datamodule(case.data()))


def learning_rate_far_too_high(case: Case) -> None:
    """The first step blows the weights up; the second step's forward pass overflows before any loss."""
    datamodule = _datamodule(case.data())
    datamodule.train_batch_size = 1  # two steps in the one epoch
    engine = _engine(case.tmp / "results", limit_val_batches=0)
    engine.fit(_tiny(lr=1e12, lr_decay_at=None), datamodule=datamodule)


WORKS = None
CASES: list[tuple[str, Callable[[Case], None], type[BaseException] | None, str | None]] = [
    ("other-input-size-is-resized", other_input_size, WORKS, None),
    (
        "grey-1-channel",
        grey_tensor,
        ValueError,
        r"expects 3-channel RGB images, got 1 channel.*expand\(-1, 3",
    ),
    ("rgba-4-channel", rgba_tensor, ValueError, r"got 4 channel\(s\).*drop an alpha channel"),
    ("rgba-through-pre-processor", rgba_tensor_through_pre_processor, ValueError, r"got 4 channel\(s\)"),
    ("unbatched-image", unbatched_image, ValueError, r"shaped \(batch, 3, height, width\).*unsqueeze\(0\)"),
    (
        "no-ground-truth",
        no_ground_truth,
        MVTecDatasetNotFoundError,
        r"no 'ground_truth' folder.*Add the missing",
    ),
    ("missing-mask", missing_mask, MVTecDatasetNotFoundError, r"2 defect images.*holds 1 masks"),
    ("jpeg-images", jpeg_images, WORKS, None),
    ("jpeg-masks", jpeg_masks, MVTecDataError, r"must be PNG.*JPEG compression noise"),
    ("empty-train", empty_train_folder, MVTecDatasetNotFoundError, r"no training images: '.*train/good'"),
    ("no-defect-images", no_defect_images, MVTecDatasetNotFoundError, r"no defect images.*test_split_mode"),
    (
        "good-test-images-in-one-category-only",
        good_test_images_in_one_category_only,
        MVTecDatasetNotFoundError,
        r"\['beta'\] have no good test images",
    ),
    (
        "root-is-a-file",
        root_is_a_file,
        MVTecDatasetNotFoundError,
        r"MVTecAD\.tar\.xz' is a file, not a folder",
    ),
    (
        "root-does-not-exist",
        root_does_not_exist,
        MVTecDatasetNotFoundError,
        r"nowhere' does not exist.*--data.root",
    ),
    ("mixed-image-sizes", mixed_image_sizes, WORKS, None),
    (
        "16-bit-grey-png",
        sixteen_bit_grey_png,
        MVTecDataError,
        r"000\.png' is a single-channel.*'I;16'.*8 bits",
    ),
    ("16-bit-rgb-png", sixteen_bit_rgb_png, WORKS, None),
    ("exif-rotated-jpeg", exif_rotated_jpeg, WORKS, None),
    (
        "exif-rotated-defect-mask-mismatch",
        exif_rotated_defect_with_mask_of_the_rotated_view,
        MVTecDataError,
        r"is 32x48 .* but its image .* is 48x32.*EXIF rotation.*exif_transpose",
    ),
    ("unreadable-image", unreadable_image, MVTecDataError, r"permission denied.*chmod a\+r"),
    ("corrupt-image", corrupt_image, MVTecDataError, r"000\.png' as an image.*corrupt or not an image"),
    ("valid-checkpoint-still-loads", valid_checkpoint_still_loads, WORKS, None),
    (
        "truncated-checkpoint-load-from-checkpoint",
        truncated_checkpoint_load_from_checkpoint,
        CorruptCheckpointError,
        r"truncated\.ckpt' is truncated or corrupt.*no complete zip archive",
    ),
    (
        "truncated-checkpoint-engine-test",
        truncated_checkpoint_engine_test,
        CorruptCheckpointError,
        r"truncated\.ckpt' is truncated or corrupt",
    ),
    (
        "bit-flipped-checkpoint",
        bit_flipped_checkpoint,
        CorruptCheckpointError,
        r"bitflip\.ckpt'.*damaged.*CRC",
    ),
    (
        "not-a-checkpoint-engine-predict",
        not_a_checkpoint_engine_predict,
        CorruptCheckpointError,
        r"model\.ckpt' is truncated or corrupt: its 5 bytes",
    ),
    ("missing-checkpoint", missing_checkpoint, FileNotFoundError, r"model\.ckpt' does not exist"),
    (
        "infinite-loss",
        infinite_loss,
        NonFiniteLossError,
        r"diverged at epoch 0, after 0 optimizer steps: the loss is inf.*--model\.lr",
    ),
    (
        "learning-rate-far-too-high",
        learning_rate_far_too_high,
        NonFiniteLossError,
        r"diverged at epoch \d, after [1-9]\d* optimizer steps: .*(NaN/Inf).*learning rate too high",
    ),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize(("name", "setup", "error", "pattern"), CASES, ids=[row[0] for row in CASES])
def test_bad_input(
    name: str,
    setup: Callable[[Case], None],
    error: type[BaseException] | None,
    pattern: str | None,
    tmp_path: Path,
    shared: Path,
) -> None:
    case = Case(tmp=tmp_path, shared=shared)
    if error is None:
        setup(case)
        return
    with pytest.raises(error, match=pattern):
        setup(case)
